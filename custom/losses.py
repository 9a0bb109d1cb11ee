"""The two auxiliary losses of VoxShield's generator objective."""

from __future__ import annotations

import torch
from torch import nn

_NORMALISATIONS = ("relative", "none")


class InterSliceSpectralLoss(nn.Module):
    """
    Inter-slice spectral consistency loss L_ISC: the negated mean distance between the 2D amplitude
    spectra of adjacent slices of a perturbation. Minimising it makes neighbouring slices carry
    maximally different in-plane frequency content, the inter-slice "flicker" that 3D convolutions
    latch onto.

    For every pair of adjacent slices (z, z+1) along ``slice_axis``, with A_z = |FFT2(delta_z)| the
    amplitude spectrum over the two in-plane axes, the pair distance is

    - ``normalisation="relative"`` (default): ||A_{z+1} - A_z||_2 / (||A_{z+1}||_2 + ||A_z||_2),
      a number in [0, 1] that does not depend on eps, on the ROI area, on the patch size or on the
      FFT convention, so ``lambda_isc`` means the same on every dataset. Pairs where both slices are
      zero (no ROI in either) carry no information and are left out of the mean.
    - ``normalisation="none"``: ||A_{z+1} - A_z||_2 with the unnormalised FFT, the paper's formula.
      It grows with eps and with the ROI area, so its weight has to be retuned per dataset.

    The loss is the negated mean over pairs, channels and batch, so it lies in [-1, 0] for
    ``"relative"``.

    Args:
        slice_axis: spatial axis across which slices are compared, counted over the spatial axes
            only (0, 1 or 2, or -1..-3). Default -1: the last spatial axis, z of a RAS NIfTI.
        normalisation: ``"relative"`` or ``"none"``, see above.

    Shapes:
        delta: (B, C, H, W, D) perturbation in MONAI's channel-first layout.
        output: scalar.
    """

    def __init__(self, slice_axis: int = -1, normalisation: str = "relative") -> None:
        super().__init__()
        if slice_axis not in (-3, -2, -1, 0, 1, 2):
            raise ValueError(f"slice_axis must be a spatial axis in -3..2, got {slice_axis}.")
        if normalisation not in _NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {_NORMALISATIONS}, got {normalisation!r}.")
        self.slice_axis = slice_axis % 3
        self.normalisation = normalisation

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if delta.ndim != 5:
            raise ValueError(f"delta must be (B, C, H, W, D), got shape {tuple(delta.shape)}.")
        if delta.shape[2 + self.slice_axis] < 2:
            raise ValueError("L_ISC needs at least two slices along slice_axis.")
        slices = delta.movedim(2 + self.slice_axis, 2)  # (B, C, S, P, Q)
        fft_norm = "ortho" if self.normalisation == "relative" else "backward"
        amplitude = torch.fft.fft2(slices.float(), norm=fft_norm).abs().flatten(3)  # (B, C, S, P*Q)
        distance = torch.linalg.vector_norm(amplitude[:, :, 1:] - amplitude[:, :, :-1], dim=-1)
        if self.normalisation == "none":
            return -distance.mean()
        energy = torch.linalg.vector_norm(amplitude, dim=-1)
        pair_energy = energy[:, :, 1:] + energy[:, :, :-1]
        informative = pair_energy > 0
        if not informative.any():
            return delta.sum() * 0.0  # keeps the graph so an all-zero start still back-propagates
        return -(distance[informative] / pair_energy[informative]).mean()


class SemanticPredictionDisruptionLoss(nn.Module):
    """
    Semantic prediction disruption loss L_SPD: the negated mean absolute difference between the
    surrogate's logits on the protected input and on the clean input. Minimising it pushes the
    surrogate's prediction on protected data away from its prediction on clean data.

    The mean runs over every logit (batch, classes and voxels), so the value does not depend on the
    patch size or the number of classes.

    Shapes:
        logits_protected: (B, K, H, W, D) surrogate logits on x_p.
        logits_clean: (B, K, H, W, D) surrogate logits on x; treated as a constant target.
        output: scalar, <= 0.
    """

    def forward(self, logits_protected: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
        if logits_protected.shape != logits_clean.shape:
            raise ValueError(
                f"logit shapes differ: {tuple(logits_protected.shape)} vs {tuple(logits_clean.shape)}."
            )
        return -(logits_protected - logits_clean.detach()).abs().mean()
