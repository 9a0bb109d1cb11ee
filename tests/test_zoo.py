"""Model-zoo packaging: both bundles' metadata pass MONAI's verify_metadata against the schema kept in
the repository (offline) and verify_net_in_out for the generator; `voxshield export` writes a zip that
unpacks to a self-contained bundle, which protects a dataset with the repository out of reach."""

import filecmp
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import download_large_files, verify_metadata, verify_net_in_out

from conftest import REPO_ROOT, monai_bundle_in_process
from custom import cli
from custom.bundle_utils import config_files
from custom.demo import make_demo_dataset
from custom.nifti_io import VoxShieldInputError
from custom.verify import verify_copy
from custom.zoo import export_bundle

SCHEMA = REPO_ROOT / "schemas" / "monai_bundle_metadata.schema.json"
BUNDLES = {"voxshield_flare": 1, "voxshield_brats": 4}


def monai_bundle(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python -m monai.bundle ARGS` in a fresh interpreter with PYTHONPATH unset, one torch thread: for a
    bundle outside the repository, whose `custom` package this process cannot import beside the repository's."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def metadata(bundle: str) -> dict:
    return json.loads((REPO_ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())


# ---- metadata -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_metadata_offline(bundle):
    schema_before = SCHEMA.read_bytes()
    result = monai_bundle_in_process("verify_metadata", "--meta_file", f"bundles/{bundle}/configs/metadata.json",
                                     "--filepath", "schemas/monai_bundle_metadata.schema.json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "skipped downloading" in result.stdout and "metadata is verified with no error" in result.stdout
    assert SCHEMA.read_bytes() == schema_before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda meta: meta.pop("version"), "'version' is a required property"),
        (lambda meta: meta.update(version="0.1"), "does not match"),
        (lambda meta: meta.pop("required_packages_version"), "'required_packages_version' is a required property"),
        (lambda meta: meta.update(optional_packages_version={"nibabel": "5.4.2"}), "optional_packages_version"),
        (lambda meta: meta["network_data_format"]["inputs"]["image"].pop("modality"), "'modality' is a required property"),
        (lambda meta: meta["network_data_format"]["outputs"]["pred"].pop("channel_def"), "'channel_def' is a required"),
        (lambda meta: meta["network_data_format"]["inputs"]["image"].update(spatial_shape=["8*m", 8, 8]), "8*m"),
        (lambda meta: meta["network_data_format"]["inputs"]["image"].update(format="HU"), "'HU' is not one of"),
        (lambda meta: meta["changelog"].update({"next": "x"}), "does not match"),
    ],
)
def test_schema_rejects_incomplete_metadata(change, message, tmp_path):
    meta = metadata("voxshield_flare")
    change(meta)
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as error:
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA))
    assert message in str(error.value)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_content(bundle):
    meta = metadata(bundle)
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert meta["version"] == version and version in meta["changelog"]
    assert meta["intended_use"] and meta["data_source"]
    references = " ".join(meta["references"])
    assert "arXiv:2605.17345" in references and "Medical Segmentation Decathlon" in references
    assert ("FLARE" if bundle == "voxshield_flare" else "BRATS") in references
    pins = (REPO_ROOT / "requirements.txt").read_text()
    requirements = dict(re.findall(r"^([A-Za-z0-9_-]+)==(\S+)", pins, re.MULTILINE))
    assert meta["monai_version"] == requirements["monai"] and meta["pytorch_version"] == requirements["torch"]
    for package, pinned in meta["required_packages_version"].items():
        assert requirements.get(package) == pinned, package
    for role in ("inputs", "outputs"):
        (tensor,) = meta["network_data_format"][role].values()
        assert tensor["num_channels"] == BUNDLES[bundle] and tensor["spatial_shape"] == ["8*n"] * 3


# ---- the generator's input and output -----------------------------------------------------------
def test_verify_net_in_out_cli():
    configs = [Path(path).relative_to(REPO_ROOT).as_posix() for path in config_files("voxshield_flare", "protect")]
    result = monai_bundle_in_process(
        "verify_net_in_out", "generator_def", "--meta_file", "bundles/voxshield_flare/configs/metadata.json",
        "--config_file", repr(configs), "--n", "2", "--device", "cpu",
        "--generator_def#in_channels", "1", "--generator_def#out_channels", "1",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "data shape of network is verified with no error" in result.stdout


@pytest.mark.parametrize("bundle", BUNDLES)
def test_verify_net_in_out(bundle):
    channels = BUNDLES[bundle]
    arguments = {"net_id": "generator_def", "meta_file": str(REPO_ROOT / "bundles" / bundle / "configs" / "metadata.json"),
                 "config_file": config_files(bundle, "protect"), "n": 2, "device": "cpu", "generator_def#in_channels": channels}
    verify_net_in_out(**arguments, **{"generator_def#out_channels": channels})
    with pytest.raises(ValueError, match=f"output channel number `{channels + 1}` doesn't match: `{channels}`"):
        verify_net_in_out(**arguments, **{"generator_def#out_channels": channels + 1})


# ---- export ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """1 epoch of generator training on a tiny FLARE dataset, through `voxshield train` in this process."""
    root = tmp_path_factory.mktemp("zoo")
    data = make_demo_dataset(root / "data", "flare", num_cases=3, shape=(32, 32, 16))
    threads, hook = torch.get_num_threads(), sys.excepthook
    torch.set_num_threads(1)
    try:
        cli.main(["train", "--bundle", "flare", "--dataset_dir", str(data), "--ckpt_dir", str(root / "ckpt"),
                  "--epochs", "1", "--patch_size", "[32,32,16]", "--batch_size", "3",
                  "--surrogate_def#channels", "[8,16,16,32,32]"])
    finally:
        torch.set_num_threads(threads)
        sys.excepthook = hook
    assert (root / "ckpt" / "generator.pt").is_file()
    return data, root / "ckpt"


def test_export_runs_outside_the_repository(trained, tmp_path):
    data, ckpt = trained
    archive = tmp_path / "zoo" / "voxshield_flare.zip"
    cli.main(["export", "--bundle", "flare", "--ckpt_dir", str(ckpt), "--output", str(archive)])
    names = zipfile.ZipFile(archive).namelist()
    assert all(name.startswith("voxshield_flare/") for name in names)
    for required in ("LICENSE", "large_files.yml", "configs/metadata.json", "configs/protect.json", "configs/train.json",
                     "configs/logging.conf", "docs/README.md", "docs/data_license.txt", "models/generator.pt",
                     "models/training_config.json", "custom/__init__.py", "custom/bundle_utils.py", "custom/protect.py"):
        assert f"voxshield_flare/{required}" in names, required
    assert not any("__pycache__" in name or name.endswith(".pyc") or "demo_data" in name for name in names)

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(archive).extractall(unpacked)
    bundle = unpacked / "voxshield_flare"
    assert filecmp.cmp(bundle / "models" / "generator.pt", ckpt / "generator.pt", shallow=False)
    large = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [(item["path"], item["hash_type"]) for item in large] == [("models/generator.pt", "sha256")]
    digest = large[0]["hash_val"]
    download_large_files(bundle_path=str(bundle))  # offline: the file is there and its sha256 matches

    # the unpacked bundle, from its own folder, with no PYTHONPATH: the repository is out of reach
    imported = subprocess.run([sys.executable, "-c", "import custom; print(custom.__file__)"], cwd=bundle,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True,
                              text=True, check=False)
    assert Path(imported.stdout.strip()).parent == bundle / "custom"
    output = tmp_path / "protected"
    result = monai_bundle("run", "protect", "--config_file", "configs/protect.json", "--dataset_dir", str(data),
                          "--output_dir", str(output), "--window_size", "[32,32,16]", cwd=bundle)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    assert manifest["fitted"]["sha256"] == digest
    assert manifest["fitted"]["training"]["epochs"] == 1  # models/training_config.json travelled too
    assert verify_copy(data, output) == ([], 3)  # header bytes, support and bound included
    for record in manifest["cases"]:
        for name in record["images"]:
            assert not filecmp.cmp(output / name, data / name, shallow=False)  # protected, not copied
    assert str(REPO_ROOT) not in result.stdout + result.stderr

    # a damaged weight file is caught by the hash in large_files.yml
    (bundle / "models" / "generator.pt").write_bytes(b"damaged")
    with pytest.raises(Exception, match="hash check of existing file failed"):
        download_large_files(bundle_path=str(bundle))


def test_export_is_deterministic_and_refuses_to_clobber(trained, tmp_path):
    _, ckpt = trained
    folder = cli.locate_bundle("voxshield_flare")
    first = export_bundle(folder, "voxshield_flare", ckpt, tmp_path / "a.zip")
    second = export_bundle(folder, "voxshield_flare", ckpt, tmp_path / "b.zip", url="https://example.org/generator.pt")
    assert first.read_bytes() != second.read_bytes()  # the url differs
    again = export_bundle(folder, "voxshield_flare", ckpt, tmp_path / "a.zip", overwrite=True)
    assert filecmp.cmp(again, export_bundle(folder, "voxshield_flare", ckpt, tmp_path / "c.zip"), shallow=False)
    assert 'url: "https://example.org/generator.pt"' in zipfile.ZipFile(second).read("voxshield_flare/large_files.yml").decode()
    with pytest.raises(VoxShieldInputError, match="exists; pass --overwrite true"):
        export_bundle(folder, "voxshield_flare", ckpt, tmp_path / "a.zip")


def test_export_refuses_a_checkpoint_of_the_wrong_bundle(trained, tmp_path):
    _, ckpt = trained
    folder = cli.locate_bundle("voxshield_brats")
    with pytest.raises(VoxShieldInputError, match="not a generator state dict for voxshield_brats \\(4 channel"):
        export_bundle(folder, "voxshield_brats", ckpt, tmp_path / "brats.zip")
    assert not (tmp_path / "brats.zip").exists()
    with pytest.raises(VoxShieldInputError, match="generator checkpoint not found"):
        export_bundle(folder, "voxshield_brats", tmp_path, tmp_path / "brats.zip")
