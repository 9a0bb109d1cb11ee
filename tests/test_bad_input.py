"""Every kind of bad input stops protect before anything is written, with one line naming the file."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import run_bundle
from custom.data import open_dataset
from custom.nifti_io import VoxShieldInputError
from test_protect import protector

IMAGE = "TrainingImg/train_001_0000.nii.gz"
LABEL = "TrainingMask/train_001.nii.gz"


def rewrite(path, array, affine=None):
    original = nib.load(path)
    nib.save(nib.Nifti1Image(array, original.affine if affine is None else affine), path)


def missing_image(root):
    (root / IMAGE).unlink()
    return IMAGE, "file not found"


def corrupt_nifti(root):
    (root / IMAGE).write_bytes(b"this is not a nifti file")
    return IMAGE, "corrupt NIfTI"


def truncated_gzip(root):
    data = gzip.decompress((root / IMAGE).read_bytes())
    (root / IMAGE).write_bytes(gzip.compress(data[: len(data) // 2]))
    return IMAGE, "corrupt NIfTI"


def shape_mismatch(root):
    rewrite(root / IMAGE, np.zeros((32, 30, 16), np.int16))
    return IMAGE, "differs from label shape"


def affine_mismatch(root):
    image = nib.load(root / IMAGE)
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    rewrite(root / IMAGE, np.asanyarray(image.dataobj), shifted)
    return IMAGE, "affine differs from the label's affine"


def nan_values(root):
    data = nib.load(root / IMAGE).get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    rewrite(root / IMAGE, data)
    return IMAGE, "contains NaN or Inf"


def inf_values(root):
    data = nib.load(root / IMAGE).get_fdata().astype(np.float32)
    data[4, 4, 4] = np.inf
    rewrite(root / IMAGE, data)
    return IMAGE, "contains NaN or Inf"


def two_channels(root):
    data = np.asanyarray(nib.load(root / IMAGE).dataobj)
    rewrite(root / IMAGE, np.stack([data, data], axis=-1))
    return IMAGE, "does not hold 1 channel"


def image_2d(root):
    rewrite(root / IMAGE, np.zeros((32, 32), np.int16))
    return IMAGE, "2D image"


def label_4d(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj)
    rewrite(root / LABEL, data[..., None].repeat(2, -1))
    return LABEL, "label must be a 3D volume"


def non_integer_label(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    rewrite(root / LABEL, data)
    return LABEL, "non-integer values"


def unknown_label_value(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj).copy()
    data[0, 0, 0] = 9
    rewrite(root / LABEL, data)
    return LABEL, r"label values \[9\] are not in the dataset's labels"


def empty_label(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj)
    rewrite(root / LABEL, np.zeros_like(data))
    return LABEL, "label is empty"


BREAKAGES = [
    missing_image, corrupt_nifti, truncated_gzip, shape_mismatch, affine_mismatch, nan_values, inf_values,
    two_channels, image_2d, label_4d, non_integer_label, unknown_label_value, empty_label,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_bad_case_stops_before_any_write(breakage, flare_data, tmp_path, random_checkpoints):
    name, message = breakage(flare_data)
    output = tmp_path / "out"
    with pytest.raises(VoxShieldInputError, match=message) as raised:
        protector(flare_data, output, random_checkpoints[1], 1).run()
    text = str(raised.value)
    assert text.startswith(str(flare_data / name)) and "\n" not in text
    assert not output.exists()


def test_dataset_level_errors(tmp_path, flare_data, random_checkpoints):
    with pytest.raises(VoxShieldInputError, match="dataset folder not found"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxShieldInputError, match="cannot tell the dataset layout"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text("{not json")
    with pytest.raises(VoxShieldInputError, match=r"empty/dataset.json: unreadable dataset.json"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(VoxShieldInputError, match="not a valid msd dataset.json"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(VoxShieldInputError, match="missing.pt: voxshield checkpoint not found"):
        protector(flare_data, tmp_path / "out", tmp_path / "missing.pt", 1).run()
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line_and_fails(flare_data, tmp_path, random_checkpoints):
    nan_values(flare_data)
    output = tmp_path / "out"
    result = run_bundle(
        "protect", "--dataset_dir", str(flare_data), "--checkpoint", str(random_checkpoints[1]),
        "--output_dir", str(output),
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"voxshield: error: {flare_data / IMAGE}: contains NaN or Inf values."
    assert "Traceback" not in result.stderr
    assert not output.exists()
    result = run_bundle(
        "training", "--dataset_dir", str(flare_data), "--ckpt_dir", str(tmp_path / "ckpt"), "--epochs", "1",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"voxshield: error: {flare_data / IMAGE}: contains NaN or Inf values."
    assert not (tmp_path / "ckpt" / "generator.pt").exists()
