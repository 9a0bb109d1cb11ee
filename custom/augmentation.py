"""The exploiter's data augmentation as a differentiable module, so VoxShield can fit its noise through it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AugmentationDraw:
    """
    One random draw of ExploiterAugmentation for a batch of B samples, on the CPU. ``apply`` can
    transform several tensors of the drawn shape with it, so an image, its label and its clean original
    see the same flips, affine, noise field and intensity changes.

    Each ``*_chosen`` is a (B,) bool: whether the component transforms that sample.
    """

    shape: tuple[int, ...]
    flips: torch.Tensor  # (B, 3) bool, one per spatial axis
    resample_chosen: torch.Tensor
    theta: torch.Tensor  # (B, 3, 4) output -> input map of affine_grid, normalised coordinates
    noise_chosen: torch.Tensor
    noise: torch.Tensor | None  # (B, C, H, W, D), already scaled by each sample's std; None when none is chosen
    blur_chosen: torch.Tensor
    blur_sigma: torch.Tensor  # (B, 3) voxels
    brightness_chosen: torch.Tensor
    brightness: torch.Tensor  # (B,) multiplicative factor
    contrast_chosen: torch.Tensor
    contrast: torch.Tensor  # (B,) factor about the sample's mean
    low_resolution_chosen: torch.Tensor
    low_resolution_zoom: torch.Tensor  # (B,)


class ExploiterAugmentation(nn.Module):
    """
    nnU-Net's default 3D augmentation, made differentiable with respect to the image, as an
    expectation over transformations: VoxShield fitted through it looks for noise whose shortcut
    survives what an augmenting exploiter does to the data. One draw per sample is shared by the
    image and its label. Each component is applied with its own probability, in the order of
    configs/evaluate.json's ``countermeasure_augmentations#nnunet_aug`` (MONAI's transforms of
    nnU-Net's defaults), whose ranges and probabilities are the defaults here:

    1. rotation about each axis by an angle uniform in [-``rotation_range``, ``rotation_range``]
       (prob 0.2, 30 degrees) and an isotropic zoom uniform in ``zoom_range`` (prob 0.2, [0.7, 1.4];
       above 1 magnifies), composed into one voxel-space affine about the volume's centre and applied
       with ``affine_grid`` + ``grid_sample``: image trilinear, label nearest, both padded with zeros
       (background) as nnunet_aug's RandRotated and RandZoomd pad;
    2. additive Gaussian noise, its std uniform in [0, ``noise_std``] (prob 0.1, 0.1 of the [0, 1] range);
    3. Gaussian blur, sigma uniform in ``blur_sigma_range`` per axis (prob 0.2, [0.5, 1] voxels),
       separable conv3d truncated at 4 sigma with zero padding, as MONAI's GaussianFilter;
    4. brightness: intensities times a factor uniform in ``brightness_range`` (prob 0.15, [0.75, 1.25]);
    5. contrast: intensities scaled about the sample's mean by a factor uniform in ``contrast_range``
       (prob 0.15, [0.75, 1.25]), then clipped to the sample's former range (RandScaleIntensityFixedMeand
       with preserve_range);
    6. low-resolution simulation: nearest downsampling to a zoom uniform in ``low_resolution_zoom_range``
       (prob 0.25, [0.5, 1]), then trilinear upsampling back;
    7. a flip along each spatial axis (prob 0.5 each).

    nnunet_aug's gamma transforms (RandAdjustContrastd, prob 0.1 inverted and 0.3) are left out: a
    power below 1 has an unbounded gradient at the intensity minimum, where the ROI's noise would get
    no usable signal.

    Random numbers are drawn on the CPU (``seed``'s own generator, or torch's global one), so a
    draw does not depend on the device the tensors are on. With every probability 0 the module is
    the identity, exactly; a component that does not transform a sample leaves it bit for bit as is.

    Args:
        flip_prob: probability of a flip, per spatial axis. Default 0.5.
        rotation_prob: probability of a rotation. Default 0.2.
        rotation_range: largest angle about each axis, radians. Default 0.5236 (30 degrees).
        zoom_prob: probability of a zoom. Default 0.2.
        zoom_range: (low, high) zoom factor. Default (0.7, 1.4).
        noise_prob: probability of Gaussian noise. Default 0.1.
        noise_std: largest noise standard deviation (intensities in [0, 1]). Default 0.1.
        blur_prob: probability of a Gaussian blur. Default 0.2.
        blur_sigma_range: (low, high) sigma in voxels, drawn per axis. Default (0.5, 1.0).
        brightness_prob: probability of a brightness change. Default 0.15.
        brightness_range: (low, high) multiplicative factor. Default (0.75, 1.25).
        contrast_prob: probability of a contrast change. Default 0.15.
        contrast_range: (low, high) factor about the mean. Default (0.75, 1.25).
        low_resolution_prob: probability of the low-resolution simulation. Default 0.25.
        low_resolution_zoom_range: (low, high) downsampling factor. Default (0.5, 1.0).
        seed: seeds the module's own CPU generator; None draws from torch's global one.

    Shapes:
        image: (B, C, H, W, D) float, intensities in [0, 1].
        label: (B, 1, H, W, D) integer class map (any dtype; it is returned in its own).
        output: (image, label) transformed, same shapes and dtypes; label None when none is given.
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        rotation_prob: float = 0.2,
        rotation_range: float = math.radians(30),
        zoom_prob: float = 0.2,
        zoom_range: tuple[float, float] = (0.7, 1.4),
        noise_prob: float = 0.1,
        noise_std: float = 0.1,
        blur_prob: float = 0.2,
        blur_sigma_range: tuple[float, float] = (0.5, 1.0),
        brightness_prob: float = 0.15,
        brightness_range: tuple[float, float] = (0.75, 1.25),
        contrast_prob: float = 0.15,
        contrast_range: tuple[float, float] = (0.75, 1.25),
        low_resolution_prob: float = 0.25,
        low_resolution_zoom_range: tuple[float, float] = (0.5, 1.0),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        probabilities = (flip_prob, rotation_prob, zoom_prob, noise_prob, blur_prob, brightness_prob,
                         contrast_prob, low_resolution_prob)
        if not all(0 <= probability <= 1 for probability in probabilities):
            raise ValueError(f"probabilities must lie in [0, 1], got {probabilities}.")
        self.flip_prob = flip_prob
        self.rotation_prob = rotation_prob
        self.rotation_range = rotation_range
        self.zoom_prob = zoom_prob
        self.zoom_range = tuple(zoom_range)
        self.noise_prob = noise_prob
        self.noise_std = noise_std
        self.blur_prob = blur_prob
        self.blur_sigma_range = tuple(blur_sigma_range)
        self.brightness_prob = brightness_prob
        self.brightness_range = tuple(brightness_range)
        self.contrast_prob = contrast_prob
        self.contrast_range = tuple(contrast_range)
        self.low_resolution_prob = low_resolution_prob
        self.low_resolution_zoom_range = tuple(low_resolution_zoom_range)
        self.random = torch.Generator().manual_seed(seed) if seed is not None else None

    def _uniform(self, size: tuple[int, ...], bounds: tuple[float, float]) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(size, generator=self.random, dtype=torch.float64)

    def _chosen(self, batch: int, probability: float) -> torch.Tensor:
        return torch.rand(batch, generator=self.random) < probability

    def draw(self, shape: tuple[int, ...] | torch.Size) -> AugmentationDraw:
        """One draw for a batch of images of ``shape`` (B, C, H, W, D)."""
        batch, spatial = shape[0], tuple(shape[2:])
        # every component draws its numbers whether or not it is chosen, so one probability does not
        # shift the other components' draws; the noise field, drawn only when needed, comes last
        flips = torch.rand((batch, 3), generator=self.random) < self.flip_prob
        rotation_chosen = self._chosen(batch, self.rotation_prob)
        angles = self._uniform((batch, 3), (-self.rotation_range, self.rotation_range))
        zoom_chosen = self._chosen(batch, self.zoom_prob)
        zoom = self._uniform((batch,), self.zoom_range)
        zoom = torch.where(zoom_chosen, zoom, 1.0).view(-1, 1, 1)
        voxel_map = _rotations(angles * rotation_chosen.unsqueeze(1)) / zoom  # output -> input: 1/zoom magnifies
        noise_chosen = self._chosen(batch, self.noise_prob)
        noise_std = self._uniform((batch,), (0.0, self.noise_std))
        draw = AugmentationDraw(
            shape=tuple(shape),
            flips=flips,
            resample_chosen=rotation_chosen | zoom_chosen,
            theta=_normalised_theta(voxel_map, spatial),
            noise_chosen=noise_chosen,
            noise=None,
            blur_chosen=self._chosen(batch, self.blur_prob),
            blur_sigma=self._uniform((batch, 3), self.blur_sigma_range),
            brightness_chosen=self._chosen(batch, self.brightness_prob),
            brightness=self._uniform((batch,), self.brightness_range),
            contrast_chosen=self._chosen(batch, self.contrast_prob),
            contrast=self._uniform((batch,), self.contrast_range),
            low_resolution_chosen=self._chosen(batch, self.low_resolution_prob),
            low_resolution_zoom=self._uniform((batch,), self.low_resolution_zoom_range),
        )
        if noise_chosen.any():
            draw.noise = torch.randn(tuple(shape), generator=self.random) * noise_std.float().view(-1, 1, 1, 1, 1)
        return draw

    def apply(self, draw: AugmentationDraw, image: torch.Tensor,
              label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        ``image`` (and ``label``, geometry only) transformed by ``draw``; differentiable in ``image``.
        Computed in float32 with autocast off, as an exploiter's data pipeline runs, whatever the caller's
        precision; the image is returned in its own dtype.
        """
        if tuple(image.shape) != draw.shape:
            raise ValueError(f"the draw is for shape {draw.shape}, got an image of shape {tuple(image.shape)}.")
        dtype, device = image.dtype, image.device
        theta = draw.theta.to(device)
        with torch.autocast(device.type, enabled=False):
            image = _on_chosen(draw.resample_chosen, image.float(),
                               lambda x, chosen: _resample(x, theta[chosen], "bilinear"))
            if label is not None:
                label = _on_chosen(draw.resample_chosen, label.float(),
                                   lambda x, chosen: _resample(x, theta[chosen], "nearest")).to(label.dtype)
            if draw.noise is not None:
                noise = draw.noise.to(device)
                image = _on_chosen(draw.noise_chosen, image, lambda x, chosen: x + noise[chosen])
            image = _on_chosen(draw.blur_chosen, image, lambda x, chosen: _blur(x, draw.blur_sigma[chosen.cpu()]))
            image = _on_chosen(draw.brightness_chosen, image,
                               lambda x, chosen: x * _per_sample(draw.brightness, chosen, x))
            image = _on_chosen(draw.contrast_chosen, image,
                               lambda x, chosen: _scale_about_mean(x, _per_sample(draw.contrast, chosen, x)))
            image = _on_chosen(draw.low_resolution_chosen, image,
                               lambda x, chosen: _low_resolution(x, draw.low_resolution_zoom[chosen.cpu()]))
        return _flip(image, draw.flips).to(dtype), (_flip(label, draw.flips) if label is not None else None)

    def forward(self, image: torch.Tensor,
                label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.apply(self.draw(image.shape), image, label)


def _on_chosen(chosen: torch.Tensor, x: torch.Tensor,
               transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` with its chosen samples replaced by ``transform(x[chosen], chosen)`` (chosen: the
    sample indices, on x's device); the others stay as they are, bit for bit."""
    index = chosen.nonzero().flatten().to(x.device)
    if index.numel() == 0:
        return x
    return x.index_put((index,), transform(x[index], index))


def _per_sample(values: torch.Tensor, chosen: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The chosen samples' ``values`` shaped to broadcast over ``x`` (k, C, H, W, D)."""
    return values.to(device=x.device, dtype=x.dtype)[chosen].view(-1, 1, 1, 1, 1)


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotations by ``angles`` (B, 3) radians about each axis in turn."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def about(axis: int, first: int, second: int) -> torch.Tensor:
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[first][first], rows[first][second] = cos[:, axis], -sin[:, axis]
        rows[second][first], rows[second][second] = sin[:, axis], cos[:, axis]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    return about(0, 1, 2) @ about(1, 0, 2) @ about(2, 0, 1)


def _normalised_theta(voxel_map: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """
    affine_grid's (B, 3, 4) theta for ``voxel_map`` (B, 3, 3), a linear map of voxel offsets from the
    volume's centre: grid coordinates run over [-1, 1] per axis whatever its length, so the map is
    conjugated by the half-lengths to rotate in voxels, not in a volume squeezed to a cube.
    """
    half = torch.tensor(spatial[::-1], dtype=voxel_map.dtype) / 2  # affine_grid's (x, y, z) are (D, W, H)
    linear = voxel_map * half.view(1, 1, 3) / half.view(1, 3, 1)
    return torch.cat([linear, torch.zeros(linear.shape[0], 3, 1, dtype=linear.dtype)], dim=2).float()


def _resample(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x`` (k, C, H, W, D) blurred per sample by a Gaussian of ``sigma`` (k, 3) voxels, one axis at a time."""
    samples, channels, *spatial = x.shape
    radius = int(4 * sigma.max().item() + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    blurred = x.reshape(1, samples * channels, *spatial)
    for axis in range(3):
        kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, axis:axis + 1] ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)
        shape = [samples * channels, 1, 1, 1, 1]
        shape[2 + axis] = kernel.shape[1]
        padding = [0, 0, 0]
        padding[axis] = radius
        weight = kernel.reshape(shape).to(device=x.device, dtype=x.dtype)
        blurred = F.conv3d(blurred, weight, padding=tuple(padding), groups=samples * channels)
    return blurred.reshape(x.shape)


def _scale_about_mean(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each sample's intensities scaled by ``factor`` about its mean, clipped to its former range."""
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    low, high = x.amin(dim=(1, 2, 3, 4), keepdim=True), x.amax(dim=(1, 2, 3, 4), keepdim=True)
    return torch.minimum(torch.maximum(mean + (x - mean) * factor, low), high)


def _low_resolution(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Each sample of ``x`` downsampled (nearest) by its ``zoom`` and upsampled (trilinear) back."""
    spatial = x.shape[2:]
    restored = []
    for sample, factor in zip(x, zoom.tolist()):
        coarse = F.interpolate(sample[None], size=[max(1, round(size * factor)) for size in spatial], mode="nearest")
        restored.append(F.interpolate(coarse, size=spatial, mode="trilinear", align_corners=False))
    return torch.cat(restored)


def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``x`` flipped, sample by sample, along the spatial axes ``flips`` (B, 3) marks."""
    for axis in range(3):
        x = _on_chosen(flips[:, axis], x, lambda chosen_x, chosen: chosen_x.flip(2 + axis))
    return x
