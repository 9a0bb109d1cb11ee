"""The evaluate workflow: held-out split, regions, and an end-to-end run on tiny data."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_bundle, run_in_process
from custom.data import open_dataset
from custom.evaluate import BRATS_REGIONS, evaluation_regions, held_out_split, manifest_protection, score_cases
from custom.nifti_io import VoxShieldInputError
from test_protect import protector


def msd_copy(flare_data, root, test_ids):
    """The flare demo as an MSD dataset whose "test" list holds ``test_ids``."""
    entries = {"training": [], "test": []}
    for case in open_dataset(flare_data).cases:
        for name in case.images + [case.label]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes((flare_data / name).read_bytes())
        entry = {"image": case.images[0], "label": case.label}
        entries["test" if case.case_id in test_ids else "training"].append(entry)
    meta = {"name": "tiny", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "pancreas"}, **entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_held_out_split(flare_data, tmp_path):
    msd = msd_copy(flare_data, tmp_path / "msd", {"train_002"})
    train, test = held_out_split(str(msd), str(msd))
    assert [c.case_id for c in test.cases] == ["train_002_0000"]
    assert [c.case_id for c in train.cases] == ["train_000_0000", "train_001_0000"]
    # A protected copy of the whole dataset: test ids named explicitly never reach training.
    train, test = held_out_split(str(flare_data), str(flare_data), ["train_001"])
    assert [c.case_id for c in train.cases] == ["train_000", "train_002"]
    listing = tmp_path / "test.txt"
    listing.write_text("train_000\ntrain_002\n")
    train, test = held_out_split(str(flare_data), str(flare_data), str(listing))
    assert [c.case_id for c in train.cases] == ["train_001"] and len(test.cases) == 2
    with pytest.raises(VoxShieldInputError, match=r"test cases \['nope'\] not found"):
        held_out_split(str(flare_data), str(flare_data), ["nope"])
    with pytest.raises(VoxShieldInputError, match="flare layout has no test list; give --test_list"):
        held_out_split(str(flare_data), str(flare_data))
    with pytest.raises(VoxShieldInputError, match="no training cases left"):
        held_out_split(str(flare_data), str(flare_data), ["train_000", "train_001", "train_002"])


def test_manifest_protection_reads_old_and_new_manifests(tmp_path):
    fitted = {"checkpoint": "generator.pt", "sha256": "0" * 64, "training": {"epochs": 10}}
    parameters = {"eps": 4 / 255}
    for key, folder in (("fitted", tmp_path / "new"), ("generator", tmp_path / "old")):
        folder.mkdir()
        (folder / "voxshield_manifest.json").write_text(json.dumps(
            {"method": "voxshield", "parameters": parameters, key: fitted, "cases": []}))
        assert manifest_protection(folder) == {"method": "voxshield", "parameters": parameters, "fitted": fitted}
    assert manifest_protection(tmp_path) is None  # clean data: no manifest


class Threshold(torch.nn.Module):
    """Two-class logits that call every normalised intensity above 0.5 foreground."""

    def forward(self, image):
        return torch.cat([0.5 - image, image - 0.5], dim=1)


def test_score_cases_segments_and_scores_each_case(tmp_path):
    # An MRI volume of 100 and 1000 (its non-zero percentiles, so normalised to 0 and 1) whose bright
    # cube is the label shifted by ``shift`` voxels along the first axis:
    # Dice = 2 * overlap / (512 + 512), overlap = (8 - shift) * 64.
    entries = []
    for case_id, shift in (("a", 0), ("b", 2), ("c", 8)):
        image, label = np.full((20, 16, 16), 100, np.float32), np.zeros((20, 16, 16), np.uint8)
        image[4 + shift:12 + shift, 4:12, 4:12] = 1000
        label[4:12, 4:12, 4:12] = 1
        for folder, volume in (("imagesTr", image), ("labelsTr", label)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / folder / f"{case_id}.nii.gz")
        entries.append({"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "cubes", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "atrium"}, "training": entries}))

    records = score_cases(Threshold(), lambda image, network: network(image), open_dataset(tmp_path))

    assert [r["case_id"] for r in records] == ["a", "b", "c"]
    assert [r["regions"]["atrium"]["dice"] for r in records] == pytest.approx([1.0, 2 * 6 * 64 / 1024, 0.0])
    assert records[0]["regions"]["atrium"]["hd95_mm"] == pytest.approx(0.0)
    assert records[1]["regions"]["atrium"]["hd95_mm"] == pytest.approx(2.0)  # every shifted face is 2 voxels off


def test_regions(flare_data, brats_data):
    assert evaluation_regions(open_dataset(brats_data)) == BRATS_REGIONS
    assert evaluation_regions(open_dataset(flare_data)) == {"liver": [1], "kidney": [2], "spleen": [3], "pancreas": [4]}


def test_evaluate_end_to_end(flare_data, tmp_path, random_checkpoints):
    protected = tmp_path / "protected"
    manifest = protector(flare_data, protected, random_checkpoints[1], 1).run()
    runs = {}
    # the clean run is the README's command in a fresh interpreter, the protected one the same entry in this process
    for kind, train_dir, run in (("clean", flare_data, run_bundle), ("protected", protected, run_in_process)):
        result = run(
            "evaluate", "--train_dir", str(train_dir), "--test_dir", str(flare_data), "--test_list", "['train_002']",
            "--epochs", "1", "--patch_size", "[32,32,16]", "--output_dir", str(tmp_path / kind),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[kind] = json.loads((tmp_path / kind / "results.json").read_text())
        assert (tmp_path / kind / "results.md").read_text().startswith("# Victim unet")
        assert list((tmp_path / kind / "tensorboard").glob("events.out.tfevents.*"))
    clean, attacked = runs["clean"], runs["protected"]
    assert clean["run"]["method"] == "clean" and clean["imperceptibility"] is None
    assert attacked["run"]["method"] == "voxshield"
    assert attacked["protection"]["fitted"]["sha256"] == manifest["fitted"]["sha256"]
    for results in runs.values():
        assert results["run"]["test_cases"] == ["train_002"] and results["run"]["train_cases"] == 2
        assert results["recipe"]["iterations"] == 1 and results["recipe"]["augmentation"] is False
        case = results["metrics"]["cases"][0]
        diagonal = math.sqrt((32 * 0.8) ** 2 + (32 * 0.8) ** 2 + (16 * 2.5) ** 2)
        for region in case["regions"].values():
            assert 0 <= region["dice"] <= 1 and 0 <= region["hd95_mm"] <= diagonal + 1e-9
        assert {"train", "evaluate", "total"} <= set(results["wall_time_s"])
        assert results["hardware"]["cpu_cores"] >= 1
    # Imperceptibility measured by evaluate agrees with what protect wrote in its manifest.
    by_case = {record["case_id"]: record for record in manifest["cases"]}
    for record in attacked["imperceptibility"]["cases"]:
        expected = by_case[record["case_id"]]
        for key in ("psnr_db_volume", "psnr_db_roi", "ssim_3d_volume", "ssim_3d_roi", "fraction_voxels_changed"):
            assert record[key] == pytest.approx(expected[key], rel=1e-6), key
    assert {r["case_id"] for r in attacked["imperceptibility"]["cases"]} == {"train_000", "train_001"}
    assert attacked["imperceptibility"]["aggregate"]["psnr_db_volume"] > 40
