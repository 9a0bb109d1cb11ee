"""benchmarks/la_mri_diagnostics.py: its statistics on hand-made cases and logs."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

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

    stats = diagnostics.case_statistics(clean, protected, roi, ring_width=1)

    assert stats["roi_ring_contrast"] == pytest.approx(0.3)  # ROI mean 0.5, ring 0.2
    assert stats["roi_std"] == pytest.approx(0.03)
    # three axial steps per ROI column: -0.06, +0.06, -0.06 (mean -0.02)
    noise = math.sqrt(0.06**2 - 0.02**2) / math.sqrt(2)
    assert stats["roi_voxel_noise"] == pytest.approx(noise)
    assert stats["delta_mean_abs_over_eps"] == pytest.approx(0.75)
    assert stats["delta_fraction_at_bound"] == pytest.approx(0.5)
    rms = math.sqrt((EPS**2 + (EPS / 2) ** 2) / 2)
    assert stats["delta_rms_over_voxel_noise"] == pytest.approx(rms / noise)


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
