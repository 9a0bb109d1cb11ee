"""
The VoxShield protocol and its baselines on the real LGE-MRI data of ../shared/data/la_mri, sized
for a 2-core CPU:

1. a 3D UNet victim trained on the clean training cases, scored on the 20 clean test cases;
2. for each run (VoxShield and its ablations without L_SPD / L_ISC, then the baselines EM, TAP,
   LSP, SEP, PUE, UMed and the random-noise control): fit the method on the 80 training cases
   (`run training --method M`), protect them (`run protect --method M`), train each victim of
   --victims (same recipe, same seed) on the protected copy and score it on the clean test cases;
3. the paper's tables from all the result files in --results_dir, and the Fig. 3-style figures from
   VoxShield's copy (run ``full``) when --work_dir holds it.

Five more runs exist for the protection target's investigation (issue 3), run only when named in
--runs: ``roi_dilation2`` (VoxShield on the label dilated by 2 voxels), ``eps16`` (VoxShield with a
4x larger bound, 16/255: a positive control, not a setting to publish with),
``untrained_surrogate`` (``--surrogate_steps 0``: the generator fitted against a surrogate that
never trains), ``authors_schedule`` (``--surrogate_batches_per_epoch 10``: the surrogate trained on
10 batches per epoch, as in the authors' code, the generator on all of them) and
``authors_schedule_100`` (the same for the paper's 100 epochs). --victim_seeds trains every victim
once per seed, to measure how much a single run's score varies.

--countermeasures trains every victim after each exploiter's step (evaluate's --countermeasure). PGD
adversarial training (pgd_at) attacks a protected copy at the copy's own bound, so the clean victim it
is compared with is trained under PGD-AT once per distinct bound of the runs' copies (clean_steps):
``clean_pgd_at`` at train.json's 4/255, ``clean_pgd_at_epsN`` at N/255 (e.g. clean_pgd_at_eps16).

Every step is the bundle command a user would run. Result files, tables, figures and
``benchmark.json`` (each command with its wall time, peak memory and exit code, hardware, versions) go to
``--results_dir`` (default benchmarks/results/la_mri); checkpoints and protected volumes go to
``--work_dir`` (default benchmarks/work, which git and docker ignore), never into a committed folder; the record and the result
files name paths relative to the repository (../shared/data/la_mri) and the interpreter ``python``
(normalise_paths, which also rewrote the files committed before). With --resume, a step
whose output already exists (a protected copy with its manifest, a results.json) is skipped and
listed as reused, so a grid can be split over several invocations.

    python benchmarks/la_mri_benchmark.py [--runs full,no_spd,no_isc,em,...] [--victims unet,...] \
        [--countermeasures none,z_smooth,nnunet_aug,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from custom.bundle_utils import config_files, shared_defaults  # noqa: E402
from custom.provenance import hardware, software_versions  # noqa: E402

DATA = REPO_ROOT.parent / "shared" / "data" / "la_mri"
PEAK_RSS = Path(__file__).resolve().with_name("peak_rss.py")  # runs every step, to measure its peak memory
BUNDLE = "voxshield_brats"
DEFAULT_EPS = shared_defaults(("eps",), ())["eps"]  # configs/train.json's: the bound of a run without --eps
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
    # issue 14: VoxShield fitted through nnU-Net's augmentation (custom.augmentation, an expectation over the
    # exploiter's flips, affine resampling, intensity changes, noise and blur), so its shortcut is one that
    # survives the augmenting victim that ignores the paper's noise; not the paper's method
    "voxshield_eot": ("voxshield", ["--fit_augmentation", "true"], []),
    # a bound sweep of the training-free noises: at which eps does a label-coded pattern (LSP, the carrier)
    # or a label-shaped texture (random) start to keep the victim from learning? And of EM's learned noise,
    # the literature's strongest sample-wise poison, at the bounds where the hand-made patterns start to work
    **{f"{method}_eps{level}": (method, [], ["--eps", repr(level / 255)])
       for method in ("lsp", "random", "carrier", "em") for level in (16, 32, 64)},
    # issue 14's label-coded carriers beyond the frontier's default (la_mri_frontier.py --methods carrier:
    # the in-plane checkerboard, phase-coded): the label plus a 3-voxel band of opposite phase at 8/255,
    # a period-4 square wave of secret in-plane orientation over the whole volume at 4/255, and (as UnSeg
    # splits its budget in 2D) 8/255 on the label with a quarter of that, 2/255, over the rest of the volume
    "carrier_band3_eps8": ("carrier", [], ["--roi_dilation", "3", "--eps", repr(8 / 255)]),
    "carrier_volume_eps8_outside2": ("carrier", [], ["--eps", repr(8 / 255), "--mask_roi", "false",
                                                     "--carrier_outside_amplitude", "0.25"]),
    "carrier_p4_volume_eps4": ("carrier", [], ["--carrier_period", "4", "--carrier_orientation", "random",
                                               "--mask_roi", "false"]),
    # the in-plane carrier on the label at 16/255 with longer periods (diagonal stripes of 4 and 8 voxels),
    # which interpolation, blur and low-resolution simulation in nnU-Net's augmentation damp less than the
    # Nyquist checkerboard they undo
    **{f"carrier_p{period}_eps16": ("carrier", [], ["--carrier_period", str(period), "--eps", repr(16 / 255)])
       for period in (4, 8)},
    # ... and the period-4 carrier at larger bounds (what budget does it need to survive nnU-Net's augmentation?)
    # and at 14/255, the largest bound on the label that keeps the copy above 35 dB (issue 14's first target)
    **{f"carrier_p4_eps{level}": ("carrier", [], ["--carrier_period", "4", "--eps", repr(level / 255)])
       for level in (14, 24, 32)},
    # ... and dots: discs of 4 voxels across every 8 voxels in-plane (rods along z), the full bound on a fifth
    # of the label, so 32/255 costs about the PSNR of 16/255 saturated; a disc stays a disc under flips and
    # rotations, and blur or a coarser resolution dims it without changing its shape
    "carrier_dots_p8_eps32": ("carrier", [], ["--carrier_period", "8", "--carrier_orientation", "dots",
                                              "--eps", repr(32 / 255)]),
    # ... and the isotropic texture of period 4 (custom.carriers, orientation "isotropic"): no direction for
    # flips and rotations to turn, the first carrier meant to survive nnU-Net's augmentation
    "carrier_isotropic_p4_eps16": ("carrier", [], ["--carrier_period", "4", "--carrier_orientation", "isotropic",
                                                   "--eps", repr(16 / 255)]),
    # ... and the carrier of frequency zero: the label 16/255 brighter (darker), an offset that moves with
    # the label through every flip, rotation, zoom, blur and resolution change of that augmentation
    "carrier_constant_eps16": ("carrier", [], ["--carrier_orientation", "constant", "--eps", repr(16 / 255)]),
    "carrier_constant_darker_eps16": ("carrier", [], ["--carrier_orientation", "constant", "--carrier_polarity", "-1",
                                                      "--eps", repr(16 / 255)]),
    # ... and period-8 stripes whose direction, phase and period (8 x 0.7-1.4) each case draws for itself:
    # nnU-Net's intensity steps leave a fixed period-8 carrier working (30% of clean) but its rotation and
    # scaling undo it (66%); a victim that learns stripes of every direction and period may keep them
    "carrier_per_case_p8_eps16": ("carrier", [], ["--carrier_period", "8", "--carrier_orientation", "per_case",
                                                  "--eps", repr(16 / 255)]),
    # issue 14's learned noise aimed at fresh victims: VoxShield's generator at 16/255 with the bound
    # saturated (no tanh), fitted through nnU-Net's augmentation against a surrogate re-initialised every
    # 40 steps (an epoch), L_ISC off (its inter-slice flicker is what z-smoothing removes), L_SPD kept
    "voxshield_fresh_eps16": ("voxshield", ["--fit_augmentation", "true", "--surrogate_restart_every", "40",
                                            "--lambda_isc", "0"], ["--eps", repr(16 / 255), "--squash", "none"]),
    # issue 14's per-label convolution (CUDA-style, custom.protectors.LabelConvolution): the label's texture
    # filtered by a secret 3x3x3 kernel, unclipped (eps 1); blur 0.3 (the default, 38.04 dB on la_mri) and
    # 3 (close to a random 3^3 average, 36.23 dB)
    "convolution": ("convolution", [], ["--eps", "1.0"]),
    "convolution_blur3": ("convolution", [], ["--eps", "1.0", "--convolution_blur", "3.0"]),
    # ... and a 5x5x5 kernel at blur 1 (33.08 dB): the price of a stronger texture change on the frontier
    "convolution_k5_blur1": ("convolution", [], ["--eps", "1.0", "--convolution_kernel_size", "5",
                                                 "--convolution_blur", "1.0"]),
}
PROTOCOL = ["full", "no_spd", "no_isc", "random", "lsp", "em", "tap", "umed", "sep", "pue"]
BASELINE_SURROGATE = '--surrogate_def#channels "[16,32,64,128,256]" --surrogate_def#num_res_units 1'


def bundle(run_id: str, *args: str, overlays: Sequence[str] = (),
           launcher: Sequence[str] = (sys.executable,)) -> list[str]:
    """
    `python -m monai.bundle run RUN_ID ARGS` of the brats bundle, its configs named relative to the
    repository, then ``overlays`` (configs layered last, e.g. configs/multi_gpu_train.json); ``launcher``
    runs the module (torchrun: ``python -m torch.distributed.run --nproc_per_node=2 ...``).
    """
    configs = [Path(path).relative_to(REPO_ROOT).as_posix() for path in config_files(BUNDLE, run_id)]
    return [*launcher, "-m", "monai.bundle", "run", run_id, "--config_file", repr([*configs, *overlays]), *args]


# ---- paths in committed files ---------------------------------------------------------------------
def local_replacements() -> dict[str, str]:
    """This machine's absolute paths and what committed files name them: the repository root ".", the
    folder holding it ".." (so the data reads ../shared/data/la_mri), the Python interpreter "python"."""
    return {str(REPO_ROOT): ".", str(REPO_ROOT.parent): "..", sys.executable: "python"}


def relative_text(text: str, replacements: dict[str, str]) -> str:
    """
    ``text`` with every absolute path that starts with a key of ``replacements`` rewritten to start
    with its value instead ("." is dropped before the rest of a path: /repo/benchmarks -> benchmarks).

    Args:
        text: any text, e.g. a JSON document or a shell command.
        replacements: absolute path -> its replacement; a longer path is tried before a shorter one,
            and only whole path components match (/work does not match /workspace or /tmp/work).
    """
    for prefix in sorted(replacements, key=len, reverse=True):
        replacement = replacements[prefix]
        start = r"(?<![\w./-])" + re.escape(prefix.rstrip("/"))
        text = re.sub(start + "/", "" if replacement == "." else replacement.rstrip("/") + "/", text)
        text = re.sub(start + r"(?![\w.-])", replacement, text)
    return text


def normalise_paths(folder: Path, replacements: dict[str, str]) -> list[Path]:
    """
    Rewrite the absolute paths in the JSON and Markdown files under ``folder`` (see relative_text);
    numbers and everything else stay as written, and a JSON file must still parse afterwards.

    Returns:
        the files that changed.
    """
    changed = []
    for path in sorted([*folder.rglob("*.json"), *folder.rglob("*.md")]):
        text = path.read_text()
        rewritten = relative_text(text, replacements)
        if rewritten != text:
            if path.suffix == ".json":
                json.loads(rewritten)
            path.write_text(rewritten)
            changed.append(path)
    return changed


# ---- steps ------------------------------------------------------------------------------------------
class Steps:
    """
    The steps of one benchmark invocation, each a command run from the repository root, and its record
    ``RESULTS/RECORD``: every command with its wall time, peak resident memory and exit code (or the
    output it reused), the options, hardware, versions and total wall time, rewritten after every step.
    The record and every JSON or Markdown file under RESULTS name paths relative to the repository
    (``replacements``, by default local_replacements).

    Args:
        results: the results folder (created).
        record: file name of the record in ``results``.
        data: the dataset the steps run on.
        options: the invocation's parsed options, recorded as given.
        resume: skip a step whose output already exists (it is listed as reused).
    """

    def __init__(self, results: Path, record: str, data: Path, options: argparse.Namespace, resume: bool) -> None:
        self.results, self.record, self.data, self.options, self.resume = results, record, data, options, resume
        self.steps: list[dict] = []
        self.started = time.perf_counter()
        self.replacements = local_replacements()
        results.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, command: list[str], output: Path | None = None, log: Path | None = None) -> dict:
        """
        Run ``command`` (or reuse ``output`` under --resume); exits the benchmark when it fails.

        Args:
            name: the step's name in the record.
            command: the command, run from the repository root.
            output: what the step makes, for --resume.
            log: a file that takes the command's output (stdout and stderr) instead of the terminal.

        Returns:
            the step's entry in the record; ``peak_rss_mib`` is the command's peak resident memory, the
            largest of its process and of the processes it waited for (see peak_rss.py, which runs it).
        """
        if self.resume and output is not None and output.exists():
            self.steps.append({"step": name, "command": shlex.join(command), "reused": str(output)})
            return self.steps[-1]
        print(f"== {name}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        with tempfile.NamedTemporaryFile("r") as peak, \
                open(log, "w") if log is not None else contextlib.nullcontext() as stream:
            completed = subprocess.run([sys.executable, str(PEAK_RSS), peak.name, *command], cwd=REPO_ROOT,
                                       stdout=stream, stderr=subprocess.STDOUT if log is not None else None)
            peak_kilobytes = int(peak.read() or 0)  # empty when the launcher itself failed
        self.steps.append({"step": name, "command": shlex.join(command), "exit_code": completed.returncode,
                           "wall_time_s": round(time.perf_counter() - start, 1),
                           "peak_rss_mib": round(peak_kilobytes / 1024, 1)})
        self.write()
        if completed.returncode:
            tail = f"; the end of its output ({log}):\n{log.read_text()[-3000:]}" if log is not None else ""
            sys.exit(f"{name} failed with exit code {completed.returncode}{tail}")
        return self.steps[-1]

    def skip(self, name: str, reason: str) -> None:
        """List a step that the benchmark decided not to run, with the reason."""
        self.steps.append({"step": name, "skipped": reason})

    def summary(self) -> dict:
        """The record as it stands (paths as given; write makes them relative)."""
        return {"data": str(self.data), "options": vars(self.options), "steps": self.steps, "hardware": hardware(),
                "software": software_versions(), "total_wall_time_s": round(time.perf_counter() - self.started, 1)}

    def write(self) -> None:
        """Write the record, then make the paths of every result file relative."""
        (self.results / self.record).write_text(json.dumps(self.summary(), indent=1))
        normalise_paths(self.results, self.replacements)


def add_location_arguments(parser: argparse.ArgumentParser, results_dir: Path, record: str) -> None:
    """Where a benchmark reads and writes: --data (default la_mri), --results_dir (default ``results_dir``)
    and --record, the file name of its record there (default ``record``)."""
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--results_dir", default=str(results_dir))
    parser.add_argument("--record", default=record, help="file name, in --results_dir, of this invocation's record")


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Extra overrides of the bundle commands a benchmark runs: --generator_args for VoxShield's training
    runs, --victim_args for evaluate's."""
    parser.add_argument("--generator_args", default="",
                        help="extra overrides for every VoxShield training run (a run's own override wins)")
    parser.add_argument("--victim_args", default="",
                        help="extra overrides of every victim's evaluate run (e.g. a smaller --patch_size on tiny data)")


