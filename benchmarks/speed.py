"""
Speed and memory of VoxShield's workflows (issue 15), measured in one run on one machine. Four parts,
each chosen with --parts (default: all of them, in this order):

- ``fit``: seconds per VoxShield fit iteration (VoxShield.fit_step), its surrogate part
  (VoxShield.fit_surrogate) and its generator part (VoxShield.fit_generator) timed apart, at each
  cube side of --patch_sizes, batch 2, with the networks, losses and optimisers that configs/train.json
  declares for --data (generator UNet 16..128 with 1 residual unit, surrogate UNet 32..512 with 2), on
  a fixed random batch: --warmup iterations left out, then the median and mean of --iterations. Each
  iteration also times a reference generator step that mimics the authors' (reference_generator_step),
  and the part reports our generator step's median over the reference's. --amp chooses the precision:
  ``auto`` (default) is train.json's own choice (mixed precision where CUDA is available), ``on`` and
  ``off`` force it, ``both`` measures each patch size in float32 and then with mixed precision (one row
  each; on a CPU "on" is torch's bfloat16 autocast, slow, for testing the option only).
- ``protect``: seconds per case of `run protect` (the command's wall time over the number of cases,
  so the start of the command is included, as a user sees it) with the training-free ``--method
  random`` and with ``voxshield`` and a freshly initialised generator, both with OMP_WAIT_POLICY=PASSIVE
  as `voxshield protect` runs them (with --compare_wait_policy voxshield again without it), and protect's
  generator alone on one window (generator_on_one_window), against reading the same
  files with nibabel and writing what protect writes (nibabel_round_trip; in this process, so
  without a start), on --data (its first --cases cases when given) and on a thick-slice dataset made
  from the demo phantom (thick_slice_dataset). Reports protect's time over nibabel's.
- ``memory``: peak resident memory (RSS, of the command's largest process: benchmarks/peak_rss.py) of
  training (1 epoch), protect (the checkpoint that training wrote) and evaluate (1 epoch) on the first
  N cases of --data (plus --memory_test_cases held-out cases for evaluate) for each N of
  --memory_cases, training and evaluate with their default cache_rate (the value chosen is recorded)
  and with --cache_rate 0.
- ``multiprocess``: training samples per second with configs/multi_gpu_train.json in 2 processes
  (torchrun, gloo on the CPU, batch 1 and --threads / 2 threads each, at least 1) against 1 process
  (batch 2, --threads threads), on --multiprocess_cases cases for --multiprocess_epochs epochs, from
  the epoch times that training logs (the first epoch left out when there are more).

Every command runs on --threads threads (OMP_NUM_THREADS, shown in the recorded command; the fit part
sets torch's thread count). Results go to --results_dir (default benchmarks/results/speed): --record
(default speed.json: each part's measurements with the invocation that measured them, its wall time,
hardware and versions, and every command with its wall time and peak RSS, la_mri_benchmark.Steps) and
the same as Markdown tables in speed.md. Subsets, checkpoints and protected copies go to a temporary
folder, deleted at the end, which the record names TMP/...; other paths are relative to the
repository (../shared/data/la_mri, python for the interpreter). With --resume the parts that an
earlier invocation recorded are kept and only those named in --parts are measured again. Take the
timings on a machine doing nothing else.

    python benchmarks/speed.py [--parts fit,protect,memory,multiprocess] [--data ../shared/data/la_mri] \\
        [--patch_sizes 64,96] [--amp auto|on|off|both] [--cases N] [--memory_cases 16,80] [--resume]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gzip
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser

from la_mri_benchmark import (
    BUNDLE, REPO_ROOT, Steps, add_location_arguments, add_override_arguments, bundle,
)
# la_mri_benchmark put the repository on sys.path
from custom.bundle_utils import config_files, network_record, shared_defaults
from custom.data import open_dataset
from custom.demo import FLARE_SPACING, make_demo_dataset
from custom.inferers import fitted_window, with_onednn_convolutions
from custom.markdown import markdown_table
from custom.nifti_io import GZIP_LEVEL, VoxShieldInputError
from custom.provenance import hardware, software_versions
from custom.voxshield import VoxShield

PARTS = ("fit", "protect", "memory", "multiprocess")
PROFILED_OPERATORS = 6  # the fit part's profile lists the operators with the most self time
BATCH_SIZE = 2  # the fit part's batch, and the multiprocess part's total batch
AMP_SETTINGS = {"auto": (None,), "on": (True,), "off": (False,), "both": (False, True)}  # --amp -> fit's rows' amp
# the protect part's rows: name -> (--method, OMP_WAIT_POLICY); `voxshield protect` sets PASSIVE (custom/cli.py),
# `python -m monai.bundle run protect` leaves OpenMP's default (idle workers spin) unless the user sets it;
# the rows with None (the variable removed) run with --compare_wait_policy only
PROTECT_RUNS = {"random": ("random", "PASSIVE"), "voxshield": ("voxshield", "PASSIVE"),
                "voxshield, OMP_WAIT_POLICY unset": ("voxshield", None)}
CACHE_SETTINGS = {"default": [], "off": ["--cache_rate", "0"]}  # the memory part's: name -> overrides
MULTI_GPU_TRAIN = "configs/multi_gpu_train.json"
EPOCH_TIME = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")  # ignite's line per epoch
CHOSEN_CACHE_RATE = re.compile(r"cache_rate ([\d.]+): caching")  # custom.caching's line


# ---- helpers ----------------------------------------------------------------------------------------
def with_environment(command: list[str], **variables: object) -> list[str]:
    """``command`` run through env(1) with ``variables`` set (those given as None removed from the
    environment), so that the recorded command shows them."""
    removed = [option for name, value in variables.items() if value is None for option in ("-u", name)]
    return ["env", *removed, *(f"{name}={value}" for name, value in variables.items() if value is not None), *command]


def statistics_of(seconds: Sequence[float]) -> dict:
    """The median and mean of timings, and the timings themselves."""
    return {"median": statistics.median(seconds), "mean": statistics.fmean(seconds), "values": list(seconds)}


def dataset_subset(source: Path, target: Path, training: int, test: int = 0) -> Path:
    """
    An MSD copy, in ``target``, of the first ``training`` + ``test`` labelled cases of ``source`` (any
    layout custom.data reads, its cases in their order there): the first ``training`` in its "training"
    list, the others in its "test" list. Files keep their relative paths and the channel (modality)
    names are kept, so the default normalisation follows them as for the source (a copy written by
    ``voxshield regrid`` loses the record that makes its default ``none``).
    """
    spec = open_dataset(source)
    cases = spec.cases[: training + test]
    if len(cases) < training + test:
        sys.exit(f"{source}: {len(spec.cases)} labelled cases, fewer than the {training + test} asked for.")
    for case in cases:
        for name in [*case.images, case.label]:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, target / name)
    entries = [{"image": case.images if len(case.images) > 1 else case.images[0], "label": case.label}
               for case in cases]
    meta = {"name": f"{spec.name}, first {len(cases)} cases",
            "modality": {str(index): name for index, name in enumerate(spec.channel_names)},
            "labels": {str(value): name for value, name in spec.labels.items()},
            "training": entries[:training], "test": entries[training:]}
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    return target


def training_config(dataset: Path) -> ConfigParser:
    """The ConfigParser of the training workflow (the bundle's bundle.json and configs/train.json) on ``dataset``."""
    parser = ConfigParser()
    parser.read_config(config_files(BUNDLE, "training"))
    parser["dataset_dir"] = str(dataset)
    return parser


# ---- fit ---------------------------------------------------------------------------------------------
def finish(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device runs asynchronously), so that a clock read
    afterwards times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable, *args) -> float:
    """The seconds ``function(*args)`` takes, its work on ``device`` included."""
    start = time.perf_counter()
    function(*args)
    finish(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def timed_methods(instance: torch.nn.Module, names: Sequence[str], device: torch.device) -> Iterator[dict[str, float]]:
    """Inside the block, the methods ``names`` of ``instance`` add the seconds their calls take to the
    dict yielded (name -> seconds); afterwards they are the class's methods again."""
    seconds = dict.fromkeys(names, 0.0)

    def timing(name: str, method: Callable) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                finish(device)
                seconds[name] += time.perf_counter() - start
        return call

    for name in names:
        setattr(instance, name, timing(name, getattr(instance, name)))
    try:
        yield seconds
    finally:
        for name in names:
            delattr(instance, name)


def reference_generator_step(protector: VoxShield, image: torch.Tensor, label: torch.Tensor, roi: torch.Tensor) -> dict:
    """
    A generator step that mimics the authors' procedure, for comparison: issue 15 says theirs runs two
    forward passes more than ours (VoxShield.fit_generator) and gives their number, not their form.
    Here they are the generator's protected batch and the surrogate's logits on it, each computed once
    more without gradients before our step; they feed nothing, so the update and the losses are ours.
    """
    with torch.no_grad(), protector.autocast(image.device):
        protected, _ = protector.perturbation(image, protector.generator(image), roi)
        protector.surrogate(protected)
    return protector.fit_generator(image, label, roi)


def generator_step_profile(protector: VoxShield, image: torch.Tensor, label: torch.Tensor, roi: torch.Tensor) -> dict:
    """
    Where one generator step (VoxShield.fit_generator) spends its time, from torch.profiler: the
    seconds of each phase the step labels (``voxshield.*``: clean forward, generator forward,
    surrogate forward with the losses, backward with the update; main-thread time, so wall time on
    the CPU) and the PROFILED_OPERATORS operators with the most self time.
    """
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if image.is_cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        protector.fit_generator(image, label, roi)
    events = profiler.key_averages()
    phases = {event.key.removeprefix("voxshield."): event.cpu_time_total / 1e6
              for event in events if event.key.startswith("voxshield.")}
    operators = sorted((event for event in events if not event.key.startswith("voxshield.")),
                       key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILED_OPERATORS]
    return {"phases_s": phases, "step_s": sum(phases.values()),
            "top_operators": [{"name": event.key, "calls": event.count, "self_s": event.self_cpu_time_total / 1e6}
                              for event in operators]}


def random_batch(channels: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of BATCH_SIZE cubic patches: intensities uniform in [0, 1], and a label whose
    centre cube of half the side is class 1, the rest background."""
    shape = (BATCH_SIZE, channels, side, side, side)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    label = torch.zeros((BATCH_SIZE, 1, side, side, side))
    label[..., side // 4: side // 4 + side // 2, side // 4: side // 4 + side // 2, side // 4: side // 4 + side // 2] = 1
    return image.to(device), label.to(device)


def fit_timings(data: Path, side: int, warmup: int, iterations: int, amp: bool | None = None) -> dict:
    """
    Seconds per VoxShield fit iteration at patch side**3 (see the module's docstring), with the
    networks, losses and optimisers that configs/train.json builds for ``data``, in mixed precision
    when ``amp`` is True, in float32 when False, as train.json chooses when None.
    """
    started = time.perf_counter()
    parser = training_config(data)
    if amp is not None:
        parser["amp"] = amp
    torch.manual_seed(0)
    protector = parser.get_parsed_content("protectors#voxshield")
    device = parser.get_parsed_content("device")
    image, label = random_batch(protector.generator.in_channels, side, device)
    roi = protector.support(label)
    seconds = {"iteration": [], "surrogate_step": [], "generator_step": [], "reference_generator_step": []}
    for iteration in range(warmup + iterations):
        with timed_methods(protector, ("fit_surrogate", "fit_generator"), device) as parts:
            step = timed(device, protector.fit_step, image, label)
        reference = timed(device, reference_generator_step, protector, image, label, roi)
        if iteration >= warmup:
            for name, value in (("iteration", step), ("surrogate_step", parts["fit_surrogate"]),
                                ("generator_step", parts["fit_generator"]), ("reference_generator_step", reference)):
                seconds[name].append(value)
    timings = {name: statistics_of(values) for name, values in seconds.items()}
    return {
        "patch_size": [side] * 3, "device": str(device), "amp": protector.amp,
        "seconds": timings,
        "generator_over_reference": timings["generator_step"]["median"] / timings["reference_generator_step"]["median"],
        "generator_step_profile": generator_step_profile(protector, image, label, roi),
        "networks": {"generator": network_record(protector.generator),
                     "surrogate": network_record(protector.surrogate)},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def measure_fit(record: SpeedRecord, options: argparse.Namespace, work: Path) -> dict:
    """The fit part: fit_timings at each side of --patch_sizes, for each precision that --amp names."""
    sides = [int(side) for side in options.patch_sizes.split(",")]
    return {"batch_size": BATCH_SIZE, "warmup": options.warmup, "iterations": options.iterations,
            "torch_threads": torch.get_num_threads(), "amp_setting": options.amp,
            "patch_sizes": [fit_timings(record.data, side, options.warmup, options.iterations, amp)
                            for side in sides for amp in AMP_SETTINGS[options.amp]]}


# ---- protect ---------------------------------------------------------------------------------------------
def thick_slice_dataset(folder: Path, cases: int, shape: Sequence[int], slice_mm: float) -> Path:
    """
    A thick-slice dataset from the demo phantom (custom.demo, FLARE layout, slices FLARE_SPACING[2] =
    2.5 mm apart): ``cases`` volumes of ``shape`` voxels whose slices lie ``slice_mm`` apart, every k-th
    slice of a phantom k times as deep (k = slice_mm / 2.5; the affine's slice axis scaled by k).
    """
    step = round(slice_mm / FLARE_SPACING[2])
    if step < 1 or not math.isclose(step * FLARE_SPACING[2], slice_mm):
        sys.exit(f"--thick_slice_mm must be a multiple of the phantom's {FLARE_SPACING[2]} mm slices, got {slice_mm}.")
    rows, columns, slices = shape
    phantom = make_demo_dataset(folder / "phantom", "flare", cases, (rows, columns, slices * step))
    thick = folder / "thick_slices"
    for case in open_dataset(phantom).cases:
        for name in [*case.images, case.label]:
            source = nib.load(phantom / name)
            kept = np.asanyarray(source.dataobj)[..., ::step]
            (thick / name).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(kept, source.affine @ np.diag([1.0, 1.0, step, 1.0]), source.header), thick / name)
    return thick


def untrained_generator(dataset: Path, ckpt: Path) -> Path:
    """A freshly initialised VoxShield generator for ``dataset`` (configs/train.json's generator_def,
    seed 0), saved as the checkpoint protect loads; returns the checkpoint folder."""
    torch.manual_seed(0)
    ckpt.mkdir(parents=True, exist_ok=True)
    generator = training_config(dataset).get_parsed_content("generator_def")
    torch.save(generator.state_dict(), ckpt / VoxShield.checkpoint_name)
    return ckpt


def generator_on_one_window(dataset: Path, repeats: int = 10) -> dict:
    """
    Milliseconds (median of ``repeats``, after one untimed run) of protect's generator, freshly
    initialised, on the window protect fits to ``dataset``'s first case (batch 1, no gradients, this
    process's threads): as configs/train.json declares it (nn.Conv3d: PyTorch picks each convolution's
    kernel) and as configs/protect.json runs it (custom.inferers.OneDNNConv3d); and the largest
    difference between their outputs.
    """
    parser = ConfigParser()
    parser.read_config(config_files(BUNDLE, "protect"))
    parser["dataset_dir"] = str(dataset)
    spec = open_dataset(dataset)
    shape = nib.load(dataset / spec.cases[0].images[0]).shape[:3]
    window = fitted_window(shape, parser.get_parsed_content("window_size"),
                           math.prod(parser.get_parsed_content("generator_def#strides")))
    torch.manual_seed(0)
    plain = parser.get_parsed_content("generator_def").eval()
    onednn = with_onednn_convolutions(copy.deepcopy(plain))
    volume = torch.rand(1, len(spec.channel_names), *window)
    result = {"case_shape": list(shape), "window": list(window)}
    with torch.no_grad():
        for name, network in (("conv3d_ms", plain), ("onednn_conv3d_ms", onednn)):
            network(volume)
            result[name] = statistics.median(1000 * timed(torch.device("cpu"), network, volume) for _ in range(repeats))
        result["largest_difference"] = float((plain(volume) - onednn(volume)).abs().max())
    return result


def nibabel_round_trip(dataset: Path, output: Path) -> float:
    """
    Seconds to read every file of every case of ``dataset`` with nibabel (voxels decoded) and write
    into ``output`` what protect writes for the case: each image through nibabel, gzip-compressed at
    protect's level where its name ends in .gz, and each label copied byte for byte.
    """
    spec = open_dataset(dataset)
    start = time.perf_counter()
    for case in spec.cases:
        for name in [*case.images, case.label]:
            source = nib.load(dataset / name)
            values = np.asanyarray(source.dataobj)
            (output / name).parent.mkdir(parents=True, exist_ok=True)
            if name == case.label:
                shutil.copyfile(dataset / name, output / name)
                continue
            data = type(source)(values, source.affine, source.header).to_bytes()
            (output / name).write_bytes(gzip.compress(data, compresslevel=GZIP_LEVEL) if name.endswith(".gz") else data)
    return time.perf_counter() - start


def protect_step(record: SpeedRecord, options: argparse.Namespace, name: str, dataset: Path, ckpt: Path,
                 output: Path, method: str, wait_policy: str | None) -> float:
    """The wall seconds of one protect command (``name`` in the record) over ``dataset`` into ``output``,
    with OMP_WAIT_POLICY ``wait_policy`` (None: removed from the environment)."""
    step = record.run(name, with_environment(bundle(
        "protect", "--dataset_dir", str(dataset), "--ckpt_dir", str(ckpt), "--output_dir", str(output),
        "--method", method), OMP_NUM_THREADS=options.threads, OMP_WAIT_POLICY=wait_policy),
        log=output.parent / f"{output.name}.log")
    return step["wall_time_s"]


def protect_against_io(record: SpeedRecord, options: argparse.Namespace, description: str, dataset: Path,
                       work: Path) -> dict:
    """
    Protect's seconds per case on ``dataset`` (``description`` names it in the record) for each row of
    PROTECT_RUNS, nibabel's, and their ratios. A command's seconds per case include its start-up
    (imports, the bundle, the network: seconds, whatever the number of cases); for an archive the
    marginal seconds per case count, measured by a second command over the first tenth of the cases
    (at least one): (T(all) - T(first)) / (cases - first). A one-case dataset has no marginal cost.
    """
    cases = len(open_dataset(dataset).cases)
    ckpt = untrained_generator(dataset, work / "ckpt")
    first = max(1, cases // 10) if cases > 1 else None
    first_cases = dataset_subset(dataset, work / "first_cases", first) if first else None
    result = {"dataset": description, "cases": cases, "first_cases": first, "protect": {}}
    rows = [row for row, (_, wait_policy) in PROTECT_RUNS.items() if wait_policy or options.compare_wait_policy]
    for row in rows:
        method, wait_policy = PROTECT_RUNS[row]
        output = work / f"copy_{len(result['protect'])}"
        seconds = protect_step(record, options, f"protect {work.name} ({row})", dataset, ckpt, output, method, wait_policy)
        timing = {"method": method, "omp_wait_policy": wait_policy, "wall_time_s": seconds, "seconds_per_case": seconds / cases}
        if first_cases:
            seconds_first = protect_step(record, options, f"protect {work.name}, first {first} cases ({row})",
                                         first_cases, ckpt, output.with_name(f"{output.name}_first_cases"), method,
                                         wait_policy)
            timing.update(first_cases_wall_time_s=seconds_first,
                          marginal_seconds_per_case=(seconds - seconds_first) / (cases - first))
        result["protect"][row] = timing
    result["generator_window"] = generator_on_one_window(dataset)
    io_seconds = nibabel_round_trip(dataset, work / "nibabel")
    result["nibabel_io"] = {"wall_time_s": io_seconds, "seconds_per_case": io_seconds / cases}
    result["protect_over_io"] = {row: timing["seconds_per_case"] / result["nibabel_io"]["seconds_per_case"]
                                 for row, timing in result["protect"].items()}
    if first_cases:
        result["marginal_over_io"] = {
            row: timing["marginal_seconds_per_case"] / result["nibabel_io"]["seconds_per_case"]
            for row, timing in result["protect"].items()}
    return result


def measure_protect(record: SpeedRecord, options: argparse.Namespace, work: Path) -> dict:
    """The protect part: protect_against_io on --data (its first --cases cases when given) and on the
    thick-slice phantom."""
    data, data_description = record.data, str(record.data)
    if options.cases is not None:
        data = dataset_subset(record.data, work / "data_subset", options.cases)
        data_description += f", first {options.cases} cases"
    shape = [int(size) for size in options.thick_shape.split(",")]
    thick = thick_slice_dataset(work / "thick", options.thick_cases, shape, options.thick_slice_mm)
    thick_description = f"demo phantom, {'x'.join(map(str, shape))} voxels, slices {options.thick_slice_mm:g} mm apart"
    return {"datasets": [protect_against_io(record, options, data_description, data, work / "data"),
                         protect_against_io(record, options, thick_description, thick, work / "thick_slices")]}


# ---- memory ----------------------------------------------------------------------------------------------
def cache_rate_used(log: Path, arguments: Sequence[str]) -> float | None:
    """The cache_rate a training or evaluate run used: the one its ``arguments`` pass, else the one
    custom.caching chose and logged (None when the log has no such line)."""
    if "--cache_rate" in arguments:
        return float(arguments[list(arguments).index("--cache_rate") + 1])
    chosen = CHOSEN_CACHE_RATE.search(log.read_text())
    return float(chosen.group(1)) if chosen else None


def memory_row(record: SpeedRecord, options: argparse.Namespace, workflow: str, cases: int, cache: str | None,
               arguments: list[str], log: Path) -> dict:
    """
    Run ``workflow`` (training, protect or evaluate) with ``arguments`` on --threads threads, its output
    in ``log``; its row of the memory table: peak RSS, wall time and, where ``cache`` names the cache
    setting (training and evaluate), the cache_rate used.
    """
    setting = f", cache {cache}" if cache else ""
    step = record.run(f"memory: {workflow}, {cases} cases{setting}",
                      with_environment(bundle(workflow, *arguments), OMP_NUM_THREADS=options.threads), log=log)
    return {"workflow": workflow, "cases": cases, "cache_rate": cache_rate_used(log, arguments) if cache else None,
            "peak_rss_mib": step["peak_rss_mib"], "wall_time_s": step["wall_time_s"]}


def measure_memory(record: SpeedRecord, options: argparse.Namespace, work: Path) -> dict:
    """The memory part: for each number of cases, training and evaluate with each of CACHE_SETTINGS, and
    protect with the checkpoint of the training with the default cache; one row each (memory_row)."""
    rows = []
    for cases in [int(count) for count in options.memory_cases.split(",")]:
        folder = work / f"cases_{cases}"
        subset = dataset_subset(record.data, folder / "data", cases, options.memory_test_cases)
        for cache, override in CACHE_SETTINGS.items():
            rows.append(memory_row(record, options, "training", cases, cache, [
                "--dataset_dir", str(subset), "--lists", "['training']", "--ckpt_dir", str(folder / f"ckpt_{cache}"),
                "--log_dir", str(folder / f"logs_{cache}"), "--epochs", "1", *override,
                *shlex.split(options.generator_args)], folder / f"training_cache_{cache}.log"))
        rows.append(memory_row(record, options, "protect", cases, None, [
            "--dataset_dir", str(subset), "--lists", "['training']", "--ckpt_dir", str(folder / "ckpt_default"),
            "--output_dir", str(folder / "protected")], folder / "protect.log"))
        for cache, override in CACHE_SETTINGS.items():
            rows.append(memory_row(record, options, "evaluate", cases, cache, [
                "--train_dir", str(subset), "--test_dir", str(subset), "--epochs", "1",
                "--output_dir", str(folder / f"victim_{cache}"), *override, *shlex.split(options.victim_args)],
                folder / f"evaluate_cache_{cache}.log"))
    return {"test_cases": options.memory_test_cases, "rows": rows}


# ---- multiprocess ----------------------------------------------------------------------------------------
def epoch_seconds(log: Path) -> list[float]:
    """Each epoch's seconds from ignite's "Epoch[k] Complete. Time taken" lines (the slowest process's)."""
    seconds: dict[int, float] = {}
    for epoch, hours, minutes, rest in EPOCH_TIME.findall(log.read_text()):
        elapsed = int(hours) * 3600 + int(minutes) * 60 + float(rest)
        seconds[int(epoch)] = max(seconds.get(int(epoch), 0.0), elapsed)
    return [seconds[epoch] for epoch in sorted(seconds)]


def measure_multiprocess(record: SpeedRecord, options: argparse.Namespace, work: Path) -> dict:
    """The multiprocess part: training samples per second in 1 and in 2 processes, and their ratio (a
    sample is one of the samples_per_case crops per case that configs/train.json sets)."""
    cases = options.multiprocess_cases
    subset = dataset_subset(record.data, work / "data", cases)
    samples_per_case = shared_defaults(("samples_per_case",), ())["samples_per_case"]
    runs = []
    for processes in (1, 2):
        batch, threads = BATCH_SIZE // processes, max(1, options.threads // processes)
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc_per_node={processes}"]
        overlays = [MULTI_GPU_TRAIN] if processes > 1 else []
        log = work / f"training_{processes}.log"
        step = record.run(f"multiprocess: training in {processes} process(es)", with_environment(bundle(
            "training", "--dataset_dir", str(subset), "--lists", "['training']",
            "--ckpt_dir", str(work / f"ckpt_{processes}"), "--log_dir", str(work / f"logs_{processes}"),
            "--epochs", str(options.multiprocess_epochs), "--batch_size", str(batch),
            *shlex.split(options.generator_args), overlays=overlays, launcher=launcher),
            CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=threads), log=log)
        epochs = epoch_seconds(log)
        timed_epochs = epochs[1:] if len(epochs) > 1 else epochs
        samples_per_epoch = processes * math.ceil(cases / processes) * samples_per_case  # DistributedSampler pads
        runs.append({"processes": processes, "threads_per_process": threads, "batch_per_process": batch,
                     "samples_per_epoch": samples_per_epoch, "epoch_seconds": epochs, "timed_epochs": len(timed_epochs),
                     "samples_per_second": samples_per_epoch * len(timed_epochs) / sum(timed_epochs),
                     "wall_time_s": step["wall_time_s"]})
    return {"cases": cases, "epochs": options.multiprocess_epochs, "runs": runs,
            "two_over_one": runs[1]["samples_per_second"] / runs[0]["samples_per_second"]}


MEASUREMENTS = {"fit": measure_fit, "protect": measure_protect, "memory": measure_memory,
                "multiprocess": measure_multiprocess}


# ---- the record and its Markdown -------------------------------------------------------------------------
class SpeedRecord(Steps):
    """
    la_mri_benchmark's Steps (each command's wall time, peak RSS and exit code; options, hardware,
    versions) plus the invocation's command and the measurements of each part, each with the
    invocation that measured it; written to --results_dir/--record after every step and part, with
    the same as Markdown beside it (--record's name, .md). The temporary folder is named TMP. With
    --resume the parts recorded there before are kept.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(Path(options.results_dir), options.record, Path(options.data), options, resume=False)
        self.replacements[tempfile.gettempdir()] = "TMP"
        self.command = shlex.join([sys.executable, *sys.argv])
        earlier = self.results / self.record
        self.parts = json.loads(earlier.read_text())["parts"] if options.resume and earlier.is_file() else {}

    def measure(self, part: str, work: Path) -> None:
        """Measure ``part`` (MEASUREMENTS) with ``work`` as its scratch folder, and record it."""
        started = time.perf_counter()
        work.mkdir(parents=True)
        measured = MEASUREMENTS[part](self, self.options, work)
        self.parts[part] = {**measured, "wall_time_s": round(time.perf_counter() - started, 1), "command": self.command,
                            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # speed.py's own (fit runs in it)
                            "date": datetime.date.today().isoformat(), "hardware": hardware(),
                            "software": software_versions()}
        self.write()

    def summary(self) -> dict:
        return {**super().summary(), "command": self.command,
                "parts": {part: self.parts[part] for part in PARTS if part in self.parts}}

    def write(self) -> None:
        """The record (Steps.write, its paths made relative), then the Markdown made from it."""
        super().write()
        written = json.loads((self.results / self.record).read_text())
        (self.results / Path(self.record).with_suffix(".md")).write_text(speed_markdown(written) + "\n")


def format_seconds(value: float) -> str:
    """A time in seconds for the tables: four significant digits."""
    return f"{value:.4g}"


def fit_table(part: dict) -> str:
    """Seconds per fit iteration and step, median (mean), per patch size and precision."""
    rows = []
    for size in part["patch_sizes"]:
        cells = [f"{format_seconds(size['seconds'][name]['median'])} ({format_seconds(size['seconds'][name]['mean'])})"
                 for name in ("iteration", "surrogate_step", "generator_step", "reference_generator_step")]
        rows.append(["x".join(map(str, size["patch_size"])), "on" if size["amp"] else "off", *cells,
                     f"{size['generator_over_reference']:.3f}"])
    return markdown_table(["patch", "AMP", "iteration (s)", "surrogate step (s)", "generator step (s)",
                           "reference generator step (s)", "generator / reference"], rows)


def profile_table(part: dict) -> str:
    """The generator step's phases and busiest operators, seconds in one profiled step, per patch size
    (the fit part of earlier records, measured without the profile, has none)."""
    rows = []
    for size in part["patch_sizes"]:
        profile = size.get("generator_step_profile")
        if profile is None:
            continue
        patch = "x".join(map(str, size["patch_size"])) + (", AMP" if size["amp"] else "")
        rows += [[patch, f"phase: {name}", "1", format_seconds(seconds), f"{seconds / profile['step_s']:.0%}"]
                 for name, seconds in profile["phases_s"].items()]
        rows += [[patch, f"operator: {operator['name']}", str(operator["calls"]), format_seconds(operator["self_s"]),
                  f"{operator['self_s'] / profile['step_s']:.0%}"] for operator in profile["top_operators"]]
    return markdown_table(["patch", "where", "calls", "seconds", "share of the step"], rows) if rows else ""


def protect_table(part: dict) -> str:
    """Seconds per case of protect (the whole command, and marginal: without the start-up) and of
    nibabel's read and write, and their ratios, per dataset and row of PROTECT_RUNS ("-": no marginal cost
    measured)."""
    def marginal(dataset: dict, row: str) -> list[str]:
        if "marginal_over_io" not in dataset:
            return ["-", "-"]
        return [format_seconds(dataset["protect"][row]["marginal_seconds_per_case"]),
                f"{dataset['marginal_over_io'][row]:.2f}"]

    rows = [[dataset["dataset"], str(dataset["cases"]), row,
             format_seconds(timing["seconds_per_case"]), format_seconds(dataset["nibabel_io"]["seconds_per_case"]),
             f"{dataset['protect_over_io'][row]:.2f}", *marginal(dataset, row)]
            for dataset in part["datasets"] for row, timing in dataset["protect"].items()]
    return markdown_table(["dataset", "cases", "method", "protect (s per case)", "nibabel read + write (s per case)",
                           "protect / nibabel", "protect, marginal (s per case)", "marginal / nibabel"], rows)


def generator_window_table(part: dict) -> str:
    """The generator's milliseconds on one window with nn.Conv3d and OneDNNConv3d, per dataset."""
    rows = [[dataset["dataset"], "x".join(map(str, timing["case_shape"])), "x".join(map(str, timing["window"])),
             f"{timing['conv3d_ms']:.1f}", f"{timing['onednn_conv3d_ms']:.1f}",
             f"{timing['largest_difference']:.1e}"]
            for dataset in part["datasets"] if (timing := dataset.get("generator_window"))]
    return markdown_table(["dataset", "first case", "window", "nn.Conv3d (ms)", "OneDNNConv3d (ms)",
                           "largest absolute difference"], rows)


def memory_table(part: dict) -> str:
    """Peak RSS per workflow, number of cases and cache_rate."""
    rows = [[row["workflow"], str(row["cases"]), "-" if row["cache_rate"] is None else f"{row['cache_rate']:g}",
             f"{row['peak_rss_mib']:.0f}", f"{row['wall_time_s']:.1f}"] for row in part["rows"]]
    return markdown_table(["workflow", "cases", "cache_rate", "peak RSS (MiB)", "wall time (s)"], rows)


def multiprocess_table(part: dict) -> str:
    """Training samples per second in 1 and 2 processes."""
    rows = [[str(run["processes"]), str(run["threads_per_process"]), str(run["batch_per_process"]),
             str(run["timed_epochs"]), f"{run['samples_per_second']:.3f}"] for run in part["runs"]]
    return markdown_table(["processes", "threads each", "batch each", "epochs timed", "samples per second"], rows)


TABLES = {"fit": ("Fit: seconds per VoxShield iteration, median (mean)", fit_table),
          "protect": ("Protect against reading and writing with nibabel", protect_table),
          "memory": ("Memory: peak resident memory", memory_table),
          "multiprocess": ("Multi-process training (gloo, CPU)", multiprocess_table)}


def speed_markdown(record: dict) -> str:
    """speed.md: the machine, the versions and the command, then each recorded part's table."""
    machine, software = record["hardware"], record["software"]
    lines = ["# Speed and memory (benchmarks/speed.py, issue 15)", "",
             f"Machine: {machine['cpu']}, {machine['cpu_cores']} cores, GPU {machine['gpu'] or 'none'}; "
             + ", ".join(f"{name} {version}" for name, version in software.items()) + ".",
             f"Last invocation: `{record['command']}`, {record['total_wall_time_s']} s."]
    for part, measured in record["parts"].items():
        title, table = TABLES[part]
        lines += ["", f"## {title}", "",
                  f"Measured {measured['date']} by `{measured['command']}` in {measured['wall_time_s']} s on "
                  f"{measured['hardware']['cpu']}, torch threads {measured['hardware']['torch_threads']}"
                  + (f", OMP_WAIT_POLICY={measured['omp_wait_policy']}" if measured.get("omp_wait_policy") else "") + ".", "",
                  table(measured)]
        if part == "multiprocess":
            lines += ["", f"2 processes / 1 process: {measured['two_over_one']:.3f}."]
        if part == "protect":
            lines += ["", "Protect's seconds per case are its command's wall time over the cases, start-up included; the "
                      "marginal ones leave the start-up out: (T(all cases) - T(first tenth)) / (cases - first tenth).",
                      "", "Protect's generator on one window (batch 1, no gradients, median ms):", "",
                      generator_window_table(measured)]
        if part == "fit" and profile_table(measured):
            lines += ["", "Where one generator step's time goes (torch.profiler, one step after the timed ones; "
                      "operators by self time):", "", profile_table(measured)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_location_arguments(parser, REPO_ROOT / "benchmarks" / "results" / "speed", "speed.json")
    add_override_arguments(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from " + ",".join(PARTS))
    parser.add_argument("--resume", action="store_true",
                        help="keep the parts recorded earlier in --record; those in --parts are measured again")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the fit part and OMP_NUM_THREADS of every command")
    parser.add_argument("--patch_sizes", default="64,96",
                        help="fit: comma-separated cube sides, at least 32 (the surrogate halves a patch 4 times)")
    parser.add_argument("--amp", choices=list(AMP_SETTINGS), default="auto",
                        help="fit: mixed precision as train.json chooses (auto), on, off, or both (a row each)")
    parser.add_argument("--warmup", type=int, default=2, help="fit: iterations left out of the timing")
    parser.add_argument("--iterations", type=int, default=10, help="fit: timed iterations")
    parser.add_argument("--cases", type=int, default=None, help="protect: the first N cases of --data (default: all)")
    parser.add_argument("--thick_cases", type=int, default=10, help="protect: cases of the thick-slice phantom")
    parser.add_argument("--compare_wait_policy", action="store_true",
                        help="protect: voxshield once more without OMP_WAIT_POLICY=PASSIVE (a CPU matter)")
    parser.add_argument("--thick_shape", default="192,192,10", help="protect: the thick-slice volumes' shape")
    parser.add_argument("--thick_slice_mm", type=float, default=10.0,
                        help="protect: the thick-slice volumes' slice spacing, a multiple of 2.5 mm")
    parser.add_argument("--memory_cases", default="16,80", help="memory: comma-separated numbers of training cases")
    parser.add_argument("--memory_test_cases", type=int, default=2, help="memory: held-out cases that evaluate scores")
    parser.add_argument("--multiprocess_cases", type=int, default=16, help="multiprocess: training cases")
    parser.add_argument("--multiprocess_epochs", type=int, default=3, help="multiprocess: training epochs")
    options = parser.parse_args()
    parts = [part for part in options.parts.split(",") if part]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    try:
        open_dataset(Path(options.data))
    except VoxShieldInputError as error:
        sys.exit(f"{error} (--data; la_mri lives in ../shared/data beside the repository)")

    torch.set_num_threads(options.threads)
    record = SpeedRecord(options)
    with tempfile.TemporaryDirectory(prefix="voxshield_speed_") as temporary:
        for part in PARTS:
            if part in parts:
                record.measure(part, Path(temporary) / part)
    print(speed_markdown(json.loads((record.results / record.record).read_text())))


if __name__ == "__main__":
    main()
