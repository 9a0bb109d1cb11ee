"""
Countermeasures: the standard steps an exploiter takes before training a victim on a (protected)
copy, to test whether the protection survives them. configs/evaluate.json declares each one and
``--countermeasure NAME`` switches it on (default null: none):

- filters (``z_smooth``, ``smooth3d``, ``median``, ``resample``, ``jpeg``) change the victim's
  training volumes once, after loading and normalisation and before cropping, so they see whole
  volumes; the clean test volumes are not filtered (``resample`` excepted: see ResampledInferer);
- ``nnunet_aug`` adds random augmentations to every training crop; ``nnunet_spatial`` (rotation,
  scaling), ``nnunet_intensity`` (noise, blur, brightness, contrast, low resolution, gamma) and
  ``nnunet_mirror`` (flips) are its three parts alone, to find which of them undoes a protection;
- ``pgd_at`` trains the victim adversarially (AdversarialBatch).

The 2D slice-wise victim is a victim, ``--victim slice2d`` (custom.victims), so that it combines with
any of these.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch, default_prepare_batch
from monai.inferers import Inferer
from monai.transforms import MapTransform, Spacing, SpatialResample
from monai.utils import convert_to_dst_type, convert_to_numpy
from PIL import Image
from scipy import ndimage

from custom.manifest import MANIFEST_NAME, read_manifest

COUNTERMEASURES = ("z_smooth", "smooth3d", "median", "resample", "jpeg", "nnunet_aug", "nnunet_spatial", "nnunet_intensity",
                   "nnunet_mirror", "pgd_at")


def select(name: str | None, transforms: Mapping[str, Sequence]) -> list:
    """
    The transforms that ``transforms`` declares for countermeasure ``name``.

    Args:
        name: one of ``COUNTERMEASURES``, or None for no countermeasure.
        transforms: countermeasure name -> its transforms, for one place of the pipeline (e.g. the
            filters applied before cropping); a countermeasure that acts elsewhere has no entry.

    Returns:
        a new list, empty for None or a countermeasure without an entry.

    Raises:
        ValueError: for a name not in ``COUNTERMEASURES`` (the message lists them).
    """
    if name is not None and name not in COUNTERMEASURES:
        raise ValueError(f"unknown countermeasure {name!r}; choose one of {', '.join(COUNTERMEASURES)} or null (none)")
    return list(transforms.get(name, [])) if name else []


def protection_eps(train_dir: str | Path, default: float) -> float:
    """The bound (normalised intensities) of the protected copy in ``train_dir``, from its manifest's
    ``eps_normalised``; ``default`` for data without a manifest (clean data)."""
    if not (Path(train_dir) / MANIFEST_NAME).is_file():
        return float(default)
    return float(read_manifest(train_dir)["eps_normalised"])


class GaussianSmoothNearestd(MapTransform):
    """
    Dictionary transform: Gaussian smoothing of ``(C, *spatial)`` images channel by channel, with the
    border voxels repeated beyond the volume (scipy.ndimage.gaussian_filter, mode "nearest", kernel
    truncated at 4 sigma and normalised), as a user smooths a volume. MONAI's GaussianSmooth pads with
    zeros instead, which darkens the first and last slices (by 31% at sigma 1).

    Args:
        keys: the image keys; the output keeps the input's type and dtype.
        sigma: the standard deviation in voxels, one value or one per spatial axis (0: that axis untouched).
        allow_missing_keys: as in MONAI's MapTransform.
    """

    def __init__(self, keys, sigma: float | Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.sigma = sigma

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            image = convert_to_numpy(out[key])
            sigma = np.broadcast_to(self.sigma, image.ndim - 1)
            smoothed = np.stack([ndimage.gaussian_filter(channel, sigma, mode="nearest") for channel in image])
            out[key] = convert_to_dst_type(smoothed, out[key])[0]
        return out


def jpeg_slices(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """
    Each axial slice through JPEG, as a user who exports a volume as 8-bit JPEG images and reads them back.

    Args:
        image: ``(C, H, W, D)`` intensities in [0, 1]; slice ``[c, :, :, z]`` is one grey-level image.
        quality: the JPEG quality (Pillow's scale, 1-95).

    Returns:
        float32 ``(C, H, W, D)`` in [0, 1]: each slice quantised to round(255 x), JPEG-encoded and decoded, / 255.
    """
    quantised = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    decoded = np.empty(quantised.shape, np.float32)
    for channel in range(quantised.shape[0]):
        for z in range(quantised.shape[-1]):
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(quantised[channel, :, :, z])).save(buffer, "JPEG", quality=quality)
            decoded[channel, :, :, z] = np.asarray(Image.open(buffer), dtype=np.float32) / 255
    return decoded


class SliceJPEGd(MapTransform):
    """
    Dictionary transform: ``jpeg_slices`` on each key (``(C, H, W, D)`` images in [0, 1]; the output keeps
    the input's type, numpy or tensor, and dtype).

    Args:
        keys: the image keys.
        quality: the JPEG quality.
        allow_missing_keys: as in MONAI's MapTransform.
    """

    def __init__(self, keys, quality: int = 75, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quality = quality

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            decoded = jpeg_slices(convert_to_numpy(out[key]), self.quality)
            out[key] = convert_to_dst_type(decoded, out[key])[0]
        return out


class ResampledInferer(Inferer):
    """
    Scores a victim trained at another voxel spacing (the ``resample`` countermeasure) on the test
    volume's own grid: the image is resampled to ``pixdim`` (bilinear, as the training volumes were),
    segmented there by ``inferer``, and its logits are resampled back onto the input's grid
    nearest-neighbour, so the argmax is the nearest-neighbour resampling of the prediction and DSC and
    HD95 are measured against the label on its original grid.

    Args:
        inferer: the inferer at the new spacing (e.g. a SlidingWindowInferer over the patch size).
        pixdim: the voxel spacing (mm) the victim was trained at, one value or one per axis.
    """

    def __init__(self, inferer: Inferer, pixdim: float | Sequence[float]) -> None:
        super().__init__()
        self.inferer = inferer
        self.to_spacing = Spacing(pixdim=pixdim, mode="bilinear")
        self.back = SpatialResample(mode="nearest")

    def __call__(self, inputs: MetaTensor, network, *args, **kwargs) -> torch.Tensor:
        """
        Args:
            inputs: ``(1, C, H, W, D)`` MetaTensor whose affine is the test volume's.
            network: the victim.

        Returns:
            ``(1, K, H, W, D)`` logits on the input's grid.
        """
        resampled = self.to_spacing(inputs[0])
        logits = self.inferer(resampled.as_tensor()[None], network, *args, **kwargs)[0]
        back = self.back(MetaTensor(logits, affine=resampled.affine), dst_affine=inputs.affine,
                         spatial_size=inputs.shape[2:])
        return back.as_tensor()[None]


class AdversarialBatch(PrepareBatch):
    """
    MONAI ``prepare_batch`` for PGD adversarial training (Madry et al. 2018): the victim trains on
    ``x + delta_adv``, where ``delta_adv`` approximately maximises its loss within the L-inf ball of
    radius ``eps`` (and keeps ``x + delta`` in [0, 1]): a uniform random start in the ball, then
    ``steps`` signed-gradient ascent steps of ``step_size``, each projected back into the ball. The
    attack runs the network in whatever mode the trainer left it, and only ``delta`` gets gradients.

    Args:
        network: the victim being trained.
        loss_function: its training loss, ``loss_function(logits, label)``.
        eps: the radius, on intensities normalised to [0, 1] (the protection's eps).
        steps: ascent steps.
        step_size: the size of each step (e.g. eps / 2).
    """

    def __init__(self, network: torch.nn.Module, loss_function, eps: float, steps: int = 3,
                 step_size: float | None = None) -> None:
        self.network, self.loss_function = network, loss_function
        self.eps, self.steps = float(eps), int(steps)
        self.step_size = self.eps / 2 if step_size is None else float(step_size)

    def attack(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` images in [0, 1] and their labels -> the adversarial images, same shape, detached."""
        image = image.detach()
        delta = torch.empty_like(image).uniform_(-self.eps, self.eps)
        delta = (image + delta).clamp(0, 1) - image
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss = self.loss_function(self.network(image + delta), label)
            (gradient,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + self.step_size * gradient.sign()).clamp(-self.eps, self.eps)
            delta = (image + delta).clamp(0, 1) - image
        return (image + delta).detach()

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        return self.attack(image, label), label