def add_protocol_arguments(parser: argparse.ArgumentParser, record: str) -> None:
    """The options every la_mri benchmark shares: where things are, fitting and victim lengths, resuming,
    and the record's file name (default ``record``)."""
    add_location_arguments(parser, REPO_ROOT / "benchmarks" / "results" / "la_mri", record)
    add_override_arguments(parser)
    parser.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "work"))
    parser.add_argument("--generator_epochs", type=int, default=10, help="VoxShield fitting epochs")
    parser.add_argument("--baseline_epochs", type=int, default=5, help="surrogate fitting epochs of the baselines")
    parser.add_argument("--victim_epochs", type=int, default=15)
    parser.add_argument("--victim_seeds", default="0",
                        help="comma-separated victim seeds; each victim is trained once per seed (the tables average them)")
    parser.add_argument("--baseline_args", default=BASELINE_SURROGATE,
                        help="extra overrides of training and protect for the baselines; by default a lighter "
                             "surrogate (16..256 channels, 1 residual unit) to fit the CPU budget")
    parser.add_argument("--resume", action="store_true", help="skip steps whose outputs exist")
    parser.add_argument("--skip_clean", action="store_true", help="no clean victim (an earlier result is kept)")


def start(options: argparse.Namespace) -> Steps:
    """The steps of an invocation with the options of add_protocol_arguments, once --data is found."""
    data = Path(options.data)
    if not (data / "dataset.json").is_file():
        sys.exit(f"{data}: la_mri not found (it lives in ../shared/data beside the repository).")
    return Steps(Path(options.results_dir), options.record, data, options, options.resume)


