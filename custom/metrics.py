"""Imperceptibility metrics on intensities normalised to [0, 1] (data range 1)."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import correlate1d

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_DESCRIPTION = (
    "3D SSIM, per channel then averaged: gaussian window 11 voxels (smaller when a volume axis is "
    "shorter), sigma 1.5, K1 0.01, K2 0.03, data range 1 on normalised intensities; the local SSIM map "
    "(valid windows only) is averaged over the whole volume or over the ROI voxels it covers"
)
PSNR_DESCRIPTION = "10*log10(1/MSE) on intensities normalised to [0, 1] (data range 1); null when identical"


def psnr(clean: np.ndarray, protected: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """PSNR in dB with data range 1, over all voxels or over ``region`` (broadcast over channels).
    Returns None when the two are identical (infinite PSNR has no JSON form)."""
    squared = (clean.astype(np.float64) - protected.astype(np.float64)) ** 2
    if region is not None:
        squared = squared[np.broadcast_to(region, squared.shape)]
    mse = float(squared.mean()) if squared.size else 0.0
    return None if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim_map(clean: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """
    The local SSIM of SSIM_DESCRIPTION at every valid window centre of two (C, H, W, D) volumes in
    [0, 1]: the map of monai.metrics.regression.compute_ssim_and_cs with a Gaussian window, computed
    by the window's three 1D factors (scipy's correlate1d: the dense 3D window took nine tenths of
    protect's time on la_mri) in float32, as MONAI computes it (on a random 91x70x44 volume with
    4/255 noise, float64 moved the mean by 4e-8 and a voxel's value by 2e-6, and took 2.8x as long).

    Returns:
        (C, H - w + 1, W - w + 1, D - w + 1), w the window's size.
    """
    window = min(SSIM_WINDOW, *(size if size % 2 else size - 1 for size in clean.shape[1:]))
    offsets = np.arange(window) - (window - 1) / 2
    weights = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    weights = (weights / weights.sum()).astype(np.float32)
    x, y = protected.astype(np.float32), clean.astype(np.float32)
    local = np.stack([x, y, x * x, y * y, x * y])  # (5, C, H, W, D)
    half = window // 2
    # valid windows only: the border, whatever its padding, is cut off after each pass; the shortest axis
    # first, as it loses the largest share of its length (a 10-slice volume keeps 2 of 10 slices)
    for axis in sorted((2, 3, 4), key=lambda spatial: local.shape[spatial]):
        local = correlate1d(local, weights, axis=axis).take(range(half, local.shape[axis] - half), axis=axis)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = local
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    contrast = (2 * (mu_xy - mu_x * mu_y) + c2) / (mu_xx - mu_x**2 + mu_yy - mu_y**2 + c2)
    return ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * contrast


def region_mean(local_ssim: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """The mean of an ssim_map over the whole volume, or over the window centres inside ``region``
    ((H, W, D) boolean, the volume's shape); None if no window centre falls inside the region."""
    if region is None:
        return float(local_ssim.mean())
    trim = [(size - valid) // 2 for size, valid in zip(region.shape, local_ssim.shape[1:])]
    centres = region[tuple(slice(cut, cut + valid) for cut, valid in zip(trim, local_ssim.shape[1:]))]
    return float(local_ssim[:, centres].mean()) if centres.any() else None


def ssim_3d(clean: np.ndarray, protected: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """
    3D SSIM of two (C, H, W, D) volumes in [0, 1], as described by SSIM_DESCRIPTION. Over the whole
    volume this equals monai.metrics.SSIMMetric with the same settings; with ``region`` ((H, W, D)
    boolean) the SSIM map is averaged over the region's voxels instead (None if no window centre
    falls inside the region).
    """
    return region_mean(ssim_map(clean, protected), region)


def imperceptibility(clean: np.ndarray, protected: np.ndarray, roi: np.ndarray) -> dict[str, float | None]:
    """
    How visible a protection is: PSNR (dB) and 3D SSIM of a protected case against its clean twin,
    over the whole volume and over the ROI.

    Args:
        clean: (C, H, W, D) the clean case, normalised to [0, 1].
        protected: (C, H, W, D) its protected copy, normalised with the clean case's normalisation.
        roi: (H, W, D) boolean region of interest.

    Returns:
        ``psnr_db_volume``, ``psnr_db_roi``, ``ssim_3d_volume`` and ``ssim_3d_roi`` (see psnr and
        ssim_3d for when one is None).
    """
    local_ssim = ssim_map(clean, protected)
    return {
        "psnr_db_volume": psnr(clean, protected),
        "psnr_db_roi": psnr(clean, protected, roi),
        "ssim_3d_volume": region_mean(local_ssim),
        "ssim_3d_roi": region_mean(local_ssim, roi),
    }
