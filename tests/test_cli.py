"""The `voxshield` command (custom/cli.py) and its independent verifier (custom/verify.py): help for
every command, the wiring to the bundles' workflows, protect giving exactly what `python -m monai.bundle
run protect` gives, and verify catching each kind of damage to a protected copy by name."""

import filecmp
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, run_in_process
from test_protect import msd_4d_scaled
from custom import cli
from custom.demo import make_demo_dataset
from custom.verify import dilate, verify_copy

COMMANDS = ["protect", "train", "evaluate", "report", "verify", "regrid", "export"]
IMAGE = "TrainingImg/train_001_0000.nii.gz"
LABEL = "TrainingMask/train_001.nii.gz"
SMALL = ["--window_size", "[32,32,16]"]


@pytest.fixture
def single_thread(monkeypatch):
    """Workflows run in this process: one torch thread (the machine is shared), excepthook restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str) -> int:
    """`voxshield ARGS` in this process, the environment put back afterwards; returns the exit status."""
    with mock.patch.dict(os.environ):
        try:
            cli.main(list(args))
        except SystemExit as stop:
            return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    return 0


# ---- help and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert run_cli(command, "--help") == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err  # fire writes help to stderr
    assert f"voxshield {command}" in text
    expected = {"protect": "--output_dir", "train": "--ckpt_dir", "evaluate": "--train_dir", "report": "--results",
                "verify": "--protected", "regrid": "--grid", "export": "--output"}[command]
    assert expected in text
    if command not in ("verify", "regrid", "export"):
        assert "--bundle" in text and "Additional flags are accepted" in text


def test_top_level_help_lists_the_commands(capsys):
    assert run_cli("--help") == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "COMMANDS" in text
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}$", text, re.MULTILINE), command


def test_help_flag_moves_behind_the_separator():
    assert cli._help_flag_to_fire(["protect", "--help"]) == ["protect", "--", "--help"]
    assert cli._help_flag_to_fire(["protect", "-h", "--bundle", "brats"]) == ["protect", "--bundle", "brats", "--", "--help"]
    assert cli._help_flag_to_fire(["protect", "--", "--help"]) == ["protect", "--", "--help"]
    assert cli._help_flag_to_fire(["protect", "--epochs", "3"]) == ["protect", "--epochs", "3"]
    assert cli._help_flag_to_fire(["--help"]) == ["--help"]


def test_bundle_choice(capsys):
    assert cli.bundle_name("flare") == "voxshield_flare"
    assert cli.bundle_name("BraTS") == "voxshield_brats"
    assert cli.bundle_name("voxshield_brats") == "voxshield_brats"
    assert cli.locate_bundle("voxshield_brats") == REPO_ROOT / "bundles" / "voxshield_brats"
    assert run_cli("train", "--bundle", "liver") == 2
    assert capsys.readouterr().err.strip() == "voxshield: error: --bundle must be one of flare, brats, got 'liver'."


@pytest.mark.parametrize(
    "args, run_id, config, expected",
    [
        (["train", "--bundle", "brats", "--dataset_dir", "D", "--ckpt_dir", "C", "--epochs", "3"], "training",
         ["voxshield_brats/configs/bundle.json", "train.json"], {"dataset_dir": "D", "ckpt_dir": "C", "log_dir": str(Path("C") / "logs"), "epochs": 3}),
        (["train", "--ckpt_dir", "C", "--log_dir", "L", "--surrogate_def#channels", "[8,16,16,32,32]"], "training",
         ["voxshield_flare/configs/bundle.json", "train.json"], {"ckpt_dir": "C", "log_dir": "L", "surrogate_def#channels": [8, 16, 16, 32, 32]}),
        (["evaluate", "--train_dir", "P", "--test_dir", "T", "--output_dir", "R", "--victim", "unetr", "--test_list", "['a','b']"],
         "evaluate", ["voxshield_flare/configs/bundle.json", "evaluate.json"],
         {"train_dir": "P", "test_dir": "T", "output_dir": "R", "victim": "unetr", "test_list": ["a", "b"]}),
        (["report", "--bundle", "brats", "--results", "['R1','R2']", "--output_dir", "O", "--clean_dir", "C"], "report",
         ["voxshield_brats/configs/bundle.json", "report.json"], {"results": ["R1", "R2"], "output_dir": "O", "clean_dir": "C"}),
        (["report", "--results", "R1", "--output_dir", "2024"], "report", ["voxshield_flare/configs/bundle.json", "report.json"],
         {"results": ["R1"], "output_dir": "2024"}),
    ],
)
def test_commands_run_the_bundle_workflow_with_overrides(args, run_id, config, expected, monkeypatch):
    calls = []
    monkeypatch.setattr("monai.bundle.run", lambda run_id, config_file, **kw: calls.append((run_id, config_file, kw)))
    assert run_cli(*args) == 0
    assert len(calls) == 1
    called_id, config_file, overrides = calls[0]
    assert called_id == run_id
    bundle_config, *shared = config
    assert [Path(path) for path in config_file] == [REPO_ROOT / "bundles" / bundle_config] + [
        REPO_ROOT / "configs" / name for name in shared]
    assert overrides == expected  # no bundle_root: a checkout's configs find their folder themselves


def test_protect_trains_first_only_without_a_checkpoint(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("monai.bundle.run", lambda run_id, config_file, **kw: calls.append((run_id, config_file, kw)))
    run_cli("protect", "--dataset_dir", "D", "--ckpt_dir", str(tmp_path), "--output_dir", "O", "--epochs", "2",
            "--generator_def#channels", "[8,16,16,32]", "--window_size", "[32,32,16]", "--surrogate_def#num_res_units", "1")
    assert [call[0] for call in calls] == ["training", "protect"]
    # protect is layered on train.json: the same overrides (one name per network) reach both workflows
    assert [Path(path).name for path in calls[0][1]] == ["bundle.json", "train.json"]
    assert [Path(path).name for path in calls[1][1]] == ["bundle.json", "train.json", "protect.json"]
    shared = {"dataset_dir": "D", "ckpt_dir": str(tmp_path), "epochs": 2, "generator_def#channels": [8, 16, 16, 32],
              "window_size": [32, 32, 16], "surrogate_def#num_res_units": 1}
    assert calls[0][2] == {**shared, "log_dir": str(tmp_path / "logs")}
    assert calls[1][2] == {**shared, "output_dir": "O"}

    calls.clear()
    (tmp_path / "generator.pt").write_bytes(b"weights")
    run_cli("protect", "--dataset_dir", "D", "--ckpt_dir", str(tmp_path), "--output_dir", "O")
    assert [call[0] for call in calls] == ["protect"]


def test_protect_runs_openmp_workers_passive_unless_told_otherwise(tmp_path, monkeypatch):
    """protect sets OMP_WAIT_POLICY=PASSIVE for its workflow (and a fit it runs first) when the user
    has not set it; a user's own value is kept; train leaves it unset."""
    policies = []
    monkeypatch.setattr("monai.bundle.run",
                        lambda run_id, config_file, **kw: policies.append((run_id, os.environ.get("OMP_WAIT_POLICY"))))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    protect = ["protect", "--dataset_dir", "D", "--ckpt_dir", str(tmp_path), "--output_dir", "O"]
    run_cli(*protect)
    assert policies == [("training", "PASSIVE"), ("protect", "PASSIVE")]
    assert "OMP_WAIT_POLICY" not in os.environ  # run_cli puts the environment back
    (tmp_path / "generator.pt").write_bytes(b"weights")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_cli(*protect)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    run_cli("train", "--dataset_dir", "D", "--ckpt_dir", str(tmp_path))
    assert policies[2:] == [("protect", "ACTIVE"), ("training", None)]


