"""Dice and HD95 against values worked out by hand and against MONAI's compute_hausdorff_distance."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from custom.seg_metrics import aggregate, case_metrics, dice, hd95_mm, region_masks

SPACING = (0.5, 1.0, 2.5)
BRATS = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}


def cube(shape, start, size=4):
    """Boolean volume with a size^3 cube whose lowest corner is at ``start``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def monai_hd95(prediction, truth, spacing):
    """MONAI's value for two boolean masks, as one foreground channel of a batch of one."""
    # one-hot (B=1, C=1, H, W, D); the single channel is the foreground, so keep it
    y_pred, y = torch.as_tensor(prediction)[None, None], torch.as_tensor(truth)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    return float(value[0, 0])


@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_hd95_is_shift_times_spacing(axis, shift):
    # T = 4^3 cube, P = T shifted by k along `axis` (spacing s). P has 56 surface voxels (64 - 8
    # interior); by axis slice of P: the entry face (16: its 12 rim voxels lie on T's side faces,
    # distance 0; its 4 centre voxels are 1 voxel from a T face, <= s), the middle rims (24, on T's
    # side faces or T's far face: 0) and the exit face (16, all exactly k*s beyond T's far face).
    # Sorted, indices 40..55 are k*s; the 95th percentile sits at index 0.95*55 = 52.25 -> k*s.
    # T -> P mirrors this, so HD95 = k * s, e.g. k=2 along the 2.5 mm axis -> 5.0 mm.
    truth = cube((10, 10, 10), (2, 2, 2))
    prediction = np.roll(truth, shift, axis=axis)
    expected = shift * SPACING[axis]
    assert hd95_mm(prediction, truth, SPACING) == pytest.approx(expected, abs=1e-12)
    assert hd95_mm(truth, prediction, SPACING) == pytest.approx(expected, abs=1e-12)
    assert monai_hd95(prediction, truth, SPACING) == pytest.approx(expected, abs=1e-6)
    # overlap is a (4-k) x 4 x 4 slab: 2*16(4-k)/128 = (4-k)/4
    assert dice(prediction, truth) == pytest.approx((4 - shift) / 4)


def test_identical_masks():
    truth = cube((10, 10, 10), (3, 1, 5))
    assert hd95_mm(truth.copy(), truth, SPACING) == 0.0
    assert dice(truth.copy(), truth) == 1.0
    # both empty: nothing to miss
    empty = np.zeros((10, 10, 10), dtype=bool)
    assert hd95_mm(empty, empty, SPACING) == 0.0
    assert dice(empty, empty) == 1.0


def test_empty_prediction_scores_the_diagonal_and_is_counted():
    # shape (24, 16, 6) at (0.5, 1.0, 2.5) mm spans 12 x 16 x 15 mm: diagonal sqrt(144+256+225) = 25
    shape = (24, 16, 6)
    truth_mask = cube(shape, (2, 2, 0))
    empty = np.zeros(shape, dtype=bool)
    assert dice(empty, truth_mask) == 0.0
    assert hd95_mm(empty, truth_mask, SPACING) == pytest.approx(25.0)
    assert hd95_mm(truth_mask, empty, SPACING) == pytest.approx(25.0)  # and a prediction with no truth

    regions = {"organ": [3]}
    truth = truth_mask.astype(np.int16) * 3
    nothing = case_metrics(np.zeros(shape, np.int16), truth, SPACING, regions)
    assert nothing["regions"]["organ"] == {"dice": 0.0, "hd95_mm": pytest.approx(25.0), "empty_prediction": True,
                                           "empty_truth": False}
    # the cube shifted 2 voxels along the 2.5 mm axis: HD95 5.0 mm (see the shifted-cube test)
    shifted = case_metrics(np.roll(truth, 2, axis=2), truth, SPACING, regions)
    assert shifted["mean_hd95_mm"] == pytest.approx(5.0)

    empty_victim, shifted_victim = aggregate([nothing]), aggregate([shifted])
    assert empty_victim["regions"]["organ"]["empty_predictions"] == 1
    assert empty_victim["empty_prediction_cases"] == 1
    assert shifted_victim["empty_prediction_cases"] == 0
    # predicting nothing must never look better than a near miss
    assert empty_victim["mean_hd95_mm"] > shifted_victim["mean_hd95_mm"]
    assert empty_victim["mean_dice"] < shifted_victim["mean_dice"]


