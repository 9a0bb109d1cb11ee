"""Training a victim segmenter on (clean or protected) data and scoring it on clean held-out cases."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.data import MetaTensor, partition_dataset
from tqdm import tqdm

from custom.data import BRATS_LABELS, DatasetSpec, load_case, normalise, open_dataset
from custom.manifest import MANIFEST_NAME, manifest_protection
from custom.markdown import markdown_table
from custom.metrics import PSNR_DESCRIPTION, SSIM_DESCRIPTION, imperceptibility
from custom.nifti_io import VoxShieldInputError, write_atomic
from custom.provenance import hardware, software_versions
from custom.seg_metrics import aggregate, case_metrics

RESULTS_NAME = "results.json"
TABLE_NAME = "results.md"
# MONAI's ConvertToMultiChannelBasedOnBratsClasses regions, as label groups, so that every dataset is
# scored through one path (custom.seg_metrics.region_masks)
BRATS_REGIONS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}


def evaluation_regions(spec: DatasetSpec) -> dict[str, list[int]]:
    """BraTS's nested regions WT/TC/ET for BraTS labels; otherwise one region per foreground label."""
    if spec.labels.keys() == BRATS_LABELS.keys():
        return dict(BRATS_REGIONS)
    return {spec.labels[value]: [value] for value in spec.label_values if value != 0}


def score_cases(network: torch.nn.Module, inferer, spec: DatasetSpec, device="cpu") -> list[dict]:
    """
    Segments every case of ``spec`` with ``network`` (in eval mode, through ``inferer``, on
    intensities normalised as protect and the victims see them) and scores it against its label.
    The inferer gets a ``(1, C, H, W, D)`` MetaTensor carrying the volume's affine (which
    custom.countermeasures.ResampledInferer needs) and returns logits on the same grid.

    Returns:
        one record per case: ``case_id`` and custom.seg_metrics.case_metrics's DSC and HD95 (mm,
        from the label's voxel spacing) per region of evaluation_regions(spec), with their means.
    """
    network.eval()
    regions, values = evaluation_regions(spec), np.array(spec.label_values)
    records = []
    for case in tqdm(spec.cases, desc="evaluate"):
        loaded = load_case(spec, case)
        image = MetaTensor(normalise(loaded.image, loaded.offsets, loaded.scales)[None], affine=loaded.affine,
                           device=device)
        with torch.no_grad():
            prediction = inferer(image, network).argmax(1)[0].cpu().numpy()
        spacing = nib.load(spec.root / case.label).header.get_zooms()[:3]
        metrics = case_metrics(values[prediction], loaded.label, spacing, regions)
        records.append({"case_id": case.case_id, **metrics})
    return records


def _only(spec: DatasetSpec, case_ids: set[str]) -> DatasetSpec:
    return dataclasses.replace(spec, cases=[case for case in spec.cases if case.case_id in case_ids])


def held_out_split(
    train_dir: str,
    test_dir: str,
    test_list: Sequence[str] | str | None = None,
    layout: str = "auto",
    normalisation: str = "auto",
) -> tuple[DatasetSpec, DatasetSpec]:
    """
    The victim's training cases and the clean test cases.

    Args:
        train_dir: data the victim trains on (clean, or a protected copy).
        test_dir: clean data; its held-out cases are the test set.
        test_list: case ids of the test set, or a JSON/text file listing them (one per line); None
            takes the dataset.json "test" list of ``test_dir``.
        layout, normalisation: as in custom.data.open_dataset.

    Returns:
        (train, test). Training cases are the ``training`` cases of ``train_dir`` minus every test
        case id, so a protected copy of the whole dataset never leaks test cases into training.
    """
    if isinstance(test_list, str):
        path = Path(test_list)
        if not path.is_file():
            raise VoxShieldInputError(f"{path}: test list not found.")
        text = path.read_text()
        test_list = json.loads(text) if path.suffix == ".json" else text.split()
    if test_list is None:
        test = open_dataset(test_dir, layout, normalisation, lists=["test"])
        if test.layout != "msd":
            raise VoxShieldInputError(f"{test.root}: {test.layout} layout has no test list; give --test_list.")
    else:
        test = open_dataset(test_dir, layout, normalisation, lists=["training", "test"])
        missing = sorted(set(test_list) - {case.case_id for case in test.cases})
        if missing:
            raise VoxShieldInputError(f"{test.root}: test cases {missing} not found.")
        test = _only(test, set(test_list))
    train = open_dataset(train_dir, layout, normalisation, lists=["training"])
    test_ids = {case.case_id for case in test.cases}
    train = _only(train, {case.case_id for case in train.cases} - test_ids)
    if not train.cases:
        raise VoxShieldInputError(f"{train.root}: no training cases left once the test cases are excluded.")
    if train.label_values != test.label_values or train.num_channels != test.num_channels:
        raise VoxShieldInputError(f"{train.root}: labels or channels differ from the test data {test.root}.")
    return train, test


