"""
The Python side of benchmarks/gpu_session.sh (read that script's header first): small commands that the
script runs before, during and after its steps.

    python benchmarks/gpu_session.py subset SOURCE TARGET [--training 80] [--test 4]
    python benchmarks/gpu_session.py demo FOLDER                      # the dry run's la_mri-like data
    python benchmarks/gpu_session.py travel_size [CARRY ...]          # what the device call would send
    python benchmarks/gpu_session.py check DEVICE_JSON [--require_cuda]
    python benchmarks/gpu_session.py summarize WORK OUT --mode gpu|dry-run [--paper_epochs_total 100]

``subset`` writes an MSD copy of SOURCE's first --training cases (its "training" list) and the next
--test cases ("test"), as speed.dataset_subset does; ``demo`` writes the demo phantom and such a copy
of it (4 + 2 cases, 32x32x16); ``travel_size`` adds up what the device tool sends (git's tracked files
and untracked files it does not ignore, plus the carried paths) against its 64 MiB; ``check`` records
the interpreter, torch, the GPU and the versions of the packages the steps import, failing when one
is missing (or CUDA is, with --require_cuda); ``summarize`` writes OUT/session.json from the steps the
script recorded in WORK (each command with its exit code, wall time and time limit, the GPU's peak
memory where nvidia-smi sampled it), with the paper recipe's seconds per epoch and what the full run
would take, and makes the paths in OUT's JSON and Markdown files relative (WORK, TMP, the repository
".").
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAVEL_LIMIT_MIB = 64  # the device tool's limit on the working tree that travels, carried paths included
PACKAGES = ("numpy", "scipy", "monai", "nibabel", "ignite", "fire", "tensorboard", "einops", "tqdm")
DEMO_SHAPE = (32, 32, 16)
DEMO_TRAINING, DEMO_TEST = 4, 2


def subset(source: Path, target: Path, training: int, test: int) -> Path:
    """speed.dataset_subset: the first ``training`` cases of ``source`` as "training", the next ``test`` as "test"."""
    from speed import dataset_subset

    return dataset_subset(source, target, training, test)


def demo(folder: Path) -> Path:
    """The dry run's stand-in for la_mri: the demo phantom (FLARE layout) in ``folder``/phantom and its MSD
    copy with a "training" and a "test" list in ``folder``/data, which is returned."""
    from custom.demo import make_demo_dataset

    phantom = make_demo_dataset(folder / "phantom", "flare", DEMO_TRAINING + DEMO_TEST, DEMO_SHAPE)
    return subset(phantom, folder / "data", DEMO_TRAINING, DEMO_TEST)


def travel_bytes(root: Path, carry: list[str]) -> dict[str, int]:
    """
    Bytes of what the device tool sends from the checkout ``root``: git's tracked files and the
    untracked files it does not ignore ("tree"), and each carried path (a file or a folder, followed
    through symbolic links as the tool follows a carried path).
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.decode().split("\0")
    sizes = {"tree": sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())}
    for path in carry:
        carried = root / path
        files = [carried] if carried.is_file() else [item for item in carried.rglob("*") if item.is_file()]
        sizes[path] = sum(item.stat().st_size for item in files)
    return sizes


