"""benchmarks/speed.py end to end on a tiny demo dataset: the fields of speed.json and speed.md, ratios
that are the quotients of the recorded times, --resume keeping earlier parts, and paths that name no
folder of this machine. No timing is asserted: the values only have to be positive and consistent."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from custom.data import open_dataset
from custom.demo import make_demo_dataset
from custom.inferers import fitted_window

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import la_mri_benchmark  # noqa: E402
import speed  # noqa: E402

TIMINGS = ("iteration", "surrogate_step", "generator_step", "reference_generator_step")
TINY = ["--threads", "1", "--generator_args", '--patch_size "[32,32,16]"', "--victim_args", '--patch_size "[32,32,16]"']


def run_speed(*args):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "speed.py"), *args]
    ran = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]


def assert_no_machine_paths(path):
    """No folder of this machine in the file: the repository, the folder holding it, the temporary
    folder, the home folder and the interpreter are all written relatively or by a placeholder."""
    text = path.read_text()
    for folder in (REPO_ROOT, REPO_ROOT.parent, Path(tempfile.gettempdir()), Path.home(), Path(sys.executable)):
        assert f"{folder}/" not in text and f"{folder}'" not in text and f'{folder}"' not in text, (path, folder)


def test_speed_benchmark_end_to_end(tmp_path):
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=4, shape=(32, 32, 16))
    results = tmp_path / "results"
    location = ["--data", str(data), "--results_dir", str(results)]
    run_speed(*location, *TINY, "--parts", "fit,protect", "--patch_sizes", "32", "--warmup", "1", "--iterations", "2",
              "--cases", "2", "--thick_cases", "1", "--thick_shape", "32,32,10", "--thick_slice_mm", "5", "--compare_wait_policy")
    record = json.loads((results / "speed.json").read_text())
    assert record["command"].startswith("python benchmarks/speed.py --data TMP/")
    assert record["hardware"]["torch_threads"] == 1 and record["hardware"]["cpu_cores"] >= 1
    assert {"python", "torch", "monai", "numpy", "nibabel"} <= set(record["software"])
    assert list(record["parts"]) == ["fit", "protect"]

    fit = record["parts"]["fit"]
    assert fit["batch_size"] == 2 and fit["iterations"] == 2 and fit["torch_threads"] == 1 and fit["wall_time_s"] > 0
    (size,) = fit["patch_sizes"]
    assert size["patch_size"] == [32, 32, 32]
    for name in TIMINGS:
        timing = size["seconds"][name]
        assert len(timing["values"]) == 2 and min(timing["values"]) > 0, name
        assert timing["median"] == pytest.approx(statistics.median(timing["values"]), rel=1e-12)
        assert timing["mean"] == pytest.approx(statistics.fmean(timing["values"]), rel=1e-12)
    for step, surrogate, generator in zip(*(size["seconds"][name]["values"] for name in TIMINGS[:3])):
        assert step >= surrogate + generator  # the two parts are timed inside the iteration
    assert size["generator_over_reference"] == pytest.approx(
        size["seconds"]["generator_step"]["median"] / size["seconds"]["reference_generator_step"]["median"], rel=1e-12)
    profile = size["generator_step_profile"]  # the phases fit_generator labels, each profiled once
    assert set(profile["phases_s"]) == {"clean_forward", "generator_forward", "surrogate_forward_and_losses",
                                        "backward_and_update"}
    assert min(profile["phases_s"].values()) > 0
    assert profile["step_s"] == pytest.approx(sum(profile["phases_s"].values()), rel=1e-12)
    assert len(profile["top_operators"]) == speed.PROFILED_OPERATORS
    self_seconds = [operator["self_s"] for operator in profile["top_operators"]]
    assert self_seconds == sorted(self_seconds, reverse=True) and not any(
        operator["name"].startswith("voxshield.") for operator in profile["top_operators"])
    assert "phase: backward_and_update" in (results / "speed.md").read_text()
    generator, surrogate = size["networks"]["generator"], size["networks"]["surrogate"]
    assert generator["channels"] == [16, 32, 64, 128] and generator["num_res_units"] == 1
    assert surrogate["channels"] == [32, 64, 128, 256, 512] and surrogate["num_res_units"] == 2

    datasets = record["parts"]["protect"]["datasets"]
    assert [dataset["cases"] for dataset in datasets] == [2, 1]
    assert datasets[0]["dataset"].endswith(", first 2 cases")
    assert datasets[1]["dataset"] == "demo phantom, 32x32x10 voxels, slices 5 mm apart"
    for dataset in datasets:
        io = dataset["nibabel_io"]
        assert io["wall_time_s"] > 0 and io["seconds_per_case"] == pytest.approx(io["wall_time_s"] / dataset["cases"])
        assert list(dataset["protect"]) == ["random", "voxshield", "voxshield, OMP_WAIT_POLICY unset"]
        for method, timing in dataset["protect"].items():
            assert timing["wall_time_s"] > 0
            assert timing["seconds_per_case"] == pytest.approx(timing["wall_time_s"] / dataset["cases"])
            ratio = timing["seconds_per_case"] / io["seconds_per_case"]
            assert dataset["protect_over_io"][method] == pytest.approx(ratio)
        window = dataset["generator_window"]  # protect's generator on one window, plain and on oneDNN
        assert window["window"] == list(fitted_window(window["case_shape"], (96, 96, 64), 8))  # protect.json's window_size
        assert window["conv3d_ms"] > 0 and window["onednn_conv3d_ms"] > 0 and window["largest_difference"] < 1e-4
        assert f"| {'x'.join(map(str, window['window']))} | {window['conv3d_ms']:.1f} |" in (results / "speed.md").read_text()
    # the marginal cost of a case: the 2-case command against the same command on its first case
    assert datasets[0]["first_cases"] == 1 and datasets[1]["first_cases"] is None
    steps = {step["step"]: step for step in record["steps"]}
    for method, timing in datasets[0]["protect"].items():
        first = steps[f"protect data, first 1 cases ({method})"]
        assert first["command"].count("--dataset_dir") == 1 and "first_cases" in first["command"]
        assert timing["first_cases_wall_time_s"] == first["wall_time_s"]
        assert timing["marginal_seconds_per_case"] == pytest.approx(timing["wall_time_s"] - first["wall_time_s"])
        assert datasets[0]["marginal_over_io"][method] == pytest.approx(
            timing["marginal_seconds_per_case"] / datasets[0]["nibabel_io"]["seconds_per_case"])
    assert "marginal_over_io" not in datasets[1]  # one case: no marginal cost to measure
    assert "marginal_seconds_per_case" not in datasets[1]["protect"]["random"]
    rows = ["random", "voxshield", "voxshield, OMP_WAIT_POLICY unset"]
    assert list(steps) == [name for row in rows for name in (f"protect data ({row})", f"protect data, first 1 cases ({row})")
                           ] + [f"protect thick_slices ({row})" for row in rows]
    for step in record["steps"]:
        assert step["exit_code"] == 0 and step["wall_time_s"] > 0 and step["peak_rss_mib"] > 0
        policy = "-u OMP_WAIT_POLICY OMP_NUM_THREADS=1" if "unset" in step["step"] else "OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE"
        assert step["command"].startswith(f"env {policy} python -m monai.bundle run protect ")
        assert f"--method {'random' if '(random)' in step['step'] else 'voxshield'} " in step["command"] + " "

    markdown = (results / "speed.md").read_text()
    assert "| 32x32x32 |" in markdown and f"| {size['generator_over_reference']:.3f} |" in markdown
    for dataset in datasets:
        for method, ratio in dataset["protect_over_io"].items():
            assert f"| {dataset['dataset']} | {dataset['cases']} | {method} |" in markdown
            assert f"| {ratio:.2f} |" in markdown
    for method, ratio in datasets[0]["marginal_over_io"].items():
        assert f"| {ratio:.2f} |" in markdown.split(f"| {datasets[0]['dataset']} | 2 | {method} |")[1].splitlines()[0]
    assert f"| {datasets[1]['dataset']} | 1 | random |" in markdown and "| - | - |" in markdown
    for path in (results / "speed.json", results / "speed.md"):
        assert_no_machine_paths(path)

    # the memory part alone, the earlier parts kept by --resume
    run_speed(*location, *TINY, "--parts", "memory", "--resume", "--memory_cases", "2", "--memory_test_cases", "1")
    resumed = json.loads((results / "speed.json").read_text())
    assert list(resumed["parts"]) == ["fit", "protect", "memory"]
    assert resumed["parts"]["fit"] == fit and resumed["parts"]["protect"] == record["parts"]["protect"]
    rows = resumed["parts"]["memory"]["rows"]
    assert [(row["workflow"], row["cases"], row["cache_rate"]) for row in rows] == [
        ("training", 2, 1.0), ("training", 2, 0.0), ("protect", 2, None), ("evaluate", 2, 1.0), ("evaluate", 2, 0.0)]
    assert all(row["peak_rss_mib"] > 0 and row["wall_time_s"] > 0 for row in rows)
    assert [row["peak_rss_mib"] for row in rows] == [step["peak_rss_mib"] for step in resumed["steps"]]
    assert "## Memory: peak resident memory" in (results / "speed.md").read_text()
    for path in (results / "speed.json", results / "speed.md"):
        assert_no_machine_paths(path)


def test_thick_slice_dataset_keeps_every_kth_slice(tmp_path):
    """5 mm from the phantom's 2.5 mm slices: every 2nd slice of a 20-slice phantom, the slice axis of
    the affine doubled, image and label alike."""
    thick = speed.thick_slice_dataset(tmp_path, 1, (32, 32, 10), 5.0)
    phantom = tmp_path / "phantom"
    (case,) = open_dataset(thick).cases
    for name in [*case.images, case.label]:
        image, source = nib.load(thick / name), nib.load(phantom / name)
        assert image.shape == (32, 32, 10) and image.header.get_zooms() == pytest.approx((0.8, 0.8, 5.0))
        assert image.get_data_dtype() == source.get_data_dtype()
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(source.dataobj)[..., ::2])
        np.testing.assert_allclose(image.affine[:3, 3], source.affine[:3, 3])


def test_dataset_subset_lists(tmp_path):
    """The first cases go to "training", the next to "test"; the copy reads like its source."""
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=3, shape=(16, 16, 16))
    subset = speed.dataset_subset(data, tmp_path / "subset", training=1, test=1)
    source, copy = open_dataset(data), open_dataset(subset)
    assert [case.label for case in copy.cases] == [case.label for case in source.cases[:2]]
    assert [case.label for case in open_dataset(subset, lists=["test"]).cases] == [source.cases[1].label]
    assert (copy.channel_names, copy.labels, copy.normalisation) == (source.channel_names, source.labels,
                                                                    source.normalisation)
    with pytest.raises(SystemExit, match="3 labelled cases, fewer than the 4 asked for"):
        speed.dataset_subset(data, tmp_path / "too_many", training=4)


def test_peak_rss_is_the_commands_own(tmp_path):
    """A step's peak memory is the command's, not that of the benchmark that started it: with 400 MB
    held here, a bare interpreter still reads well under 100 MB and one that fills 300 MB at least 300."""
    ballast = torch.ones(100 * 2**20)  # 400 MB, written
    steps = la_mri_benchmark.Steps(tmp_path, "record.json", tmp_path, argparse.Namespace(), resume=False)
    bare = steps.run("bare", [sys.executable, "-c", "pass"])
    filled = steps.run("filled", [sys.executable, "-c", "filled = b'x' * (300 * 2**20)"])
    assert ballast.sum() > 0 and bare["peak_rss_mib"] < 100 <= 300 <= filled["peak_rss_mib"]