def test_the_command_imports_torch_only_after_protect_set_the_policy():
    """libgomp reads OMP_WAIT_POLICY once, when torch is first imported: the `voxshield` command's module
    and what it imports before dispatching (fire, custom.nifti_io) leave torch unimported."""
    check = "import sys, fire, custom.cli, custom.nifti_io; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    ran = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"


def test_one_network_override_reaches_training_and_protect(tmp_path):
    """`voxshield protect --generator_def#channels ...` fits a narrower generator, protect builds the same
    one and loads its checkpoint, and the training record quoted in the manifest names it."""
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=2, shape=(32, 32, 16))
    threads, hook = torch.get_num_threads(), sys.excepthook
    torch.set_num_threads(1)
    try:
        status = run_cli("protect", "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "ckpt"), "--output_dir",
                         str(tmp_path / "out"), "--epochs", "1", "--patch_size", "[32,32,16]", *SMALL,
                         "--generator_def#channels", "[8,8,16,16]", "--surrogate_def#channels", "[8,16,16,32,32]")
    finally:
        torch.set_num_threads(threads)
        sys.excepthook = hook
    assert status == 0
    state = torch.load(tmp_path / "ckpt" / "generator.pt", weights_only=True)
    assert state["model.0.conv.unit0.conv.weight"].shape[0] == 8  # the first encoder block: 8 channels
    training = json.loads((tmp_path / "out" / "voxshield_manifest.json").read_text())["fitted"]["training"]
    assert training["generator"]["channels"] == [8, 8, 16, 16] and training["generator"]["norm"] == "INSTANCE"
    assert training["surrogate"]["channels"] == [8, 16, 16, 32, 32]
    assert training["generator"]["parameters"] == sum(tensor.numel() for tensor in state.values())