def check(device_json: Path, require_cuda: bool) -> int:
    """Write the interpreter's, torch's, the GPU's and the packages' versions to ``device_json``; return
    3 without CUDA when it is required, 4 when a package does not import, else 0."""
    import torch

    info = {"python": sys.version.split()[0], "python_executable": sys.executable, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(), "packages": {}}
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info.update(gpu=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                    compute_capability=f"{properties.major}.{properties.minor}")
    missing = []
    for name in PACKAGES:
        try:
            info["packages"][name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as error:  # a missing wheel, or one that does not fit this interpreter
            info["packages"][name] = f"not importable: {error}"
            missing.append(name)
    device_json.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    if require_cuda and not info["cuda_available"]:
        print("gpu_session: torch sees no CUDA device; the GPU steps are not run.", file=sys.stderr)
        return 3
    if missing:
        print(f"gpu_session: cannot import {', '.join(missing)} (were the wheels in .whl carried?)", file=sys.stderr)
        return 4
    return 0


def recorded_steps(work: Path) -> list[dict]:
    """The steps gpu_session.sh recorded in WORK/steps.tsv (name, exit code or "skipped", wall seconds or
    the reason, time limit), each with its command (WORK/logs/NAME.cmd) and the peak GPU memory in MiB
    that nvidia-smi sampled while it ran (WORK/logs/NAME.gpumem), where there is one."""
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, status, seconds_or_reason, limit = line.split("\t")
        command = work / "logs" / f"{name}.cmd"
        step = {"step": name, "command": command.read_text().strip() if command.is_file() else None}
        if status == "skipped":
            step["skipped"] = seconds_or_reason
        else:
            code = int(status)
            step.update(exit_code=code, timed_out=code in (124, 137), wall_time_s=float(seconds_or_reason),
                        timeout_s=int(limit))
        samples = work / "logs" / f"{name}.gpumem"
        if samples.is_file():
            used = [int(value) for value in samples.read_text().split() if value.isdigit()]
            step["gpu_memory_peak_mib"] = max(used) if used else None
        steps.append(step)
    return steps


def paper_victim(work: Path, steps: list[dict], total_epochs: int) -> dict | None:
    """
    The paper recipe's short run (the "paper" step): its seconds per epoch (ignite's "Epoch[k] Complete"
    lines, validation included), its results.json's train and evaluate seconds, and an estimate of
    ``total_epochs`` epochs: the step's wall time with the later epochs at their median. None when
    the step did not run.
    """
    step = next((step for step in steps if step["step"] == "paper" and "exit_code" in step), None)
    log = work / "logs" / "paper.log"
    if step is None or not log.is_file():
        return None
    from speed import epoch_seconds

    epochs = epoch_seconds(log)
    results_file = work / "paper" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    summary = {"epochs_run": len(epochs), "epoch_seconds": epochs, "exit_code": step["exit_code"],
               "wall_time_s": step["wall_time_s"],
               "results_wall_time_s": results["wall_time_s"] if results else None,
               "recipe": results["recipe"] if results else None,
               "train_cases": results["run"]["train_cases"] if results else None}
    if len(epochs) >= 2:
        later = statistics.median(epochs[1:])
        summary.update(median_epoch_after_first_s=later, estimated_total_epochs=total_epochs,
                       estimated_total_s=round(step["wall_time_s"] + (total_epochs - len(epochs)) * later, 1),
                       estimate="this step's wall time plus the missing epochs at the median of epochs 2..n")
    return summary


def summarize(work: Path, out: Path, mode: str, total_epochs: int) -> Path:
    """OUT/session.json (see the module's docstring), then the paths in OUT's files made relative."""
    steps = recorded_steps(work)
    device = work / "device.json"
    record = {
        "purpose": "issue 15 (speed.py fit at 96^3 and 160^3, fp32 and AMP; protect against nibabel I/O) and issue 13 "
                   "(seconds per epoch of the paper recipe at 160^3 with AMP, to size the 100-epoch victims)",
        "mode": mode, "date": datetime.date.today().isoformat(),
        "device": json.loads(device.read_text()) if device.is_file() else None,
        "steps": steps,
        "paper_victim": paper_victim(work, steps, total_epochs),
        "outputs": sorted(path.name for path in out.iterdir() if path.is_file()) + ["session.json"],
    }
    written = out / "session.json"
    written.write_text(json.dumps(record, indent=1))
    from la_mri_benchmark import local_replacements, normalise_paths  # imports MONAI: after session.json exists

    normalise_paths(out, {str(work): "WORK", **local_replacements(), tempfile.gettempdir(): "TMP"})
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("subset")
    command.add_argument("source", type=Path)
    command.add_argument("target", type=Path)
    command.add_argument("--training", type=int, default=80)
    command.add_argument("--test", type=int, default=4)
    commands.add_parser("demo").add_argument("folder", type=Path)
    commands.add_parser("travel_size").add_argument("carry", nargs="*")
    command = commands.add_parser("check")
    command.add_argument("device_json", type=Path)
    command.add_argument("--require_cuda", action="store_true")
    command = commands.add_parser("summarize")
    command.add_argument("work", type=Path)
    command.add_argument("out", type=Path)
    command.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    command.add_argument("--paper_epochs_total", type=int, default=100)
    options = parser.parse_args()

    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]
    if options.command == "subset":
        print(subset(options.source, options.target, options.training, options.test))
    elif options.command == "demo":
        print(demo(options.folder))
    elif options.command == "travel_size":
        sizes = travel_bytes(REPO_ROOT, options.carry)
        total = sum(sizes.values())
        for name, size in sizes.items():
            print(f"{name}: {size / 2**20:.1f} MiB")
        print(f"total: {total / 2**20:.1f} MiB of the device tool's {TRAVEL_LIMIT_MIB} MiB")
        if total > TRAVEL_LIMIT_MIB * 2**20:
            sys.exit("gpu_session: too large to travel; carry fewer la_mri cases (GPU_SESSION_TEST_CASES).")
    elif options.command == "check":
        sys.exit(check(options.device_json, options.require_cuda))
    else:
        print(summarize(options.work, options.out, options.mode, options.paper_epochs_total))


if __name__ == "__main__":
    main()