def test_dice_of_known_overlaps():
    shape = (12, 12, 12)
    a = cube(shape, (0, 0, 0))
    # shifted 2 along axis 0: overlap 2x4x4 = 32 -> 2*32/(64+64) = 0.5
    assert dice(cube(shape, (2, 0, 0)), a) == 0.5
    # 2^3 cube inside: 2*8/(8+64) = 2/9
    assert dice(cube(shape, (1, 1, 1), size=2), a) == pytest.approx(2 / 9)
    # disjoint
    assert dice(cube(shape, (6, 6, 6)), a) == 0.0
    # one voxel diagonal: 2*1/(64+64)
    assert dice(cube(shape, (3, 3, 3)), a) == pytest.approx(1 / 64)


def test_brats_regions():
    # a (1, 1, 8) strip of labels; WT = {1,2,4}, TC = {1,4}, ET = {4}
    truth = np.array([0, 1, 1, 2, 2, 4, 4, 0]).reshape(1, 1, 8)
    prediction = np.array([0, 1, 2, 2, 2, 4, 0, 0]).reshape(1, 1, 8)
    masks = region_masks(truth, BRATS)
    assert set(masks) == {"WT", "TC", "ET"}
    assert masks["WT"].ravel().tolist() == [False, True, True, True, True, True, True, False]
    assert masks["TC"].ravel().tolist() == [False, True, True, False, False, True, True, False]
    assert masks["ET"].ravel().tolist() == [False] * 5 + [True, True, False]

    result = case_metrics(prediction, truth, (1.0, 1.0, 2.0), BRATS)["regions"]
    # WT: truth voxels 1..6 (6), prediction 1..5 (5), overlap 5 -> 10/11
    assert result["WT"]["dice"] == pytest.approx(10 / 11)
    # TC: truth {1,2,5,6}, prediction {1,5}, overlap 2 -> 4/6
    assert result["TC"]["dice"] == pytest.approx(2 / 3)
    # ET: truth {5,6}, prediction {5} -> 2/3
    assert result["ET"]["dice"] == pytest.approx(2 / 3)
    # Every voxel of a 1x1 strip is surface. ET: P->T distances [0]; T->P [0, 2 mm] (voxel 6 is
    # one 2.0 mm step from 5), whose 95th percentile interpolates to 0.95 * 2 = 1.9 mm.
    assert result["ET"]["hd95_mm"] == pytest.approx(1.9)
    # WT: T->P [0]*5 + [2] (voxel 6), 95th percentile at index 4.75: 0.75 * 2 = 1.5 mm
    assert result["WT"]["hd95_mm"] == pytest.approx(1.5)
    assert not any(r["empty_prediction"] or r["empty_truth"] for r in result.values())


@pytest.mark.parametrize("seed", range(6))
def test_hd95_agrees_with_monai_on_random_blobs(seed):
    # Smoothed noise thresholded into blobs, often touching the volume border, anisotropic spacing.
    rng = np.random.default_rng(seed)
    shape = (36, 30, 18)
    prediction = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
    truth = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
    spacing = tuple(rng.uniform(0.4, 3.0, size=3))
    # MONAI casts distances to float32 and takes the quantile in float32, so its value is off by a
    # few float32 ulps (1 ulp at 16 mm is 1.9e-6 mm): compare to 1e-6 relative
    assert hd95_mm(prediction, truth, spacing) == pytest.approx(monai_hd95(prediction, truth, spacing), rel=1e-6,
                                                                abs=1e-6)


def scipy_hd95(prediction, truth, spacing):
    """The documented HD95 computed with scipy alone: surface = mask ^ its 6-connected erosion (outside
    the volume is background), Euclidean distance transforms with the spacing, the larger of the two
    directed 95th percentiles (linear interpolation) of surface-to-surface distances."""
    surface_prediction = prediction ^ ndimage.binary_erosion(prediction)
    surface_truth = truth ^ ndimage.binary_erosion(truth)
    to_truth = ndimage.distance_transform_edt(~surface_truth, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~surface_prediction, sampling=spacing)
    return max(np.percentile(to_truth[surface_prediction], 95), np.percentile(to_prediction[surface_truth], 95))