def protect_run(steps: Steps, options: argparse.Namespace, run: str, method: str, training_only: list[str],
                perturbation: list[str]) -> Path:
    """
    Fit ``method`` on the training cases of --data and protect them (skipped under --resume when the
    copy's manifest exists).

    Args:
        steps: the invocation's steps.
        options: the parsed options of add_protocol_arguments.
        run: the run's name: its folder in --work_dir (RUN/ckpt, RUN/logs, RUN/protected).
        method: the protection method (``--method``).
        training_only: overrides of training alone.
        perturbation: overrides of training and protect alike (e.g. ``--eps``, ``--mask_roi``).

    Returns:
        the protected copy's folder.
    """
    data, work = Path(options.data), Path(options.work_dir)
    ckpt, protected = work / run / "ckpt", work / run / "protected"
    if method == "voxshield":
        epochs, shared = options.generator_epochs, []
        training_only = [*shlex.split(options.generator_args), *training_only]
    else:
        epochs, shared = options.baseline_epochs, shlex.split(options.baseline_args)
    shared = [*shared, "--method", method, *perturbation]
    done = protected / "voxshield_manifest.json"
    if not (options.resume and done.exists()):
        steps.run(f"fit {run}", bundle(
            "training", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
            "--log_dir", str(work / run / "logs"), "--epochs", str(epochs), *shared, *training_only))
    steps.run(f"protect {run}", bundle(
        "protect", "--dataset_dir", str(data), "--lists", "['training']", "--ckpt_dir", str(ckpt),
        "--output_dir", str(protected), "--overwrite", "true", *shared), done)
    return protected


