"""PSNR and 3D SSIM (whole volume and ROI) as the manifest and the evaluation report them."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs

from custom.metrics import imperceptibility, psnr, ssim_3d, ssim_map


def volumes():
    rng = np.random.default_rng(0)
    clean = rng.uniform(size=(2, 40, 30, 24))
    protected = clean.copy()
    protected[:, 20:] = np.clip(protected[:, 20:] + rng.choice([-0.02, 0.02], size=protected[:, 20:].shape), 0, 1)
    return clean, protected


def test_ssim_whole_volume_equals_monai():
    clean, protected = volumes()
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
    expected = float(metric(torch.as_tensor(protected[None]), torch.as_tensor(clean[None])).mean())
    assert ssim_3d(clean, protected) == pytest.approx(expected, abs=1e-6)


def test_ssim_map_equals_monais_dense_window_on_a_thin_volume():
    rng = np.random.default_rng(1)
    clean = rng.uniform(size=(1, 20, 16, 8))  # 8 slices: the window shrinks to 7 voxels
    protected = np.clip(clean + rng.normal(0, 0.05, clean.shape), 0, 1)
    expected, _ = compute_ssim_and_cs(torch.as_tensor(protected[None]), torch.as_tensor(clean[None]), spatial_dims=3,
                                      kernel_size=[7] * 3, kernel_sigma=[1.5] * 3, data_range=1.0)
    local = ssim_map(clean, protected)
    assert local.shape == (1, 14, 10, 2)
    np.testing.assert_allclose(local, expected[0].numpy(), atol=1e-5)


def test_ssim_roi_sees_only_its_region():
    clean, protected = volumes()
    untouched = np.zeros(clean.shape[1:], bool)
    untouched[:10] = True  # window centres here (radius 5) never reach the noisy half (x >= 20)
    noisy = np.zeros(clean.shape[1:], bool)
    noisy[25:] = True
    assert ssim_3d(clean, protected, untouched) == pytest.approx(1.0, abs=1e-6)
    assert ssim_3d(clean, protected, noisy) < ssim_3d(clean, protected) < 1.0
    assert ssim_3d(clean, protected, np.zeros(clean.shape[1:], bool)) is None


def test_psnr_by_hand():
    clean, protected = volumes()
    changed = (protected != clean).mean()
    # Where changed, the error is exactly 0.02 (clipping aside: values are in [0.02, 0.98] mostly).
    mse = ((protected - clean) ** 2).mean()
    assert psnr(clean, protected) == pytest.approx(10 * math.log10(1 / mse))
    region = np.zeros(clean.shape[1:], bool)
    region[20:] = True
    mse_roi = ((protected - clean)[:, 20:] ** 2).mean()
    assert psnr(clean, protected, region) == pytest.approx(10 * math.log10(1 / mse_roi))
    assert 0.45 < changed < 0.55
    assert psnr(clean, clean) is None


def test_imperceptibility_gathers_the_four_measures():
    clean, protected = volumes()
    noisy = np.zeros(clean.shape[1:], bool)
    noisy[15:30] = True  # a third in the untouched part (x < 20), the rest in the noisy one
    squared = (protected - clean) ** 2
    measured = imperceptibility(clean, protected, noisy)
    assert list(measured) == ["psnr_db_volume", "psnr_db_roi", "ssim_3d_volume", "ssim_3d_roi"]
    assert measured["psnr_db_volume"] == pytest.approx(10 * math.log10(1 / squared.mean()))
    assert measured["psnr_db_roi"] == pytest.approx(10 * math.log10(1 / squared[:, 15:30].mean()))
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
    whole = float(metric(torch.as_tensor(protected[None]), torch.as_tensor(clean[None])).mean())
    assert measured["ssim_3d_volume"] == pytest.approx(whole, abs=1e-6)
    assert measured["ssim_3d_roi"] < 1.0

    quiet = np.zeros(clean.shape[1:], bool)
    quiet[:10] = True  # window centres here (radius 5) never reach the noisy part (x >= 20)
    untouched = imperceptibility(clean, protected, quiet)
    assert untouched["psnr_db_roi"] is None  # identical there
    assert untouched["ssim_3d_roi"] == pytest.approx(1.0, abs=1e-6)
    assert untouched["psnr_db_volume"] == measured["psnr_db_volume"]