def recipe_settings(recipes: dict[str, dict], name: str) -> dict:
    """The settings of the victim recipe ``name`` (configs/evaluate.json ``recipes``), or a ValueError
    listing the recipes."""
    if name not in recipes:
        raise ValueError(f"unknown recipe_name {name!r}; choose one of {', '.join(recipes)}.")
    return recipes[name]


def whole_volume_size(spec: DatasetSpec) -> list[int]:
    """
    The one spatial shape of every case of ``spec`` (from the label headers), for recipes that train on
    whole volumes in batches.

    Raises:
        VoxShieldInputError: naming the first label whose shape differs (regrid the dataset first).
    """
    shapes = {case.label: tuple(nib.load(spec.root / case.label).shape[:3]) for case in spec.cases}
    first = next(iter(shapes.values()))
    for name, shape in shapes.items():
        if shape != first:
            raise VoxShieldInputError(
                f"{spec.root / name}: shape {shape} differs from {first}; whole-volume training needs one grid "
                "(voxshield regrid writes such a copy)."
            )
    return list(first)


def validation_split(spec: DatasetSpec, fraction: float, seed: int) -> tuple[DatasetSpec, DatasetSpec]:
    """
    Hold out a validation part of the victim's training cases (of the data it trains on, so protected
    when that is a protected copy).

    Args:
        spec: the training cases (test cases already removed, see held_out_split).
        fraction: share of the cases held out, rounded to the nearest count and at least one when
            positive; 0 holds out nothing.
        seed: seeds the shuffle (monai.data.partition_dataset) that chooses them.

    Returns:
        (cases to fit on, validation cases), both in ``spec``'s order.
    """
    if not fraction:
        return spec, _only(spec, set())
    count = max(1, round(fraction * len(spec.cases)))
    if count >= len(spec.cases):
        raise VoxShieldInputError(
            f"{spec.root}: {len(spec.cases)} training case(s) cannot give {count} validation case(s) "
            "and keep one to train on."
        )
    ids = [case.case_id for case in spec.cases]
    held_out = partition_dataset(ids, ratios=[len(ids) - count, count], shuffle=True, seed=seed)[1]
    return _only(spec, set(ids) - set(held_out)), _only(spec, set(held_out))


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(results: dict) -> str:
    """results.md: the victim's scores per region and their mean, the imperceptibility of its
    training data (when measured) and the recipe."""
    run, overall = results["run"], results["metrics"]["aggregate"]
    rows = [
        [name, _number(region["mean_dice"], 4), _number(region["mean_hd95_mm"], 2), str(region["empty_predictions"])]
        for name, region in overall["regions"].items()
    ]
    rows.append(["**mean**", f"**{_number(overall['mean_dice'], 4)}**", f"**{_number(overall['mean_hd95_mm'], 2)}**",
                 f"{overall['empty_prediction_cases']} cases"])
    lines = [
        f"# Victim {run['victim']} trained on {run['train_data']} ({run['method']}), tested on clean {run['test_data']}",
        "",
        markdown_table(["region", "DSC", "HD95 (mm)", "empty predictions"], rows),
    ]
    seen = results["imperceptibility"]
    if seen:
        columns = (("psnr_db_volume", 2), ("psnr_db_roi", 2), ("ssim_3d_volume", 4), ("ssim_3d_roi", 4),
                   ("fraction_voxels_changed", 4))
        lines += ["", markdown_table(
            ["PSNR volume (dB)", "PSNR ROI (dB)", "SSIM volume", "SSIM ROI", "voxels perturbed"],
            [[_number(seen["aggregate"][key], digits) for key, digits in columns]],
        )]
    best, validation = results.get("metrics_best_on_protected_validation"), results.get("validation")
    if best:
        lines += ["", f"The table scores the last epoch's weights. Best epoch on the validation split "
                      f"({len(validation['cases'])} training cases): {best['epoch']}, {validation['metric']} "
                      f"{best['validation_score']:.4f}; its test mean DSC {_number(best['aggregate']['mean_dice'], 4)}, "
                      f"HD95 {_number(best['aggregate']['mean_hd95_mm'], 2)} mm."]
    recipe = results["recipe"]
    lines += ["", f"Recipe: {json.dumps(recipe)}; wall time {results['wall_time_s']['total']:.0f} s."]
    return "\n".join(lines) + "\n"