def copy_eps(run: str) -> float:
    """The bound of run ``run``'s protected copy: the ``--eps`` of its RUNS perturbation overrides, else
    train.json's. protect records this value as the manifest's eps_normalised, the bound evaluate's
    pgd_at attacks the copy at; unlike the manifest, it is known before anything runs (--baseline_args
    is assumed not to set --eps)."""
    perturbation = RUNS[run][2]
    return float(perturbation[perturbation.index("--eps") + 1]) if "--eps" in perturbation else DEFAULT_EPS


def clean_steps(runs: Sequence[str], countermeasures: Sequence[str | None]) -> list[tuple[str | None, float | None]]:
    """
    The exploiter's steps to train the clean victims after, so that every copy has a clean reference
    that went through the same step: each of ``countermeasures`` once, but pgd_at once per distinct
    bound of the runs' copies (copy_eps; train.json's alone when there are no runs).

    Args:
        runs: run names of RUNS.
        countermeasures: evaluate's --countermeasure values, None for no step.

    Returns:
        (countermeasure, PGD-AT bound or None) pairs, the bounds of pgd_at smallest first.
    """
    bounds = sorted({copy_eps(run) for run in runs} or {DEFAULT_EPS})
    return [(step, eps) for step in countermeasures for eps in (bounds if step == "pgd_at" else [None])]