# ---- protect through the CLI, then verify ------------------------------------------------------
@pytest.fixture(scope="module")
def protected(tmp_path_factory, random_checkpoints):
    """A tiny FLARE dataset protected by `voxshield protect` (in this process) with an existing checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    data = make_demo_dataset(root / "data", "flare", num_cases=3, shape=(32, 32, 16))
    ckpt = root / "ckpt"
    ckpt.mkdir()
    shutil.copy(random_checkpoints[1], ckpt / "generator.pt")
    threads, hook = torch.get_num_threads(), sys.excepthook
    torch.set_num_threads(1)
    try:
        status = run_cli("protect", "--bundle", "flare", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt),
                         "--output_dir", str(root / "out"), *SMALL)
    finally:
        torch.set_num_threads(threads)
        sys.excepthook = hook
    assert status == 0
    assert sorted(path.name for path in ckpt.iterdir()) == ["generator.pt"]  # nothing was trained
    return data, root / "out", ckpt


def test_cli_protect_equals_python_m_monai_bundle_run(protected, tmp_path, monkeypatch):
    data, output, ckpt = protected
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the thread count `protected` ran with
    reference = run_in_process("protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir",
                               str(tmp_path / "reference"), *SMALL)
    assert reference.returncode == 0, reference.stderr[-2000:]
    ours = json.loads((output / "voxshield_manifest.json").read_text())
    theirs = json.loads((tmp_path / "reference" / "voxshield_manifest.json").read_text())
    for key in ("created",):
        ours.pop(key), theirs.pop(key)
    assert ours == theirs  # every file's sha256, every per-case figure, the parameters
    for record in ours["cases"]:
        for name in record["images"]:
            assert filecmp.cmp(output / name, tmp_path / "reference" / name, shallow=False)


def test_verify_accepts_the_protected_copy(protected, capsys):
    data, output, _ = protected
    assert run_cli("verify", "--source", str(data), "--protected", str(output)) == 0
    captured = capsys.readouterr()
    assert f"voxshield: verified 3 cases: {output}" in captured.out and captured.err == ""


def rewrite_voxels(path: Path, change) -> None:
    """Change a NIfTI's stored voxels in place, keeping its header bytes."""
    image = nib.load(path)
    offset = int(image.dataobj.offset)
    raw = gzip.decompress(path.read_bytes())
    values = np.frombuffer(raw[offset:], dtype=image.get_data_dtype()).reshape(image.shape, order="F").copy()
    change(values)
    path.write_bytes(gzip.compress(raw[:offset] + values.tobytes(order="F")))


