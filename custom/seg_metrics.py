"""Segmentation metrics for one case (Dice, HD95 in mm) and their aggregation over cases.

Label maps hold the dataset's own label values; named regions group them (FLARE: one label per
organ; BraTS: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}). HD95 follows MONAI's
``HausdorffDistanceMetric(percentile=95, directed=False)`` except when exactly one mask is empty:
MONAI gives NaN there and its mean skips NaN, which would reward a victim that predicts nothing,
so this module gives the volume diagonal in mm instead (the BraTS convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance


def region_masks(label: np.ndarray, regions: dict[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """Boolean mask per named region: the voxels whose label is one of that region's values.

    Args:
        label: integer label map, shape (H, W, D).
        regions: region name -> label values, e.g. ``{"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}``.

    Returns:
        region name -> boolean array of shape (H, W, D).
    """
    label = np.asarray(label)
    return {name: np.isin(label, list(values)) for name, values in regions.items()}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩T| / (|P| + |T|) of two boolean masks, by MONAI's ``compute_dice``.

    An empty prediction with a non-empty truth scores 0.0. Both empty scores 1.0 (MONAI's
    ``ignore_empty=False``); callers that must not reward an empty truth (``case_metrics``/``aggregate``)
    record it and leave it out. MONAI computes in float32, so the value is the exact ratio rounded to
    float32 (within 3e-8).

    Args:
        prediction: boolean mask P, shape (H, W, D).
        truth: boolean mask T, same shape.

    Returns:
        Dice in [0, 1].
    """
    prediction, truth = _as_masks(prediction, truth)
    # one foreground channel of a batch of one: (B=1, C=1, H, W, D), kept by include_background
    value = compute_dice(_batch(prediction), _batch(truth), include_background=True, ignore_empty=False)
    return float(value[0, 0])


def hd95_mm(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the surfaces of two boolean masks.

    MONAI's ``get_edge_surface_distance`` gives the surfaces (mask voxels with a 6-connected background
    neighbour, outside the volume counting as background) and, for each surface voxel of one mask, the
    Euclidean distance in mm (anisotropic ``spacing``) to the nearest surface voxel of the other; the
    result is the larger of the two directed 95th percentiles with linear interpolation: the definition
    of MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)``. The percentile is taken in
    float64 here because ``compute_hausdorff_distance`` takes it with ``torch.quantile`` in float32,
    whose float32 rank and interpolation move the value by up to ~2e-5 of it (1e-4 mm at 6 mm); the
    distances themselves are MONAI's, rounded to float32.

    Unlike MONAI (NaN), exactly one empty mask gives the volume diagonal
    ``sqrt(sum((shape_i * spacing_i) ** 2))``, the worst possible distance, so that predicting
    nothing is never rewarded. Both empty gives 0.0.

    Args:
        prediction: boolean mask, shape (H, W, D).
        truth: boolean mask, same shape.
        spacing: voxel size in mm per axis, length 3 (one per spatial axis).

    Returns:
        HD95 in mm.
    """
    prediction, truth = _as_masks(prediction, truth)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != prediction.ndim:
        raise ValueError(f"spacing needs one value per axis ({prediction.ndim}), got {spacing}.")
    has_prediction, has_truth = prediction.any(), truth.any()
    if not has_prediction and not has_truth:
        return 0.0
    if not has_prediction or not has_truth:
        return math.sqrt(sum((n * s) ** 2 for n, s in zip(prediction.shape, spacing)))
    _, directed_distances, _ = get_edge_surface_distance(
        torch.as_tensor(prediction), torch.as_tensor(truth), distance_metric="euclidean", spacing=spacing, symmetric=True
    )
    return float(max(np.percentile(distances.double().numpy(), 95) for distances in directed_distances))


def case_metrics(
    prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], regions: dict[str, Sequence[int]]
) -> dict:
    """Dice and HD95 per region for one case, from two label maps.

    Regions whose truth is empty are reported (``empty_truth`` True, with ``dice``/``hd95_mm``
    from the conventions of ``dice`` and ``hd95_mm``) but left out of the case means, as
    ``aggregate`` leaves them out of the region means.

    Args:
        prediction: predicted label map in the dataset's label values, shape (H, W, D).
        truth: ground-truth label map, same shape.
        spacing: voxel size in mm per axis, length 3.
        regions: region name -> label values (see ``region_masks``).

    Returns:
        ``{"regions": {name: {"dice", "hd95_mm", "empty_prediction", "empty_truth"}},
        "mean_dice", "mean_hd95_mm"}``; the means are over regions with non-empty truth and are
        None when no region has any.
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {prediction.shape} vs {truth.shape}.")
    predicted, true = region_masks(prediction, regions), region_masks(truth, regions)
    per_region = {}
    for name in regions:
        per_region[name] = {
            "dice": dice(predicted[name], true[name]),
            "hd95_mm": hd95_mm(predicted[name], true[name], spacing),
            "empty_prediction": not predicted[name].any(),
            "empty_truth": not true[name].any(),
        }
    counted = [values for values in per_region.values() if not values["empty_truth"]]
    return {
        "regions": per_region,
        "mean_dice": _mean([values["dice"] for values in counted]),
        "mean_hd95_mm": _mean([values["hd95_mm"] for values in counted]),
    }