def victim_results(results: Path, run: str, victim: str, seed: int, countermeasure: str | None = None,
                   pgd_at_eps: float | None = None) -> Path:
    """The result folder of ``victim`` (seed ``seed``) trained on run ``run``: RUN, RUN_VICTIM for
    another victim than the UNet, RUN_COUNTERMEASURE for a victim trained after an exploiter's step
    (evaluate's --countermeasure), then _epsN for PGD-AT at a bound ``pgd_at_eps`` other than
    train.json's (N: eps x 255), with _seedN for another seed than 0."""
    step = [countermeasure] if countermeasure else []
    if pgd_at_eps is not None and not math.isclose(pgd_at_eps, DEFAULT_EPS):
        step.append(f"eps{pgd_at_eps * 255:.3g}")
    folder = "_".join([run] + ([victim] if victim != "unet" else []) + step)
    return results / (folder if seed == 0 else f"{folder}_seed{seed}")


def victim_run(steps: Steps, options: argparse.Namespace, run: str, method: str, train_dir: Path, victim: str,
               seed: int, countermeasure: str | None = None, pgd_at_eps: float | None = None) -> Path:
    """
    Train ``victim`` (evaluate.json's recipe for --victim_epochs, seed ``seed``, with --victim_args,
    after ``countermeasure`` when given, PGD-AT at ``pgd_at_eps`` when given instead of the copy's
    bound) on ``train_dir`` and score it on the clean test cases of --data (skipped under --resume
    when its results.json exists).

    Returns:
        the results.json.
    """
    output = victim_results(Path(options.results_dir), run, victim, seed, countermeasure, pgd_at_eps)
    step = ["--countermeasure", countermeasure] if countermeasure else []
    step += ["--pgd_at_eps", repr(pgd_at_eps)] if pgd_at_eps is not None else []
    label = f", {countermeasure}" if countermeasure else ""
    label += f" at {pgd_at_eps * 255:.3g}/255" if pgd_at_eps is not None else ""
    steps.run(f"{victim} victim (seed {seed}{label}) on {run}", bundle(
        "evaluate", "--train_dir", str(train_dir), "--test_dir", str(options.data), "--epochs",
        str(options.victim_epochs), "--victim", victim, "--seed", str(seed), "--method", method,
        "--output_dir", str(output), *step, *shlex.split(options.victim_args)), output / "results.json")
    return output / "results.json"


