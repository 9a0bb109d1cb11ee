"""Imperceptibility metrics on intensities normalised to [0, 1] (data range 1)."""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics.regression import KernelType, compute_ssim_and_cs

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
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


def ssim_3d(clean: np.ndarray, protected: np.ndarray, region: np.ndarray | None = None) -> float | None:
    """
    3D SSIM of two (C, H, W, D) volumes in [0, 1], as described by SSIM_DESCRIPTION. Over the whole
    volume this equals monai.metrics.SSIMMetric with the same settings; with ``region`` ((H, W, D)
    boolean) the SSIM map is averaged over the region's voxels instead (None if no window centre
    falls inside the region).
    """
    window = min(SSIM_WINDOW, *(size if size % 2 else size - 1 for size in clean.shape[1:]))
    ssim_map, _ = compute_ssim_and_cs(
        torch.as_tensor(protected[None]), torch.as_tensor(clean[None]), spatial_dims=3,
        kernel_size=[window] * 3, kernel_sigma=[SSIM_SIGMA] * 3, data_range=1.0, kernel_type=KernelType.GAUSSIAN,
    )
    ssim_map = ssim_map[0].double().numpy()  # (C, H - window + 1, ...): one value per window centre
    if region is None:
        return float(ssim_map.mean())
    half = window // 2
    centres = region[half : region.shape[0] - half, half : region.shape[1] - half, half : region.shape[2] - half]
    if not centres.any():
        return None
    return float(ssim_map[:, centres].mean())


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
    return {
        "psnr_db_volume": psnr(clean, protected),
        "psnr_db_roi": psnr(clean, protected, roi),
        "ssim_3d_volume": ssim_3d(clean, protected),
        "ssim_3d_roi": ssim_3d(clean, protected, roi),
    }
