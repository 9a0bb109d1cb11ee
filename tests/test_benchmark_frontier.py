"""benchmarks/la_mri_frontier.py end to end on a tiny demo dataset, the path rewriting of the
benchmarks' committed files, and la_mri_benchmark.py's clean references under PGD-AT."""

import argparse
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO_ROOT
from test_evaluate import msd_copy

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import la_mri_benchmark  # noqa: E402

CT_WINDOW = (-175.0, 250.0)


def frontier(*args):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "la_mri_frontier.py"), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def window(path):
    """A CT file's intensities normalised as protect and evaluate do: the window mapped to [0, 1]."""
    values = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
    return np.clip((values - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1)


def test_frontier_end_to_end(flare_data, tmp_path):
    data = msd_copy(flare_data, tmp_path / "msd", {"train_002"})
    results, work = tmp_path / "results", tmp_path / "work"
    options = ["--data", str(data), "--results_dir", str(results), "--work_dir", str(work), "--methods", "random",
               "--budgets", "4,8", "--supports", "roi", "--victim_epochs", "1",
               "--victim_args", '--patch_size "[32,32,16]"', "--stop_at", "1000", "--record", "frontier.json"]
    ran = frontier(*options)
    assert ran.returncode == 0, ran.stderr[-3000:]

    # the clean victim, random noise at 4/255 in the ROI (named like la_mri_benchmark.py's run), then the
    # stop rule: any DSC is at most 1000% of clean, so 8/255 is not run
    assert (results / "clean" / "results.json").is_file() and (results / "random" / "results.json").is_file()
    assert not (work / "random_eps8").exists() and not (results / "random_eps8").exists()
    record = json.loads((results / "frontier.json").read_text())
    assert [step["step"] for step in record["steps"]] == [
        "unet victim (seed 0) on clean", "fit random", "protect random", "unet victim (seed 0) on random",
        "random_eps8", "report"]
    assert record["steps"][4]["skipped"] == "stopped: random in the roi protects at 4/255 already"
    commands = [step["command"] for step in record["steps"] if "command" in step]
    assert len(commands) == 5 and all(command.startswith("python -m monai.bundle run ") for command in commands)
    for path in results.rglob("*.json"):
        assert str(REPO_ROOT) not in path.read_text(), path
    result = json.loads((results / "random" / "results.json").read_text())
    assert result["protection"]["parameters"]["eps"] == pytest.approx(4 / 255)
    assert result["recipe"]["patch_size"] == [32, 32, 16] and result["recipe"]["iterations"] == 1

    # the PSNR the report gives is that of the files as written (their int16 rounding included)
    manifest = json.loads((work / "random" / "protected" / "voxshield_manifest.json").read_text())
    psnrs = []
    for case in manifest["cases"]:
        error = window(work / "random" / "protected" / case["images"][0]) - window(data / case["images"][0])
        psnrs.append(10 * math.log10(1 / np.mean(error**2)))
    assert result["imperceptibility"]["aggregate"]["psnr_db_volume"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    tables = (results / "tables.md").read_text()
    row = next(line for line in tables.splitlines() if line.startswith("| random (floor) | ROI | 4/255 |"))
    assert row.split("|")[4].strip() == f"{np.mean(psnrs):.2f}"
    assert (results / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumed: every finished step is reused, only the report runs again
    again = frontier(*options, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    steps = json.loads((results / "frontier.json").read_text())["steps"]
    assert [("reused" in step, "skipped" in step) for step in steps] == [
        (True, False), (True, False), (True, False), (False, True), (False, False)]


def test_relative_text_rewrites_whole_path_components_only():
    replacements = {"/work/main": ".", "/work": "..", "/opt/py/bin/python": "python"}
    command = ("/opt/py/bin/python -m monai.bundle run evaluate --train_dir /tmp/work/x "
               "--test_dir /work/shared/data/la_mri --output_dir /work/main/benchmarks/results/la_mri/clean "
               "'--results' '['\"'\"'/work/main'\"'\"']'")
    assert la_mri_benchmark.relative_text(command, replacements) == (
        "python -m monai.bundle run evaluate --train_dir /tmp/work/x "
        "--test_dir ../shared/data/la_mri --output_dir benchmarks/results/la_mri/clean "
        "'--results' '['\"'\"'.'\"'\"']'")
    unrelated = la_mri_benchmark.relative_text("/work/mainly /workspace/a /work", replacements)
    assert unrelated == "../mainly /workspace/a .."


def test_normalise_paths_leaves_numbers_and_other_files(tmp_path):
    content = {"data": "/work/shared/data/la_mri", "psnr": 50.123456789012345,
               "sources": ["/work/main/a/results.json"], "note": "trained on /tmp/voxshield/full/protected"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(content, indent=1))
    header = "# Victim unet trained on /work/main/x, tested on clean /work/shared/y\n"
    (tmp_path / "a" / "results.md").write_text(header)
    (tmp_path / "a" / "events.bin").write_bytes(b"/work/main/x")
    (tmp_path / "b.json").write_text(json.dumps({"n": 1}))

    changed = la_mri_benchmark.normalise_paths(tmp_path, {"/work/main": ".", "/work": ".."})

    assert changed == [tmp_path / "a" / "results.json", tmp_path / "a" / "results.md"]
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == {
        **content, "data": "../shared/data/la_mri", "sources": ["a/results.json"]}
    assert (tmp_path / "a" / "results.md").read_text() == "# Victim unet trained on x, tested on clean ../shared/y\n"
    assert (tmp_path / "a" / "events.bin").read_bytes() == b"/work/main/x"


def test_clean_pgd_at_references_one_per_bound(tmp_path):
    """With pgd_at, the clean victim is trained once per distinct bound of the runs' copies, into
    clean_pgd_at (train.json's 4/255) and clean_pgd_at_epsN, each command naming its --pgd_at_eps; other
    steps once; --resume reuses the references that exist. Nothing is run."""
    runs = ["full", "carrier_eps16", "lsp_eps16", "random_eps32"]
    plan = la_mri_benchmark.clean_steps(runs, [None, "z_smooth", "pgd_at"])
    assert plan == [(None, None), ("z_smooth", None), ("pgd_at", 4 / 255), ("pgd_at", 16 / 255), ("pgd_at", 32 / 255)]
    assert la_mri_benchmark.clean_steps(["carrier_eps16"], ["pgd_at"]) == [("pgd_at", 16 / 255)]
    assert la_mri_benchmark.clean_steps([], ["pgd_at"]) == [("pgd_at", 4 / 255)]  # the clean victims alone

    folders = ["clean_pgd_at", "clean_pgd_at_eps16", "clean_pgd_at_eps32"]
    for folder in folders:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text("{}")
    options = argparse.Namespace(results_dir=str(tmp_path), data=str(tmp_path), victim_epochs=1, victim_args="")
    steps = la_mri_benchmark.Steps(tmp_path, "record.json", tmp_path, options, resume=True)
    for step, eps in plan[2:]:
        la_mri_benchmark.victim_run(steps, options, "clean", "clean", tmp_path, "unet", 0, step, eps)
    assert [entry["reused"] for entry in steps.steps] == [str(tmp_path / folder / "results.json") for folder in folders]
    for entry, level in zip(steps.steps, (4, 16, 32)):
        assert f"--countermeasure pgd_at --pgd_at_eps {level / 255!r}" in entry["command"]
        assert entry["step"] == f"unet victim (seed 0, pgd_at at {level}/255) on clean"


def test_report_figures_show_voxshield_or_are_left_alone(tmp_path):
    """The report draws comparison.png and perturbation.png from VoxShield's copy (run full) only: with
    another method's copy alone in the work folder it gets no figure arguments and keeps the figures
    already there. Nothing is run."""
    (tmp_path / "work" / "carrier_p4_eps16" / "protected").mkdir(parents=True)
    options = argparse.Namespace(results_dir=str(tmp_path / "results"), work_dir=str(tmp_path / "work"),
                                 data=str(tmp_path / "data"))
    commands = []
    steps = argparse.Namespace(run=lambda name, command: commands.append(command))
    la_mri_benchmark.report_run(steps, options)
    (tmp_path / "work" / "full" / "protected").mkdir(parents=True)
    la_mri_benchmark.report_run(steps, options)
    assert "--protected_dir" not in commands[0]
    assert commands[1][commands[1].index("--protected_dir") + 1] == str(tmp_path / "work" / "full" / "protected")
