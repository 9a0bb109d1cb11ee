"""
The whole VoxShield protocol on the real LGE-MRI data of ../shared/data/la_mri, sized for a 2-core CPU:

1. a 3D UNet victim trained on the clean training cases, scored on the 20 clean test cases;
2. for each generator variant (the full method, then the ablations without L_SPD and without L_ISC):
   train the generator on the 80 training cases, protect them, train the same victim (same recipe,
   same seed) on the protected copy and score it on the same clean test cases;
3. the paper's tables and the Fig. 3-style figures from those result files.

Every step is the bundle command a user would run. Result files, tables, figures and
``benchmark.json`` (each command with its wall time and exit code, hardware, versions) go to
``--results_dir`` (default benchmarks/results/la_mri); checkpoints and protected volumes go to
``--work_dir`` (default a folder under /tmp), never into the repository.

    python benchmarks/la_mri_benchmark.py [--generator_epochs 10] [--victim_epochs 15]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from custom.provenance import hardware, software_versions  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "la_mri"
CONFIGS = "bundles/voxshield_brats/configs"
VARIANTS = {"full": [], "no_spd": ["--lambda_spd", "0"], "no_isc": ["--lambda_isc", "0"]}


def bundle(run_id: str, config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", f"{CONFIGS}/{config}", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results" / "la_mri"))
    parser.add_argument("--work_dir", default="/tmp/voxshield_la_mri_benchmark")
    parser.add_argument("--generator_epochs", type=int, default=10)
    parser.add_argument("--victim_epochs", type=int, default=15)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--generator_args", default="",
                        help="extra overrides for every generator training run (a variant's own override wins)")
    parser.add_argument("--skip_clean", action="store_true", help="reuse an earlier clean victim result")
    options = parser.parse_args()

    data, results, work = Path(options.data), Path(options.results_dir), Path(options.work_dir)
    if not (data / "dataset.json").is_file():
        sys.exit(f"{data}: la_mri not found (it lives in ../shared/data beside the repository).")
    results.mkdir(parents=True, exist_ok=True)
    steps = []

    def step(name: str, command: list[str]) -> None:
        print(f"== {name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO_ROOT)
        steps.append({"step": name, "command": shlex.join(command), "exit_code": completed.returncode,
                      "wall_time_s": round(time.perf_counter() - start, 1)})
        (results / "benchmark.json").write_text(json.dumps(summary(), indent=1))
        if completed.returncode:
            sys.exit(f"{name} failed with exit code {completed.returncode}")

    started = time.perf_counter()

    def summary() -> dict:
        return {"data": str(data), "options": vars(options), "steps": steps, "hardware": hardware(),
                "software": software_versions(), "total_wall_time_s": round(time.perf_counter() - started, 1)}

    victim = ["--test_dir", str(data), "--epochs", str(options.victim_epochs)]
    if not options.skip_clean:
            step("victim on clean data", bundle("evaluate", "evaluate.json", "--train_dir", str(data), *victim,
                                             "--output_dir", str(results / "clean")))
    for variant in options.variants.split(","):
        ckpt, protected = work / variant / "ckpt", work / variant / "protected"
        step(f"generator {variant}", bundle(
            "training", "train.json", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
            "--log_dir", str(work / variant / "logs"), "--epochs", str(options.generator_epochs),
            *shlex.split(options.generator_args), *VARIANTS[variant]))
        step(f"protect {variant}", bundle(
            "protect", "protect.json", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
            "--output_dir", str(protected), "--overwrite", "true"))
        step(f"victim on {variant}", bundle("evaluate", "evaluate.json", "--train_dir", str(protected), *victim,
                                             "--output_dir", str(results / variant)))
    first = options.variants.split(",")[0]
    step("report", bundle("report", "report.json", "--results", repr([str(results)]), "--output_dir", str(results),
                          "--clean_dir", str(data), "--protected_dir", str(work / first / "protected")))
    print(json.dumps(summary()["steps"], indent=1))


if __name__ == "__main__":
    main()
