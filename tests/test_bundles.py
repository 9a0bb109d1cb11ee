"""Both bundles end to end through `python -m monai.bundle run`, from the repository root with no
PYTHONPATH: configs import `custom` from the working directory, which `python -m` puts on sys.path.
FLARE's training and protect run as the README's commands in a fresh interpreter; the rest runs through
the same entry in this process (conftest.run_in_process)."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from checks import assert_protected_copy
from conftest import EPS, REPO_ROOT, generator_net, run_bundle, run_in_process
from custom import bundle_utils
from custom.augmentation import ExploiterAugmentation

CASES = [("voxshield_flare", "flare_data", True, 1), ("voxshield_brats", "brats_data", False, 4)]
# the surrogate is only checked to be saved: a narrow one trains in a fraction of the default's time
NARROW_SURROGATE = ["--surrogate_def#channels", "[8,16,16,32,32]"]


@pytest.mark.parametrize("bundle, data_fixture, ct, channels", CASES)
def test_surrogate_schedule_is_a_config_value(bundle, data_fixture, ct, channels, request):
    """train.json's default updates F on every batch and never restarts it; --surrogate_batches_per_epoch
    and --surrogate_restart_every reach VoxShield and the training record."""
    parser = ConfigParser()
    parser.read_config(bundle_utils.config_files(bundle, "training"))
    parser["dataset_dir"] = str(request.getfixturevalue(data_fixture))
    assert parser.get_parsed_content("protectors#voxshield").surrogate_batches_per_epoch is None
    parser["surrogate_batches_per_epoch"] = 10
    parser.parse()
    assert parser.get_parsed_content("protectors#voxshield").surrogate_batches_per_epoch == 10
    assert parser.get_parsed_content("training_record#surrogate_batches_per_epoch") == 10
    assert parser.get_parsed_content("protectors#voxshield").surrogate_restart_every is None
    parser["surrogate_restart_every"] = 40
    parser.parse()
    assert parser.get_parsed_content("protectors#voxshield").surrogate_restart_every == 40
    assert parser.get_parsed_content("training_record#surrogate_restart_every") == 40


@pytest.mark.parametrize("bundle, data_fixture, ct, channels", CASES)
def test_fit_augmentation_is_a_config_switch(bundle, data_fixture, ct, channels, request):
    """train.json fits VoxShield on the data as it is by default; --fit_augmentation true fits it through
    the exploiter's augmentation, drawn from the run's seed, and the training record says so."""
    parser = ConfigParser()
    parser.read_config(bundle_utils.config_files(bundle, "training"))
    parser["dataset_dir"] = str(request.getfixturevalue(data_fixture))
    assert parser.get_parsed_content("protectors#voxshield").augmentation is None
    assert parser.get_parsed_content("training_record#fit_augmentation") is False
    parser["fit_augmentation"], parser["seed"] = "true", 7
    parser.parse()
    augmentation = parser.get_parsed_content("protectors#voxshield").augmentation
    assert isinstance(augmentation, ExploiterAugmentation) and augmentation.random.initial_seed() == 7
    assert parser.get_parsed_content("training_record#fit_augmentation") is True
    parser["fit_augmentation"] = "perhaps"
    parser.parse()
    with pytest.raises(RuntimeError) as raised:  # MONAI's resolver wraps the error of the switch's expression
        parser.get_parsed_content("protectors#voxshield")
    assert str(raised.value.__cause__) == "--fit_augmentation must be true or false, got 'perhaps'."


@pytest.mark.parametrize("bundle, data_fixture, ct, channels", CASES)
def test_train_then_protect(bundle, data_fixture, ct, channels, request, tmp_path):
    data = request.getfixturevalue(data_fixture)
    ckpt, logs, output = tmp_path / "ckpt", tmp_path / "logs", tmp_path / "protected"
    readme_run = run_bundle if bundle == "voxshield_flare" else run_in_process
    trained = readme_run(
        "training", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--log_dir", str(logs),
        "--epochs", "2", "--patch_size", "[32,32,16]", *NARROW_SURROGATE, bundle=bundle,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Epoch[2] Complete" in trained.stdout + trained.stderr
    state = torch.load(ckpt / "generator.pt", weights_only=True)
    generator_net(channels).load_state_dict(state)  # strict: a flat, unwrapped state_dict
    assert (ckpt / "surrogate.pt").is_file()
    assert list(logs.glob("events.out.tfevents.*")), "no TensorBoard log"

    protected = readme_run(
        "protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(output),
        "--window_size", "[32,32,16]", bundle=bundle,
    )
    assert protected.returncode == 0, protected.stderr[-3000:]
    manifest = assert_protected_copy(data, output, EPS, ct=ct)
    assert manifest["dataset"]["layout"] == ("flare" if ct else "brats")
    record = json.loads((ckpt / "training_config.json").read_text())
    assert (record["lambda_spd"], record["lambda_isc"], record["epochs"]) == (0.05, 0.2, 2)
    assert manifest["fitted"]["training"] == record

    again = run_in_process(
        "protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(output), bundle=bundle,
    )
    assert again.returncode != 0 and "output folder exists; pass --overwrite true" in again.stderr
    replaced = run_in_process(
        "protect", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(output),
        "--window_size", "[32,32,16]", "--overwrite", "true", bundle=bundle,
    )
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert_protected_copy(data, output, EPS, ct=ct)


def test_bundle_root_and_demo_default(tmp_path):
    assert Path(bundle_utils.bundle_root("voxshield_flare")) == REPO_ROOT / "bundles" / "voxshield_flare"
    demo = Path(bundle_utils.demo_dataset(str(tmp_path), "brats"))
    assert demo == tmp_path / "demo_data" and (demo / "HGG").is_dir()


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("1", True), (False, False)])
def test_cli_booleans(text, expected):
    assert bundle_utils.as_bool(text, "overwrite") is expected


def test_cli_boolean_typo_is_an_error():
    with pytest.raises(ValueError, match="--overwrite must be true or false"):
        bundle_utils.as_bool("ture", "overwrite")
