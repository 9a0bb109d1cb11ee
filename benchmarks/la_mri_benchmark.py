"""
The VoxShield protocol and its baselines on the real LGE-MRI data of ../shared/data/la_mri, sized
for a 2-core CPU:

1. a 3D UNet victim trained on the clean training cases, scored on the 20 clean test cases;
2. for each run (VoxShield and its ablations without L_SPD / L_ISC, then the baselines EM, TAP,
   LSP, SEP, PUE, UMed and the random-noise control): fit the method on the 80 training cases
   (`run training --method M`), protect them (`run protect --method M`), train each victim of
   --victims (same recipe, same seed) on the protected copy and score it on the clean test cases;
3. the paper's tables and the Fig. 3-style figures from all the result files in --results_dir.

Five more runs exist for the protection target's investigation (issue 3), run only when named in
--runs: ``roi_dilation2`` (VoxShield on the label dilated by 2 voxels), ``eps16`` (VoxShield with a
4x larger bound, 16/255: a positive control, not a setting to publish with),
``untrained_surrogate`` (``--surrogate_steps 0``: the generator fitted against a surrogate that
never trains), ``authors_schedule`` (``--surrogate_batches_per_epoch 10``: the surrogate trained on
10 batches per epoch, as in the authors' code, the generator on all of them) and
``authors_schedule_100`` (the same for the paper's 100 epochs). --victim_seeds trains every victim
once per seed, to measure how much a single run's score varies.

Every step is the bundle command a user would run. Result files, tables, figures and
``benchmark.json`` (each command with its wall time and exit code, hardware, versions) go to
``--results_dir`` (default benchmarks/results/la_mri); checkpoints and protected volumes go to
``--work_dir`` (default a folder under /tmp), never into the repository. With --resume, a step
whose output already exists (a protected copy with its manifest, a results.json) is skipped and
listed as reused, so a grid can be split over several invocations.

    python benchmarks/la_mri_benchmark.py [--runs full,no_spd,no_isc,em,...] [--victims unet,...]
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

from custom.bundle_utils import config_files  # noqa: E402
from custom.provenance import hardware, software_versions  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "la_mri"
BUNDLE = "voxshield_brats"
RUNS = {  # run name -> method, its overrides of train.json alone, its perturbation overrides (train and protect)
    "full": ("voxshield", [], []),
    "no_spd": ("voxshield", ["--lambda_spd", "0"], []),
    "no_isc": ("voxshield", ["--lambda_isc", "0"], []),
    **{method: (method, [], []) for method in ("random", "lsp", "em", "tap", "umed", "sep", "pue")},
    # issue 3's probes beyond the paper's settings, run on request: a wider support; a larger bound as
    # a positive control (does any VoxShield noise change what the victim learns?); a surrogate left at
    # its random start, so the noise is shaped for an untrained network as a victim's is at first
    "roi_dilation2": ("voxshield", [], ["--roi_dilation", "2"]),
    "eps16": ("voxshield", [], ["--eps", repr(16 / 255)]),
    "untrained_surrogate": ("voxshield", ["--surrogate_steps", "0"], []),
    # the authors' code's schedule: F trained on 10 batches per epoch only, G on every batch
    "authors_schedule": ("voxshield", ["--surrogate_batches_per_epoch", "10"], []),
    # ... for the paper's 100 generator epochs (about 36 minutes on 2 cores with this schedule)
    "authors_schedule_100": ("voxshield", ["--surrogate_batches_per_epoch", "10", "--epochs", "100"], []),
    # the paper's own setting, per-batch alternation for 100 generator epochs (about an hour on 2 cores)
    "paper_100": ("voxshield", ["--epochs", "100"], []),
    # a bound sweep of the two training-free noises: at which eps does a label-coded pattern (LSP) or
    # a label-shaped texture (random) start to keep the victim from learning?
    **{f"{method}_eps{level}": (method, [], ["--eps", repr(level / 255)])
       for method in ("lsp", "random") for level in (16, 32, 64)},
}
PROTOCOL = ["full", "no_spd", "no_isc", "random", "lsp", "em", "tap", "umed", "sep", "pue"]
BASELINE_SURROGATE = '--surrogate_def#channels "[16,32,64,128,256]" --surrogate_def#num_res_units 1'


def bundle(run_id: str, *args: str) -> list[str]:
    """`python -m monai.bundle run RUN_ID` of the brats bundle, its configs named relative to the repository."""
    configs = [Path(path).relative_to(REPO_ROOT).as_posix() for path in config_files(BUNDLE, run_id)]
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(configs), *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "benchmarks" / "results" / "la_mri"))
    parser.add_argument("--work_dir", default="/tmp/voxshield_la_mri_benchmark")
    parser.add_argument("--generator_epochs", type=int, default=10, help="VoxShield fitting epochs")
    parser.add_argument("--baseline_epochs", type=int, default=5, help="surrogate fitting epochs of the baselines")
    parser.add_argument("--victim_epochs", type=int, default=15)
    parser.add_argument("--runs", default=",".join(PROTOCOL),
                        help="comma-separated, from " + ",".join(RUNS) + '; "" trains the clean victims only')
    parser.add_argument("--victims", default="unet", help="comma-separated victims (evaluate.json --victim)")
    parser.add_argument("--victim_seeds", default="0",
                        help="comma-separated victim seeds; each victim is trained once per seed (the tables average them)")
    parser.add_argument("--generator_args", default="",
                        help="extra overrides for every VoxShield training run (a run's own override wins)")
    parser.add_argument("--baseline_args", default=BASELINE_SURROGATE,
                        help="extra overrides of training and protect for the baselines; by default a lighter "
                             "surrogate (16..256 channels, 1 residual unit) to fit the CPU budget")
    parser.add_argument("--skip_clean", action="store_true", help="no clean victim (an earlier result is kept)")
    parser.add_argument("--resume", action="store_true", help="skip steps whose outputs exist")
    parser.add_argument("--record", default="benchmark.json", help="file name, in --results_dir, of this invocation's record")
    options = parser.parse_args()
    runs = [run for run in options.runs.split(",") if run]  # --runs "": the clean victims alone
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")

    data, results, work = Path(options.data), Path(options.results_dir), Path(options.work_dir)
    if not (data / "dataset.json").is_file():
        sys.exit(f"{data}: la_mri not found (it lives in ../shared/data beside the repository).")
    results.mkdir(parents=True, exist_ok=True)
    steps = []

    def step(name: str, command: list[str], output: Path | None = None) -> None:
        if options.resume and output is not None and output.exists():
            steps.append({"step": name, "command": shlex.join(command), "reused": str(output)})
            return
        print(f"== {name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=REPO_ROOT)
        steps.append({"step": name, "command": shlex.join(command), "exit_code": completed.returncode,
                      "wall_time_s": round(time.perf_counter() - start, 1)})
        (results / options.record).write_text(json.dumps(summary(), indent=1))
        if completed.returncode:
            sys.exit(f"{name} failed with exit code {completed.returncode}")

    started = time.perf_counter()

    def summary() -> dict:
        return {"data": str(data), "options": vars(options), "steps": steps, "hardware": hardware(),
                "software": software_versions(), "total_wall_time_s": round(time.perf_counter() - started, 1)}

    victim = ["--test_dir", str(data), "--epochs", str(options.victim_epochs)]
    victims = [(name, int(seed)) for name in options.victims.split(",") for seed in options.victim_seeds.split(",")]

    def results_for(run: str, name: str, seed: int) -> Path:
        folder = run if name == "unet" else f"{run}_{name}"
        return results / (folder if seed == 0 else f"{folder}_seed{seed}")

    def victim_step(run: str, method: str, train_dir: Path) -> None:
        for name, seed in victims:
            output = results_for(run, name, seed)
            step(f"{name} victim (seed {seed}) on {run}", bundle(
                "evaluate", "--train_dir", str(train_dir), *victim, "--victim", name, "--seed", str(seed),
                "--method", method, "--output_dir", str(output)), output / "results.json")

    if not options.skip_clean:
        victim_step("clean", "clean", data)
    for run in runs:
        ckpt, protected = work / run / "ckpt", work / run / "protected"
        method, training_only, perturbation = RUNS[run]
        if method == "voxshield":
            epochs, shared = options.generator_epochs, []
            training_only = [*shlex.split(options.generator_args), *training_only]
        else:
            epochs, shared = options.baseline_epochs, shlex.split(options.baseline_args)
        shared = [*shared, "--method", method, *perturbation]
        done = protected / "voxshield_manifest.json"
        if not (options.resume and done.exists()):
            step(f"fit {run}", bundle(
                "training", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
                "--log_dir", str(work / run / "logs"), "--epochs", str(epochs), *shared, *training_only))
        step(f"protect {run}", bundle(
            "protect", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
            "--output_dir", str(protected), "--overwrite", "true", *shared), done)
        victim_step(run, method, protected)
    figure_runs = [run for run in ["full", *runs] if (work / run / "protected").is_dir()]
    figures = ["--clean_dir", str(data), "--protected_dir", str(work / figure_runs[0] / "protected")] if figure_runs else []
    step("report", bundle("report", "--results", repr([str(results)]), "--output_dir", str(results),
                          *figures))
    print(json.dumps(summary()["steps"], indent=1))


if __name__ == "__main__":
    main()
