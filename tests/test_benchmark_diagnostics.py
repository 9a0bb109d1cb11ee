"""benchmarks/la_mri_diagnostics.py: its statistics on hand-made cases and logs."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from custom.figures import CasePair

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "la_mri_diagnostics.py"
spec = importlib.util.spec_from_file_location("la_mri_diagnostics", SCRIPT)
diagnostics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(diagnostics)
EPS = 4 / 255


def test_case_statistics_on_a_hand_made_case():
    clean = np.full((12, 12, 12), 0.2)
    roi = np.zeros(clean.shape, bool)
    roi[4:8, 4:8, 4:8] = True
    # inside the ROI: 0.5 +- 0.03 alternating along the axial axis, so every axial step differs by 0.06
    clean[roi] = (0.5 + 0.03 * (-1.0) ** np.indices(clean.shape)[2])[roi]
    protected = clean.copy()
    protected[4:6, 4:8, 4:8] += EPS  # half the ROI at +eps
    protected[6:8, 4:8, 4:8] -= EPS / 2  # the other half at -eps/2

    stats = diagnostics.case_statistics(clean, protected, roi, ring_width=1, eps=EPS)

    assert stats["roi_ring_contrast"] == pytest.approx(0.3)  # ROI mean 0.5, ring 0.2
    assert stats["roi_std"] == pytest.approx(0.03)
    # three axial steps per ROI column: -0.06, +0.06, -0.06 (mean -0.02)
    noise = math.sqrt(0.06**2 - 0.02**2) / math.sqrt(2)
    assert stats["roi_voxel_noise"] == pytest.approx(noise)
    assert stats["delta_mean_abs_over_eps"] == pytest.approx(0.75)
    assert stats["delta_fraction_at_bound"] == pytest.approx(0.5)
    rms = math.sqrt((EPS**2 + (EPS / 2) ** 2) / 2)
    assert stats["delta_rms_over_voxel_noise"] == pytest.approx(rms / noise)


def test_copy_statistics_measure_against_the_bound_in_the_manifest():
    """A copy made with eps 16/255: a voxel moved by 4/255 is not at its bound, one moved by 16/255 is."""
    eps = 16 / 255
    manifest = {"format": "voxshield-manifest/1", "method": "random", "parameters": {"eps": eps},
                "eps_normalised": eps, "cases": [{"case_id": "a"}, {"case_id": "b"}]}
    label = np.zeros((6, 6, 6), np.int64)
    label[2:4, 2:4, 2:4] = 1  # 8 ROI voxels
    # a texture of +-0.01 around 0.5, so the ROI has a voxel noise to compare the perturbation with
    clean = 0.5 + np.random.default_rng(0).uniform(-0.01, 0.01, (1, 6, 6, 6))
    first, second = clean.copy(), clean.copy()
    first[0, 2:4, 2:4, 2:4] += eps  # every ROI voxel at +eps
    second[0, 2, 2:4, 2:4] -= eps  # half the ROI at -eps ...
    second[0, 3, 2:4, 2:4] += 4 / 255  # ... the other half at the 4/255 of the paper's setting
    pairs = [CasePair("a", clean, first, label), CasePair("b", clean, second, label)]

    stats = diagnostics.copy_statistics(manifest, pairs, ring_width=1)

    assert stats["eps"] == eps and stats["cases"] == 2
    assert stats["mean"]["delta_fraction_at_bound"] == pytest.approx((1.0 + 0.5) / 2)
    assert stats["mean"]["delta_mean_abs_over_eps"] == pytest.approx((1.0 + (1 + 0.25) / 2) / 2)
    assert stats["mean"]["roi_ring_contrast"] == pytest.approx(0.0, abs=0.02)  # ROI and ring alike


def _result(folder: Path, method: str, losses: list[float], epochs: int) -> None:
    folder.mkdir()
    writer = SummaryWriter(str(folder / "tensorboard"))
    for step, loss in enumerate(losses):
        writer.add_scalar("victim_loss", loss, step)
    writer.close()
    protection = None if method == "clean" else {"method": method}
    (folder / "results.json").write_text(json.dumps({
        "protection": protection,
        "recipe": {"victim": "unet", "seed": 0, "epochs": epochs, "iterations": len(losses)},
        "metrics": {"aggregate": {"mean_dice": 0.5}},
    }))


def test_learning_curves_average_epochs_and_compare_with_clean(tmp_path):
    _result(tmp_path / "clean", "clean", [1.0, 0.8, 0.4, 0.4, 0.5, 0.7], epochs=3)
    _result(tmp_path / "full", "voxshield", [0.8, 0.6, 0.4, 0.2, 0.1, 0.1], epochs=3)

    curves = diagnostics.learning_curves(tmp_path)

    assert curves["clean"]["epoch_losses"] == pytest.approx([0.9, 0.4, 0.6])
    assert curves["clean"]["last_epoch_rise"] == pytest.approx(0.2)
    assert curves["full"]["epoch_losses"] == pytest.approx([0.7, 0.3, 0.1])
    assert curves["full"]["last_epoch_rise"] == pytest.approx(0.0)
    assert curves["full"]["method"] == "voxshield"
    assert curves["full"]["loss_minus_clean_first_half"] == pytest.approx(-0.2)  # first epoch only: 0.7 - 0.9
