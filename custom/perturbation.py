"""ROI-masked, L-infinity bounded perturbation: delta = clamp(G(x) * M, -eps, eps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_SQUASHES = ("tanh", "none")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate a (B, 1, H, W, D) float mask by a cube of half-width ``radius`` voxels."""
    return F.max_pool3d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius) if radius else mask


class ROIBoundedPerturbation(nn.Module):
    """
    Turns a generator's raw output into VoxShield's bounded perturbation and applies it.

    delta = clamp(s(G(x)) * M, -eps, eps) and x_p = clamp(x + delta, 0, 1), where M is the binary
    region of interest (label foreground, optionally dilated) and s is ``eps * tanh`` (``squash=
    "tanh"``, the authors' generator head: smooth gradients everywhere inside the bound) or the
    identity (``squash="none"``, the paper's formula as written). The returned delta is the
    effective one, x_p - x, so it is exactly zero outside M and within [-eps, eps] inside.

    Args:
        eps: L-infinity bound on intensities normalised to [0, 1]. Default 4/255.
        roi_dilation: dilate the label foreground by this many voxels (a cube) to form M.
            Default 0, as in the paper.
        mask_roi: restrict the perturbation to M (default, the paper's rule); False perturbs the
            whole volume, for comparing methods without the ROI rule.
        squash: ``"tanh"`` or ``"none"``, see above.

    Shapes:
        image: (B, C, H, W, D) in [0, 1]. noise: (B, C, H, W, D) raw generator output.
        roi: (B, 1, H, W, D) binary, broadcast over channels.
        output: (x_p, delta), both (B, C, H, W, D).
    """

    def __init__(self, eps: float = 4 / 255, roi_dilation: int = 0, squash: str = "tanh", mask_roi: bool = True) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        if roi_dilation < 0:
            raise ValueError(f"roi_dilation must be >= 0, got {roi_dilation}.")
        if squash not in _SQUASHES:
            raise ValueError(f"squash must be one of {_SQUASHES}, got {squash!r}.")
        self.eps = float(eps)
        self.roi_dilation = int(roi_dilation)
        self.squash = squash
        self.mask_roi = bool(mask_roi)

    def settings(self) -> dict:
        """What shapes the bound and the support, for the manifest and the checkpoint check."""
        return {"eps": self.eps, "roi_dilation": self.roi_dilation, "squash": self.squash, "mask_roi": self.mask_roi}

    def roi_mask(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) label map -> float mask of the foreground, dilated by ``roi_dilation``
        (all ones when ``mask_roi`` is off)."""
        if not self.mask_roi:
            return torch.ones_like(label, dtype=torch.float32)
        return dilate((label > 0).float(), self.roi_dilation)

    def project(self, image: torch.Tensor, delta: torch.Tensor, roi: torch.Tensor):
        """The bound without the squash: any candidate delta -> (x_p, effective delta)."""
        delta = torch.clamp(delta * roi, -self.eps, self.eps)
        protected = torch.clamp(image + delta, 0.0, 1.0)
        return protected, protected - image

    def forward(self, image: torch.Tensor, noise: torch.Tensor, roi: torch.Tensor):
        if self.squash == "tanh":
            noise = self.eps * torch.tanh(noise)
        return self.project(image, noise, roi)
