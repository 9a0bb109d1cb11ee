"""Every method through the same bundle commands a user runs: `run training --method M`,
`run protect --method M`, `run evaluate --method M`, and the CLI's `voxshield protect --method M`.
The workflows run in this process through monai.bundle's own entry (conftest.run_in_process); the
one-line report of a wrong --method is checked in a fresh process (conftest.run_bundle)."""

import json

import nibabel as nib
import pytest
import torch
from monai.networks.nets import UNet

from checks import assert_protected_copy
from conftest import EPS, run_bundle, run_in_process
from custom.cli import main as cli_main
from custom.data import open_dataset

SMALL_SURROGATE = ["--surrogate_def#channels", "[8,16,32]", "--surrogate_def#strides", "[2,2]",
                   "--surrogate_def#num_res_units", "0"]


def small_surrogate(data) -> UNet:
    """The surrogate that SMALL_SURROGATE makes the bundles build for ``data``."""
    return UNet(3, 1, open_dataset(data).num_classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=0,
                norm="INSTANCE")


def fit_and_protect(method, data, tmp_path, *extra):
    ckpt, output = tmp_path / "ckpt", tmp_path / "protected"
    trained = run_in_process("training", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--log_dir",
                             str(tmp_path / "logs"), "--epochs", "1", "--patch_size", "[32,32,16]", "--method", method,
                             *SMALL_SURROGATE, *extra)
    assert trained.returncode == 0, trained.stderr[-3000:]
    protected = run_in_process("protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir",
                               str(output), "--method", method, "--pgd_steps", "2", *SMALL_SURROGATE, *extra)
    assert protected.returncode == 0, protected.stderr[-3000:]
    return ckpt, output, trained.stdout + trained.stderr


@pytest.mark.parametrize("method, support_dilation, extra", [
    ("em", 0, []), ("tap", 0, []), ("umed", 1, []), ("lsp", 0, []),
    ("carrier", 1, ["--roi_dilation", "1", "--carrier_period", "4", "--carrier_orientation", "random"]),
    ("convolution", 0, ["--convolution_blur", "0.5"]),
])
def test_method_through_the_bundle_commands(method, support_dilation, extra, flare_data, tmp_path):
    ckpt, output, log = fit_and_protect(method, flare_data, tmp_path, *extra)
    manifest = assert_protected_copy(flare_data, output, EPS, ct=True, support_dilation=support_dilation)
    assert manifest["method"] == method
    record = json.loads((ckpt / "training_config.json").read_text())
    assert record["method"] == method
    if method in ("lsp", "carrier", "convolution"):
        assert f"{method} is training-free: nothing to fit" in log
        assert sorted(path.name for path in ckpt.iterdir()) == ["training_config.json"]
        assert manifest["fitted"] is None
        expected = {"lsp": {"patch_size": 8}, "carrier": {"period": 4.0, "orientation": "random", "axes": [0, 1]},
                    "convolution": {"kernel_size": 3, "blur": 0.5}}[method]
        assert {key: manifest["parameters"][key] for key in expected} == expected
    else:
        assert sorted(path.name for path in ckpt.iterdir()) == ["surrogate.pt", "training_config.json"]
        assert manifest["fitted"]["training"] == record
        assert manifest["parameters"]["steps"] == 2  # the protect-time override is what the manifest records
        surrogate = torch.load(ckpt / "surrogate.pt", weights_only=True)
        small_surrogate(flare_data).load_state_dict(surrogate)  # strict, unwrapped
    if support_dilation:  # UMed's contour band, the carrier's band: noise outside the label too
        case = manifest["cases"][0]
        label = nib.load(flare_data / case["label"]).get_fdata()
        changed = nib.load(output / case["images"][0]).get_fdata() != nib.load(flare_data / case["images"][0]).get_fdata()
        assert changed[label == 0].any()