class VictimEvaluation:
    """
    Trains a victim with a MONAI trainer, then scores it on clean held-out cases and writes
    OUT/results.json and OUT/results.md.

    Metrics per test case (custom.seg_metrics): DSC and HD95 (mm, using the label's voxel spacing;
    an empty prediction scores DSC 0 and the volume diagonal as HD95) per region, with their means.
    When the training data is a copy of the test dataset (same case ids), the imperceptibility of
    each training case is measured against its clean twin: PSNR and 3D SSIM over the volume and the
    ROI on intensities normalised with the clean case's normalisation (data range 1), and the
    fraction of voxels that differ.

    Args:
        train: the victim's training cases (see held_out_split).
        test: clean held-out cases.
        network: the victim (the trainer's network).
        inferer: e.g. SlidingWindowInferer over the training patch size.
        output_dir: where results go (created; existing results are replaced).
        recipe: the training recipe, recorded verbatim (victim, epochs, patch, lr, augmentation, ...).
        device: where the victim runs.
        method: the protection method the training data is expected to carry ("clean" for none);
            checked against its manifest before any training. None skips the check.
        validation: the cases of ``train`` held out for validation (see validation_split), for a recipe
            that chooses a checkpoint on them; None (or no cases) for one that keeps the last weights only.
        validator: the evaluator that scores ``validation`` after each epoch (a MONAI evaluator attached
            to the trainer by a ValidationHandler) and whose key metric picks the best epoch.
        best_checkpoint: where the validator's CheckpointSaver writes the best epoch's weights (a flat
            state dict of ``network``).

    With a validator, results.json also holds "validation" (its cases and the key metric after each
    epoch) and "metrics_best_on_protected_validation": the test scores of the best checkpoint, with
    its epoch and validation score; "metrics" stays the last epoch's.
    """

    def __init__(self, train, test, network, inferer, output_dir, recipe: dict, device="cpu",
                 method: str | None = None, validation: DatasetSpec | None = None, validator=None,
                 best_checkpoint: str | None = None) -> None:
        self.train, self.test = train, test
        protection = self._protection()
        found = protection["method"] if protection else "clean"
        if method is not None and method != found:
            raise VoxShieldInputError(f"{train.root}: holds {found!r} data, not {method!r} (see its {MANIFEST_NAME}).")
        self.network, self.inferer = network, inferer
        self.output_dir = Path(output_dir)
        self.recipe = recipe
        self.device = torch.device(device)
        self.validation = validation if validation is not None and validation.cases else None
        self.validator = validator if self.validation else None
        self.best_checkpoint = Path(best_checkpoint) if best_checkpoint else None
        self.validation_curve: list[dict] = []
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._record_validation)

    def _imperceptibility(self) -> dict | None:
        if self.train.root == self.test.root:
            return None
        # every labelled case of the clean dataset, normalised exactly as the test cases are
        clean = dataclasses.replace(
            open_dataset(self.test.root, self.test.layout, lists=["training", "test"],
                         ct_window=self.test.ct_window, mri_percentiles=self.test.mri_percentiles),
            normalisation=self.test.normalisation,
        )
        clean_cases = {case.case_id: case for case in clean.cases}
        records = []
        for case in self.train.cases:
            if case.case_id not in clean_cases:
                continue
            source = load_case(clean, clean_cases[case.case_id])
            copy = load_case(self.train, case)
            if copy.image.shape != source.image.shape:
                continue
            before = normalise(source.image, source.offsets, source.scales)
            after = normalise(copy.image, source.offsets, source.scales)
            records.append({
                "case_id": case.case_id,
                **imperceptibility(before, after, source.label > 0),
                "fraction_voxels_changed": float((copy.image != source.image).mean()),
            })
        if not records:
            return None
        keys = [key for key in records[0] if key != "case_id"]
        mean = {key: float(np.mean([r[key] for r in records if r[key] is not None])) for key in keys}
        return {"aggregate": mean, "cases": records, "definitions": {"psnr": PSNR_DESCRIPTION, "ssim": SSIM_DESCRIPTION}}

    def _protection(self) -> dict | None:
        return manifest_protection(self.train.root)

    def _record_validation(self, validator) -> None:
        """After each validation run: the trainer's epoch and the validator's key metric."""
        score = validator.state.metrics[validator.state.key_metric_name]
        self.validation_curve.append({"epoch": validator.state.epoch, "score": float(score)})

    def _best_on_validation(self) -> dict:
        """Test scores of the best validated checkpoint, with its epoch and validation score."""
        state = torch.load(self.best_checkpoint, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state)
        cases = score_cases(self.network, self.inferer, self.test, self.device)
        return {
            "epoch": self.validator.state.best_metric_epoch,
            "validation_score": float(self.validator.state.best_metric),
            "checkpoint": self.best_checkpoint.name,
            "aggregate": aggregate(cases),
            "cases": cases,
        }

    def _validation_results(self) -> dict:
        """The validation split, its curve and the best checkpoint's test scores; nothing without a validator."""
        if self.validator is None:
            return {}
        validation_ids = [case.case_id for case in self.validation.cases]
        return {
            "validation": {
                "metric": self.validator.state.key_metric_name,
                "cases": validation_ids,
                "fitted_cases": [case.case_id for case in self.train.cases if case.case_id not in validation_ids],
                "curve": self.validation_curve,
            },
            "metrics_best_on_protected_validation": self._best_on_validation(),
        }

    def run(self, trainer) -> dict:
        """Train with ``trainer`` (a MONAI trainer over ``network``), evaluate, write the results."""
        start = time.perf_counter()
        trainer.run()
        trained = time.perf_counter()
        cases = score_cases(self.network, self.inferer, self.test, self.device)
        evaluated = time.perf_counter()
        protection = self._protection()
        results = {
            "format": "voxshield-evaluation/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run": {
                "victim": self.recipe.get("victim"),
                "train_data": str(self.train.root),
                "test_data": str(self.test.root),
                "dataset_name": self.test.name,
                "method": protection["method"] if protection else "clean",
                "train_cases": len(self.train.cases),
                "test_cases": [case.case_id for case in self.test.cases],
            },
            "protection": protection,
            "recipe": self.recipe,
            "metrics": {"aggregate": aggregate(cases), "cases": cases},
            **self._validation_results(),
            "imperceptibility": self._imperceptibility(),
            "software": software_versions(),
            "hardware": hardware(),
            "wall_time_s": {
                "train": trained - start,
                "evaluate": evaluated - trained,
                "total": time.perf_counter() - start,
            },
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.output_dir / RESULTS_NAME, json.dumps(results, indent=1).encode())
        write_atomic(self.output_dir / TABLE_NAME, _markdown(results).encode())
        return results