def label_of(data: Path) -> np.ndarray:
    return np.asanyarray(nib.load(data / LABEL).dataobj)


def outside_roi_voxel(data, output):
    label = label_of(data)
    index = tuple(np.argwhere(label == 0)[0])
    rewrite_voxels(output / IMAGE, lambda values: values.__setitem__(index, values[index] + 1))
    return [(IMAGE, "1 stored voxel(s) outside the ROI (label == 0) changed"), (IMAGE, "sha256 differs")]


def bound_exceeded(data, output):
    label = label_of(data)
    index = tuple(np.argwhere(label > 0)[0])
    rewrite_voxels(output / IMAGE, lambda values: values.__setitem__(index, values[index] + 50))
    return [(IMAGE, "over the bound"), (IMAGE, "manifest records max |delta|"), (IMAGE, "sha256 differs")]


def header_changed(data, output):
    image = nib.load(output / IMAGE)
    raw = bytearray(gzip.decompress((output / IMAGE).read_bytes()))
    raw[148:156] = b"tampered"  # the descrip field
    (output / IMAGE).write_bytes(gzip.compress(bytes(raw)))
    assert nib.load(output / IMAGE).shape == image.shape
    return [(IMAGE, "header bytes (before vox_offset) differ"), (IMAGE, "sha256 differs")]


def label_changed(data, output):
    rewrite_voxels(output / LABEL, lambda values: values.__setitem__((0, 0, 0), 1))
    return [(LABEL, "label differs from the source"), (LABEL, "sha256 differs")]


def file_added(data, output):
    (output / "TrainingImg" / "extra_0000.nii.gz").write_bytes((output / IMAGE).read_bytes())
    return [("TrainingImg/extra_0000.nii.gz", "added: not in the manifest")]


def file_removed(data, output):
    (output / LABEL).unlink()
    return [(LABEL, "missing from the protected copy")]


def other_file_changed(data, output):
    path = next(name for name in json.loads((output / "voxshield_manifest.json").read_text())["copied_files"])
    (output / path).write_text((output / path).read_text() + " ")
    return [(path, "non-case file differs from the source"), (path, "sha256 differs")]


def bound_inflated(data, output):
    path = output / "voxshield_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["cases"][1]["bound_source_units"] = [10.0 * value for value in manifest["cases"][1]["bound_source_units"]]
    path.write_text(json.dumps(manifest))
    return [(manifest["cases"][1]["images"][0], "is not eps x the channel's normalisation scale")]


def manifest_removed(data, output):
    (output / "voxshield_manifest.json").unlink()
    return [("voxshield_manifest.json", "manifest missing")]


@pytest.mark.parametrize(
    "damage",
    [outside_roi_voxel, bound_exceeded, header_changed, label_changed, file_added, file_removed,
     other_file_changed, bound_inflated, manifest_removed],
)
def test_verify_names_each_failure(damage, protected, tmp_path, capsys):
    data, output, _ = protected
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    expected = damage(data, copy)
    assert run_cli("verify", "--source", str(data), "--protected", str(copy)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("voxshield: verify: ") and "check(s) failed" in lines[-1]
    failures = lines[:-1]
    assert all(line.startswith("voxshield: verify: FAILED ") for line in failures)
    for name, problem in expected:
        assert any(f"{copy / name}" in line and problem in line for line in failures), (name, problem, failures)
    assert len(failures) == len(expected), failures  # nothing else is blamed


def test_verify_rejects_a_copy_of_another_dataset(protected, tmp_path):
    _, output, _ = protected
    other = make_demo_dataset(tmp_path / "other", "flare", num_cases=3, shape=(32, 32, 16), seed=7)
    failures, cases = verify_copy(other, output)
    assert cases == 3 and failures
    assert any("label differs from the source" in line for line in failures)


def test_bad_input_is_one_line(tmp_path, capsys, single_thread, random_checkpoints):
    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=2, shape=(32, 32, 16))
    (data / LABEL).write_bytes(b"not a nifti")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(random_checkpoints[1], ckpt / "generator.pt")
    status = run_cli("protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "out"))
    assert status == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"voxshield: error: {data / LABEL}: corrupt NIfTI")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, roi_dilation", [("brats", 0), ("msd", 1)])