def aggregate(cases: list[dict]) -> dict:
    """Summarise ``case_metrics`` results over cases.

    A region whose truth is empty in a case is left out of that region's means (Dice would be 1.0
    or 0.0 and HD95 0 or the diagonal by convention alone, saying nothing about the organ); how
    many were left out is recorded as ``empty_truth_excluded``. ``empty_predictions`` counts cases
    where the prediction was empty although the truth was not (the failure HD95 NaN would hide).

    Args:
        cases: list of ``case_metrics`` outputs.

    Returns:
        ``{"regions": {name: {"mean_dice", "mean_hd95_mm", "empty_predictions", "cases",
        "empty_truth_excluded"}}, "mean_dice", "mean_hd95_mm", "empty_prediction_cases", "cases"}``
        where a region's ``cases`` is the number of cases in its means, the overall means are
        the means of the per-case means (cases without any non-empty truth skipped), and
        ``empty_prediction_cases`` is the number of cases with an empty prediction in at least one
        region with non-empty truth. A mean over nothing is None.
    """
    names = list(dict.fromkeys(name for case in cases for name in case["regions"]))
    per_region = {}
    for name in names:
        results = [case["regions"][name] for case in cases if name in case["regions"]]
        counted = [result for result in results if not result["empty_truth"]]
        per_region[name] = {
            "mean_dice": _mean([result["dice"] for result in counted]),
            "mean_hd95_mm": _mean([result["hd95_mm"] for result in counted]),
            "empty_predictions": sum(result["empty_prediction"] for result in counted),
            "cases": len(counted),
            "empty_truth_excluded": len(results) - len(counted),
        }
    return {
        "regions": per_region,
        "mean_dice": _mean([case["mean_dice"] for case in cases if case["mean_dice"] is not None]),
        "mean_hd95_mm": _mean([case["mean_hd95_mm"] for case in cases if case["mean_hd95_mm"] is not None]),
        "empty_prediction_cases": sum(
            any(r["empty_prediction"] and not r["empty_truth"] for r in case["regions"].values()) for case in cases
        ),
        "cases": len(cases),
    }


def _as_masks(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as boolean arrays of one shape."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {prediction.shape} vs {truth.shape}.")
    return prediction, truth


def _batch(mask: np.ndarray) -> torch.Tensor:
    """(H, W, D) boolean mask -> (1, 1, H, W, D) tensor, MONAI's one-hot batch of one foreground channel."""
    return torch.as_tensor(mask)[None, None]


def _mean(values: list[float]) -> float | None:
    """Mean as a float, None for no values (JSON has no NaN)."""
    return float(np.mean(values)) if values else None
