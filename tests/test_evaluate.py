"""The evaluate workflow: held-out split, regions, and an end-to-end run on tiny data."""

import dataclasses
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import run_bundle, run_in_process
from custom.data import load_case, open_dataset
from custom.demo import make_demo_dataset
from custom.evaluate import (
    BRATS_REGIONS,
    evaluation_regions,
    held_out_split,
    score_cases,
    validation_split,
    whole_volume_size,
)
from custom.nifti_io import VoxShieldInputError
from custom.regrid import regrid_dataset
from custom.victims import build_victim
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
        assert results["recipe"]["countermeasure"] is None and results["recipe"]["countermeasure_settings"] is None
        assert results["recipe"]["amp"] is None  # recorded only when on, so earlier results pair with these
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


def test_validation_split_holds_out_training_cases_only(tmp_path):
    data = make_demo_dataset(tmp_path / "flare", "flare", num_cases=6, shape=(16, 16, 16))
    train, test = held_out_split(str(data), str(data), ["train_005"])
    fit, validation = validation_split(train, 0.2, seed=0)
    ids = [case.case_id for case in train.cases]
    assert len(validation.cases) == 1 and len(fit.cases) == 4  # round(0.2 x 5)
    assert {c.case_id for c in fit.cases} | {c.case_id for c in validation.cases} == set(ids)
    assert not {c.case_id for c in fit.cases} & {c.case_id for c in validation.cases}
    assert "train_005" not in {c.case_id for c in fit.cases + validation.cases}
    assert validation_split(train, 0.2, seed=0)[1].cases == validation.cases  # seeded
    assert validation_split(train, 0.0, seed=0) == (train, dataclasses.replace(train, cases=[]))
    with pytest.raises(VoxShieldInputError, match="5 training case.s. cannot give 5 validation case.s. and keep one"):
        validation_split(train, 1.0, seed=0)


def test_whole_volume_size_needs_one_grid(flare_data, tmp_path):
    assert whole_volume_size(open_dataset(flare_data)) == [32, 32, 16]
    other = make_demo_dataset(tmp_path / "other", "flare", num_cases=1, shape=(16, 16, 16))
    shutil.copy(other / "TrainingMask" / "train_000.nii.gz", flare_data / "TrainingMask" / "train_001.nii.gz")
    with pytest.raises(VoxShieldInputError, match=r"train_001.nii.gz: shape \(16, 16, 16\) differs from \(32, 32, 16\)"):
        whole_volume_size(open_dataset(flare_data))


def foreground_dice(prediction: np.ndarray, label: np.ndarray, classes: int) -> float:
    """Mean Dice over the foreground classes present in ``label`` (MONAI's MeanDice, ignore_empty)."""
    scores = [2 * ((prediction == c) & (label == c)).sum() / ((prediction == c).sum() + (label == c).sum())
              for c in range(1, classes) if (label == c).any()]
    return float(np.mean(scores))


def test_paper_recipe(tmp_path):
    """Whole volumes, a validation split of the training data, and the best-on-validation checkpoint
    scored beside the last one; the test case never enters training or validation."""
    data = make_demo_dataset(tmp_path / "flare", "flare", num_cases=5, shape=(32, 32, 16))
    grid = regrid_dataset(data, tmp_path / "grid", 32)
    output = tmp_path / "paper"
    result = run_bundle(
        "evaluate", "--train_dir", str(grid), "--test_list", "['train_004']", "--recipe_name", "paper",
        "--epochs", "2", "--victim", "unet", "--output_dir", str(output),  # the smaller UNet: a CPU test
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    recipe, validation = results["recipe"], results["validation"]
    assert recipe["name"] == "paper" and recipe["patch_size"] == [32, 32, 32] and recipe["batch_size"] == 8
    assert recipe["lr"] == 0.0005 and recipe["weight_decay"] == 0.0005 and recipe["betas"] == [0.9, 0.9999]
    assert recipe["loss"] == "DiceCE (softmax, background excluded)" and recipe["crops"] is False
    assert recipe["iterations"] == 2  # 3 fitted cases in one batch of 8, 2 epochs

    assert results["run"]["test_cases"] == ["train_004"]
    assert len(validation["cases"]) == 1 and len(validation["fitted_cases"]) == 3
    assert set(validation["cases"]) | set(validation["fitted_cases"]) == {"train_000", "train_001", "train_002", "train_003"}

    curve = validation["curve"]
    assert [point["epoch"] for point in curve] == [1, 2]
    scores = [point["score"] for point in curve]
    best = results["metrics_best_on_protected_validation"]
    assert best["epoch"] == 1 + int(np.argmax(scores))  # the first epoch reaching the highest score
    assert best["validation_score"] == max(scores) and validation["metric"] == "validation_mean_dice"
    assert 0 <= best["aggregate"]["mean_dice"] <= 1 and [c["case_id"] for c in best["cases"]] == ["train_004"]
    assert f"Best epoch on the validation split (1 training cases): {best['epoch']}" in (output / "results.md").read_text()

    # the saved checkpoint, run again on the validation case, gives the recorded validation score
    spec = open_dataset(grid)
    network = build_victim("unet", 1, spec.num_classes, [32, 32, 32])
    network.load_state_dict(torch.load(output / best["checkpoint"], weights_only=True))
    network.eval()
    case = next(c for c in spec.cases if c.case_id == validation["cases"][0])
    loaded = load_case(spec, case)
    with torch.no_grad():
        prediction = network(torch.as_tensor(loaded.image[None], dtype=torch.float32)).argmax(1)[0].numpy()
    assert foreground_dice(prediction, loaded.label, spec.num_classes) == pytest.approx(best["validation_score"], abs=1e-5)