def report_run(steps: Steps, options: argparse.Namespace) -> None:
    """The report over every result in --results_dir, with the figures (comparison.png, perturbation.png)
    of VoxShield's copy (run ``full``) when --work_dir holds it; without it the figures already in
    --results_dir are kept, so they always show the paper's method, whichever runs an invocation names."""
    results, full = Path(options.results_dir), Path(options.work_dir) / "full" / "protected"
    figures = ["--clean_dir", str(options.data), "--protected_dir", str(full)] if full.is_dir() else []
    steps.run("report", bundle("report", "--results", repr([str(results)]), "--output_dir", str(results), *figures))


def seeds(options: argparse.Namespace) -> list[int]:
    """The victim seeds of --victim_seeds."""
    return [int(seed) for seed in options.victim_seeds.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser, record="benchmark.json")
    parser.add_argument("--runs", default=",".join(PROTOCOL),
                        help="comma-separated, from " + ",".join(RUNS) + '; "" trains the clean victims only')
    parser.add_argument("--victims", default="unet", help="comma-separated victims (evaluate.json --victim)")
    parser.add_argument("--countermeasures", default="none",
                        help="comma-separated evaluate.json --countermeasure values each victim is trained after; none: no step")
    options = parser.parse_args()
    runs = [run for run in options.runs.split(",") if run]  # --runs "": the clean victims alone
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")

    steps = start(options)
    steps_before = [None if step == "none" else step for step in options.countermeasures.split(",")]
    names = options.victims.split(",")
    victims = [(name, seed, step) for name in names for step in steps_before for seed in seeds(options)]
    if not options.skip_clean:
        for name in names:
            for step, eps in clean_steps(runs, steps_before):
                for seed in seeds(options):
                    victim_run(steps, options, "clean", "clean", steps.data, name, seed, step, eps)
    for run in runs:
        method, training_only, perturbation = RUNS[run]
        protected = protect_run(steps, options, run, method, training_only, perturbation)
        for name, seed, step in victims:
            victim_run(steps, options, run, method, protected, name, seed, step)
    report_run(steps, options)
    print(json.dumps(steps.summary()["steps"], indent=1))


if __name__ == "__main__":
    main()