def test_evaluate_checks_the_method_of_its_training_data(flare_data, tmp_path):
    output = tmp_path / "protected"  # random is training-free: protect alone makes its copy
    protected = run_in_process("protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(tmp_path / "ckpt"),
                               "--output_dir", str(output), "--method", "random")
    assert protected.returncode == 0, protected.stderr[-3000:]
    wrong = run_bundle("evaluate", "--train_dir", str(output), "--test_dir", str(flare_data),
                       "--test_list", "['train_002']", "--method", "em", "--epochs", "1",
                       "--output_dir", str(tmp_path / "eval"))
    assert wrong.returncode != 0
    assert f"voxshield: error: {output}: holds 'random' data, not 'em'" in wrong.stderr
    assert not (tmp_path / "eval").exists()
    right = run_in_process("evaluate", "--train_dir", str(output), "--test_dir", str(flare_data),
                           "--test_list", "['train_002']", "--method", "random", "--epochs", "1", "--patch_size",
                           "[32,32,16]", "--output_dir", str(tmp_path / "eval"))
    assert right.returncode == 0, right.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["run"]["method"] == "random" and results["protection"]["fitted"] is None


def test_switches_given_as_words_on_the_bundle_command_line_are_booleans(flare_data, tmp_path):
    """fire passes `--mask_roi false` as the string "false", which is truthy: a copy said to cover the whole
    volume would have covered the label only. The configs read such switches with bundle_utils.as_bool."""
    ckpt, output = tmp_path / "ckpt", tmp_path / "protected"
    trained = run_in_process("training", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt), "--log_dir",
                             str(tmp_path / "logs"), "--method", "random", "--mask_roi", "false", "--amp", "false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    record = json.loads((ckpt / "training_config.json").read_text())
    assert record["mask_roi"] is False and record["amp"] is False
    protected = run_in_process("protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt),
                               "--output_dir", str(output), "--method", "random", "--mask_roi", "false")
    assert protected.returncode == 0, protected.stderr[-3000:]
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    assert manifest["parameters"]["mask_roi"] is False
    case = manifest["cases"][0]
    label = nib.load(flare_data / case["label"]).get_fdata()
    changed = nib.load(output / case["images"][0]).get_fdata() != nib.load(flare_data / case["images"][0]).get_fdata()
    assert changed[label == 0].mean() > 0.5, "a whole-volume copy left the background untouched"
    wrong = run_in_process("protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt),
                           "--output_dir", str(tmp_path / "wrong"), "--method", "random", "--mask_roi", "perhaps")
    assert wrong.returncode != 0 and "--mask_roi must be true or false, got 'perhaps'" in wrong.stderr
    assert not (tmp_path / "wrong").exists()


def test_protect_with_a_checkpoint_of_another_method_or_bound_fails(flare_data, tmp_path):
    """The refusal reads only training_config.json beside the checkpoint, so the fitted em surrogate is
    written here as training would leave it (its record's method and perturbation settings)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(small_surrogate(flare_data).state_dict(), ckpt / "surrogate.pt")
    (ckpt / "training_config.json").write_text(json.dumps(
        {"method": "em", "eps": EPS, "roi_dilation": 0, "squash": "tanh", "mask_roi": True}))
    other = run_in_process("protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt), "--output_dir",
                           str(tmp_path / "other"), "--method", "sep", *SMALL_SURROGATE)
    assert other.returncode != 0
    assert "surrogate.pt: fitted for method 'em', not 'sep'; pass the same --method" in other.stderr
    assert not (tmp_path / "other").exists()
    wider = run_in_process("protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt), "--output_dir",
                           str(tmp_path / "wider"), "--method", "em", "--roi_dilation", "2", *SMALL_SURROGATE)
    assert wider.returncode != 0
    assert ("surrogate.pt: fitted with other perturbation settings (roi_dilation 0 at training, 2 here); "
            "pass the same values") in wider.stderr
    assert not (tmp_path / "wider").exists()


def test_cli_protect_with_a_training_free_method_trains_nothing(flare_data, tmp_path, capsys):
    ckpt, output = tmp_path / "ckpt", tmp_path / "out"
    cli_main(["protect", "--dataset_dir", str(flare_data), "--ckpt_dir", str(ckpt), "--output_dir", str(output),
              "--method", "random"])
    assert not ckpt.exists()
    assert "fitting" not in capsys.readouterr().out
    assert assert_protected_copy(flare_data, output, EPS, ct=True)["method"] == "random"
    with pytest.raises(SystemExit) as stop:
        cli_main(["protect", "--dataset_dir", str(flare_data), "--output_dir", str(tmp_path / "x"), "--method", "pgd"])
    assert stop.value.code == 2
    assert "unknown method 'pgd'; choose one of voxshield, em, tap" in capsys.readouterr().err
