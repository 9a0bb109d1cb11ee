"""benchmarks/gpu_session.sh, the one device call for issues 15 and 13: its CPU dry run end to end on the
demo phantom (the same steps as on the GPU, tiny), the files it leaves in OUT and their key fields; the
GPU mode on a machine without CUDA, which records the refusal and runs nothing; and what the device call
would send. No timing is asserted."""

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from test_benchmark_speed import assert_no_machine_paths

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_session  # noqa: E402

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_session.sh"
OUTPUTS = {"session.json", "session.log", "speed.json", "speed.md", "paper_results.json", "paper_results.md"}
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_session.sh is a bash script")


def run_session(tmp_path, *args, **variables):
    """gpu_session.sh ARGS with OUT and its work folder in ``tmp_path``, this interpreter as PYTHON, one thread."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(OUT=str(tmp_path / "out"), GPU_SESSION_WORK=str(tmp_path / "session_work"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", **variables)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_end_to_end(tmp_path):
    ran = run_session(tmp_path, "--dry-run")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == OUTPUTS  # the device tool brings back 8 files at most
    session = json.loads((out / "session.json").read_text())
    assert session["mode"] == "dry-run" and session["outputs"] == sorted(OUTPUTS - {"session.json"}) + ["session.json"]
    assert session["device"]["cuda_available"] is False and session["device"]["packages"]["monai"]
    steps = session["steps"]
    assert [step["step"] for step in steps] == ["demo", "check", "fit", "protect", "regrid", "paper"]
    for step in steps:
        assert step["exit_code"] == 0 and not step["timed_out"] and 0 < step["wall_time_s"] <= step["timeout_s"]
        assert step["command"].startswith("python ")  # this interpreter, written as in every record
    by_name = {step["step"]: step for step in steps}
    assert "--parts fit --resume --amp both --patch_sizes 32" in by_name["fit"]["command"]
    assert "--parts protect --resume" in by_name["protect"]["command"]
    assert "regrid --source WORK/demo/data --output WORK/la_mri_grid32 --grid 32" in by_name["regrid"]["command"]
    assert "--recipe_name paper --epochs 2 --method clean --amp true" in by_name["paper"]["command"]

    # issue 15: fit in float32 and with AMP, then protect, in one speed.json
    speed = json.loads((out / "speed.json").read_text())
    assert list(speed["parts"]) == ["fit", "protect"]
    fit = speed["parts"]["fit"]
    assert fit["amp_setting"] == "both"
    assert [(row["patch_size"], row["amp"]) for row in fit["patch_sizes"]] == [([32] * 3, False), ([32] * 3, True)]
    assert all(row["seconds"]["iteration"]["median"] > 0 for row in fit["patch_sizes"])
    markdown = (out / "speed.md").read_text()
    assert "| 32x32x32 | off |" in markdown and "| 32x32x32 | on |" in markdown
    assert "| 32x32x32, AMP | phase: backward_and_update |" in markdown
    datasets = speed["parts"]["protect"]["datasets"]
    assert [dataset["cases"] for dataset in datasets] == [2, 1]
    assert all(set(dataset["protect_over_io"]) == {"random", "voxshield"} for dataset in datasets)

    # issue 13: the paper recipe's short run, its seconds per epoch and the 100-epoch estimate
    results = json.loads((out / "paper_results.json").read_text())
    recipe = results["recipe"]
    assert recipe["name"] == "paper" and recipe["victim"] == "unet_paper" and recipe["amp"] is True
    assert recipe["epochs"] == 2 and recipe["batch_size"] == 8 and recipe["patch_size"] == [32, 32, 32]
    assert results["run"]["train_cases"] == 4 and len(results["run"]["test_cases"]) == 2
    assert results["run"]["train_data"] == "WORK/la_mri_grid32"
    paper = session["paper_victim"]
    assert paper["epochs_run"] == 2 and len(paper["epoch_seconds"]) == 2 and min(paper["epoch_seconds"]) > 0
    assert paper["recipe"] == recipe and paper["exit_code"] == 0
    assert paper["median_epoch_after_first_s"] == statistics.median(paper["epoch_seconds"][1:])
    assert paper["estimated_total_s"] == pytest.approx(
        paper["wall_time_s"] + 98 * paper["median_epoch_after_first_s"], abs=0.06)
    assert (out / "paper_results.md").read_text().startswith("# Victim unet_paper trained on WORK/la_mri_grid32 (clean)")
    for name in ("session.json", "speed.json", "speed.md", "paper_results.json", "paper_results.md"):
        assert_no_machine_paths(out / name)
    assert "===== paper: exit 0" in (out / "session.log").read_text()


def test_gpu_mode_without_cuda_runs_nothing_and_says_why(tmp_path):
    """On a machine without CUDA (or without the carried wheels and data) the GPU mode records its
    check's refusal, skips every step, still writes session.json, and exits non-zero."""
    ran = run_session(tmp_path, GPU_SESSION_WHEELS=str(tmp_path / "no_wheels"), GPU_SESSION_STEPS="fit,paper")
    assert ran.returncode != 0
    session = json.loads((tmp_path / "out" / "session.json").read_text())
    assert session["mode"] == "gpu" and session["paper_victim"] is None
    steps = {step["step"]: step for step in session["steps"]}
    assert list(steps) == ["install", "check", "fit", "paper"]
    assert steps["install"]["skipped"].startswith("no wheels in ")
    assert steps["check"]["exit_code"] == 3 and session["device"]["cuda_available"] is False
    assert steps["fit"]["skipped"] == steps["paper"]["skipped"] == "setup failed (exit 3)"
    assert "torch sees no CUDA device" in (tmp_path / "out" / "session.log").read_text()


def test_travel_bytes_counts_what_the_device_call_sends(tmp_path):
    """Tracked files and untracked ones git does not ignore, plus each carried path (ignored or not)."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/.whl/\n/ignored.txt\n")
    (tmp_path / "tracked.txt").write_bytes(b"x" * 100)
    subprocess.run(["git", "add", "tracked.txt", ".gitignore"], cwd=tmp_path, check=True)
    (tmp_path / "untracked.txt").write_bytes(b"y" * 10)
    (tmp_path / "ignored.txt").write_bytes(b"z" * 1000)
    (tmp_path / ".whl" / "sub").mkdir(parents=True)
    (tmp_path / ".whl" / "a.whl").write_bytes(b"w" * 7)
    (tmp_path / ".whl" / "sub" / "b.whl").write_bytes(b"w" * 5)
    sizes = gpu_session.travel_bytes(Path(tmp_path), [".whl"])
    assert sizes == {"tree": 100 + 10 + len("/.whl/\n/ignored.txt\n"), ".whl": 12}