def test_verify_multichannel_and_dilated_roi(layout, roi_dilation, tmp_path, random_checkpoints, single_thread):
    from monai.inferers import SlidingWindowInferer

    from conftest import generator_net
    from custom.data import open_dataset
    from custom.perturbation import ROIBoundedPerturbation
    from custom.protect import DatasetProtector
    from custom.voxshield import VoxShield

    if layout == "brats":
        data, channels, checkpoint = make_demo_dataset(tmp_path / "data", "brats", 2, (32, 32, 16)), 4, random_checkpoints[4]
    else:
        data, channels = msd_4d_scaled(tmp_path / "data"), 2
        torch.manual_seed(2)
        checkpoint = tmp_path / "g2.pt"
        torch.save(generator_net(2).state_dict(), checkpoint)
    output = tmp_path / "out"
    method = VoxShield(ROIBoundedPerturbation(roi_dilation=roi_dilation), generator_net(channels),
                       SlidingWindowInferer(roi_size=(32, 32, 16)))
    DatasetProtector(open_dataset(data), output, method, checkpoint).run()
    failures, cases = verify_copy(data, output)
    assert failures == [] and cases == (2 if layout == "brats" else 1)
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    record = manifest["cases"][0]
    label = np.asanyarray(nib.load(data / record["label"]).dataobj)
    if roi_dilation:  # voxels of the dilation band changed, and verify allowed them
        assert record["fraction_voxels_changed"] > (label > 0).mean()
    # the same copy judged with a narrower ROI than protect used fails on exactly those band voxels
    manifest["parameters"]["roi_dilation"] = 0
    (output / "voxshield_manifest.json").write_text(json.dumps(manifest))
    failures, _ = verify_copy(data, output)
    assert bool(failures) == bool(roi_dilation)
    assert all("outside the ROI (label == 0) changed" in line for line in failures)


@pytest.mark.parametrize("method", ["umed", "random_everywhere"])
def test_verify_follows_the_methods_support(method, tmp_path, single_thread):
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    from custom.data import open_dataset
    from custom.perturbation import ROIBoundedPerturbation
    from custom.protect import DatasetProtector
    from custom.protectors import RandomNoise, UMed

    data = make_demo_dataset(tmp_path / "data", "flare", num_cases=2, shape=(32, 32, 16))
    output, checkpoint = tmp_path / "out", None
    if method == "umed":  # noise on the label and on its contour band outside it
        surrogate = UNet(3, 1, 5, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
        checkpoint = tmp_path / "surrogate.pt"
        torch.save(surrogate.state_dict(), checkpoint)
        (tmp_path / "training_config.json").write_text(json.dumps({"method": "umed"}))
        protection = UMed(ROIBoundedPerturbation(), surrogate, segmentation_loss=DiceCELoss(to_onehot_y=True, softmax=True),
                          steps=1, divisible=4)
    else:  # noise on every voxel
        protection = RandomNoise(ROIBoundedPerturbation(mask_roi=False))
    DatasetProtector(open_dataset(data), output, protection, checkpoint).run()
    label = label_of(data)
    changed = nib.load(output / IMAGE).get_fdata() != nib.load(data / IMAGE).get_fdata()
    assert changed[label == 0].any()  # the method changed voxels outside the label, as it may
    assert verify_copy(data, output) == ([], 2)
    if method == "umed":  # a voxel 3 voxels from the label lies beyond the 1-voxel band: verify still guards it
        far = np.argwhere((label == 0) & ~dilate(label > 0, 2))[0]
        rewrite_voxels(output / IMAGE, lambda values: values.__setitem__(tuple(far), values[tuple(far)] + 1))
        failures, _ = verify_copy(data, output)
        assert any("1 stored voxel(s) outside the ROI (label == 0) changed" in line for line in failures)
