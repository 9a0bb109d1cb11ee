"""custom.manifest: writing a protected copy's manifest and reading it back."""

import datetime
import json
from pathlib import Path

import pytest

from custom.data import DatasetSpec
from custom.manifest import (
    MANIFEST_NAME,
    build_manifest,
    fitted_record,
    manifest_protection,
    read_manifest,
    write_manifest,
)
from custom.nifti_io import VoxShieldInputError

FITTED = {"checkpoint": "generator.pt", "sha256": "0" * 64, "training": {"epochs": 10}}


def test_fitted_record_reads_old_and_new_keys():
    assert fitted_record({"fitted": FITTED}) == FITTED
    assert fitted_record({"generator": FITTED}) == FITTED  # written before the key was renamed
    assert fitted_record({"fitted": None}) is None  # a training-free method


def test_manifest_protection_reads_old_and_new_manifests(tmp_path):
    parameters = {"eps": 4 / 255}
    for key, folder in (("fitted", tmp_path / "new"), ("generator", tmp_path / "old")):
        folder.mkdir()
        (folder / "voxshield_manifest.json").write_text(json.dumps(
            {"method": "voxshield", "parameters": parameters, key: FITTED, "cases": []}))
        assert manifest_protection(folder) == {"method": "voxshield", "parameters": parameters, "fitted": FITTED}
    assert manifest_protection(tmp_path) is None  # clean data: no manifest


def test_written_manifest_reads_back(tmp_path):
    spec = DatasetSpec(root=Path("/data/flare"), layout="flare", cases=[], channel_names=["CT"], labels={0: "bg"},
                       normalisation=["ct"])
    cases = [{"case_id": "train_000", "images": ["a.nii.gz"], "label": "b.nii.gz", "protected": True, "files": {}}]
    manifest = build_manifest(spec, "random", {"eps": 0.25, "seed": 3}, 0.25, None, cases, {"dataset.json": "f" * 64})
    write_manifest(tmp_path, manifest)

    read = read_manifest(tmp_path)
    assert read == json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest
    assert read["format"] == "voxshield-manifest/1"
    assert (read["method"], read["parameters"], read["eps_normalised"]) == ("random", {"eps": 0.25, "seed": 3}, 0.25)
    assert read["fitted"] is None and read["cases"] == cases and read["copied_files"] == {"dataset.json": "f" * 64}
    assert read["dataset"] == {"source": "/data/flare", "layout": "flare", "channels": ["CT"], "normalisation": ["ct"],
                               "ct_window_hu": list(spec.ct_window), "mri_percentiles": list(spec.mri_percentiles)}
    created = datetime.datetime.fromisoformat(read["created"])
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(minutes=5)
    assert set(read["metric_definitions"]) == {"psnr_db_volume", "psnr_db_roi", "ssim_3d_volume", "ssim_3d_roi",
                                               "max_abs_delta_normalised"}


def test_read_manifest_names_the_file_when_it_is_missing_broken_or_empty(tmp_path):
    path = tmp_path / MANIFEST_NAME
    with pytest.raises(VoxShieldInputError, match=f"{path}: missing or unreadable protection manifest"):
        read_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(VoxShieldInputError, match=f"{path}: missing or unreadable protection manifest"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"cases": [{"images": []}]}))  # a case without its id
    with pytest.raises(VoxShieldInputError, match="unreadable protection manifest .*case_id"):
        read_manifest(tmp_path)
    path.write_text(json.dumps({"cases": []}))
    with pytest.raises(VoxShieldInputError, match=f"{path}: the manifest lists no cases"):
        read_manifest(tmp_path)