@settings(max_examples=200, deadline=None)
@given(
    prediction=arrays(bool, (6, 5, 4)),
    truth=arrays(bool, (6, 5, 4)),
    spacing=st.tuples(*[st.floats(0.25, 4.0)] * 3),
)
def test_hd95_is_the_documented_definition_on_arbitrary_masks(prediction, truth, spacing):
    # Any non-empty pair, single voxels and masks filling the volume included. hd95_mm takes MONAI's
    # surface distances, which MONAI rounds to float32 (1 ulp is 6e-8 of the value), and a float64
    # percentile; compute_hausdorff_distance's float32 torch.quantile would be off by up to ~2e-5.
    prediction[0, 0, 0] = truth[-1, -1, -1] = True
    expected = scipy_hd95(prediction, truth, spacing)
    assert hd95_mm(prediction, truth, spacing) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_aggregate_means_and_empty_truth_exclusion():
    # shape (8, 8, 14) at 1 mm: diagonal sqrt(64 + 64 + 196) = 18 mm
    shape, spacing, regions = (8, 8, 14), (1.0, 1.0, 1.0), {"a": [1], "b": [2]}
    a = cube(shape, (0, 0, 0)).astype(np.int16)
    b = cube(shape, (0, 0, 8)).astype(np.int16) * 2
    cases = [
        # 1: perfect -> a (1, 0), b (1, 0); case means dice 1, hd 0
        case_metrics(a + b, a + b, spacing, regions),
        # 2: no b in truth or prediction (excluded); a shifted 2 along axis 0 -> dice 0.5, hd 2.0
        case_metrics(np.roll(a, 2, axis=0), a, spacing, regions),
        # 3: b missed -> a (1, 0), b (0, 18); case means dice 0.5, hd 9
        case_metrics(a, a + b, spacing, regions),
    ]
    assert cases[1]["regions"]["b"]["empty_truth"] and cases[1]["regions"]["b"]["empty_prediction"]
    assert cases[1]["mean_dice"] == 0.5 and cases[1]["mean_hd95_mm"] == pytest.approx(2.0)
    assert cases[2]["mean_hd95_mm"] == pytest.approx(9.0)

    summary = aggregate(cases)
    assert summary["cases"] == 3
    region_a, region_b = summary["regions"]["a"], summary["regions"]["b"]
    # a: dice (1 + 0.5 + 1)/3 = 5/6, hd (0 + 2 + 0)/3 = 2/3
    assert region_a["mean_dice"] == pytest.approx(5 / 6) and region_a["mean_hd95_mm"] == pytest.approx(2 / 3)
    assert (region_a["cases"], region_a["empty_truth_excluded"], region_a["empty_predictions"]) == (3, 0, 0)
    # b: case 2 left out -> dice (1 + 0)/2 = 0.5, hd (0 + 18)/2 = 9
    assert region_b["mean_dice"] == pytest.approx(0.5) and region_b["mean_hd95_mm"] == pytest.approx(9.0)
    assert (region_b["cases"], region_b["empty_truth_excluded"], region_b["empty_predictions"]) == (2, 1, 1)
    # overall: means of case means, dice (1 + 0.5 + 0.5)/3 = 2/3, hd (0 + 2 + 9)/3 = 11/3;
    # only case 3 missed a region that was there (case 2's empty b had no truth)
    assert summary["mean_dice"] == pytest.approx(2 / 3) and summary["mean_hd95_mm"] == pytest.approx(11 / 3)
    assert summary["empty_prediction_cases"] == 1


def test_case_without_any_truth_has_no_means():
    empty = np.zeros((4, 4, 4), np.int16)
    result = case_metrics(empty, empty, SPACING, BRATS)
    assert result["mean_dice"] is None and result["mean_hd95_mm"] is None
    summary = aggregate([result])
    assert summary["mean_dice"] is None and summary["regions"]["ET"]["empty_truth_excluded"] == 1


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="one value per axis"):
        hd95_mm(np.ones((4, 4, 4), bool), np.ones((4, 4, 4), bool), (1.0, 1.0))
