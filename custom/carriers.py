"""
Label-coded carriers (issue 14): a secret periodic pattern saturated at the bound, written into the
volume where the label says. Measured on la_mri, structure and support decide what a victim picks
up: a pattern it learns faster than the anatomy costs it more accuracy per unit of budget than
random noise of the same bound. Training-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from custom.perturbation import ROIBoundedPerturbation
from custom.protector_base import Protector

ORIENTATIONS = ("diagonal", "random", "per_case", "isotropic", "constant", "dots")
PER_CASE_PERIOD_FACTORS = (0.7, 1.4)  # nnU-Net's zoom range: each case's period is the period times a factor in it
RING_HALF_WIDTH = 0.25  # the isotropic carrier's pass band: |f| within 1/period x (1 -+ this)
CODINGS = ("presence", "phase")


def _voxel_indices(size: Sequence[int], device: torch.device | None) -> tuple[torch.Tensor, ...]:
    """The (H, W, D) = ``size`` grids of each voxel's index along each axis, float64."""
    return torch.meshgrid(*(torch.arange(int(n), dtype=torch.float64, device=device) for n in size), indexing="ij")


class LabelCodedCarrier(Protector):
    """
    A square-wave carrier s(x) = sign(cos(2 pi (d . x) / period + phi)), values +-1, saturated at
    eps and coded by the label:

    - ``coding="presence"``: each foreground class c carries its own carrier s_c on its voxels; the
      rest of the support carries nothing. A victim can learn "patterned -> class c".
    - ``coding="phase"``: the foreground carries s_c as above and every other voxel of the support
      carries -s_1, so the label is written in the carrier's sign (and the pattern alone does not
      tell foreground from background). Use it with a support wider than the label:
      ``mask_roi=False`` (the whole volume) or ``roi_dilation`` (the label plus a band); on the
      label alone it equals presence coding. ``outside_amplitude`` < 1 spends less of the budget
      outside the label, where most voxels are (as UnSeg does in 2D: 8/255 on the object, 2/255
      on the background), which raises the whole-volume PSNR.

    The direction d spans ``axes`` only, so the carrier is constant along the other axes: the
    default in-plane carrier (axes 0 and 1) is the same on every slice, which smoothing across
    slices does not remove. ``orientation="diagonal"`` with ``period=2`` is the checkerboard at the
    grid's Nyquist frequency ((-1)^(i+j) in-plane; (-1)^(i+j+k) with all three axes), shared by
    every class; ``orientation="random"`` draws each class's unit direction (within ``axes``) and
    phase from ``seed``, so classes get different carriers and the pattern is secret. Periods of 3-8
    voxels survive resampling and smoothing better than the Nyquist checkerboard. Coordinates are
    voxel indices of the whole volume, so the carrier is the same whatever the order of the cases.
    ``orientation="per_case"`` draws the direction and phase like "random", and a period of ``period``
    times a factor uniform in PER_CASE_PERIOD_FACTORS, from seed, class and the case's voxels: each
    case shows the carrier as an exploiter's rotations and zooms would, so a victim that learns it
    learns it that way (nnU-Net's rotation and scaling alone leave a fixed period-8 carrier at 66% of
    clean on la_mri; drawn per case, period 8 at 16/255 is not learned at all: 99.65%).
    ``orientation="isotropic"`` has no direction: the sign of seeded white noise band-passed (over
    ``axes``) to the ring of frequencies within 1/period x (1 -+ 0.25), a labyrinth texture of that
    period with every orientation equally present, so flips and rotations (an exploiter's
    augmentation) change the pattern but not its statistics; it is drawn per class from ``seed`` and
    the volume's size. ``orientation="constant"`` is the carrier of frequency zero, s = +1: the label
    made eps brighter (``polarity=-1``: darker), with phase coding the rest of the support darker
    (brighter); no flip, rotation, zoom, blur or low-resolution step removes an offset that moves
    with the label.
    ``orientation="dots"`` is not a wave: s = 1 on discs of diameter period / 2 centred on a square
    lattice of spacing ``period`` over ``axes`` (rods along the other axes) and 0 between them, so a
    fifth of the label carries the full bound (the rest nothing: at the same PSNR a bound more than
    twice the saturated carrier's); a disc stays a disc under flips and rotations, and blur or a coarser
    resolution dims it without changing what it looks like.

    Args:
        perturbation: eps and the support (mask_roi, roi_dilation) shared by every method.
        period: voxels per cycle along d. Default 2.0 (with "diagonal": the checkerboard).
        axes: spatial axes (0, 1, 2 of H, W, D) the carrier varies along. Default (0, 1).
        orientation: ``"diagonal"`` (d = 1 on each of ``axes``; phase a quarter step off the zero
            crossings), ``"random"`` (per class, from ``seed``), ``"per_case"``, ``"isotropic"``, ``"constant"``
            (ignores ``period``) or ``"dots"``, see above. Default "diagonal".
        coding: ``"presence"`` or ``"phase"``, see above. Default "phase".
        outside_amplitude: the carrier's amplitude outside the label under phase coding, as a
            fraction of eps, in [0, 1]. Default 1.0.
        polarity: +1 or -1, multiplies every carrier (for a square wave a shift by half a period).
            Default 1.
        seed: draws the directions and phases of ``orientation="random"`` and the textures of
            ``"isotropic"``.
        amp: unused (nothing is computed in reduced precision); kept for the common interface.

    Shapes:
        image: (B, C, H, W, D) in [0, 1]; label: (B, 1, H, W, D) class map.
        perturb(...): (B, C, H, W, D), every channel carrying the same pattern.
    """

    name = "carrier"

    def __init__(self, perturbation: ROIBoundedPerturbation, period: float = 2.0, axes: Sequence[int] = (0, 1),
                 orientation: str = "diagonal", coding: str = "phase", outside_amplitude: float = 1.0,
                 polarity: int = 1, seed: int = 0, amp: bool = False) -> None:
        super().__init__(perturbation, seed, amp)
        if not period >= 2:
            raise ValueError(f"period must be >= 2 voxels (the grid's Nyquist limit), got {period}.")
        if not axes or any(axis not in (0, 1, 2) for axis in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"axes must be distinct spatial axes among 0, 1, 2, got {list(axes)}.")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}.")
        if coding not in CODINGS:
            raise ValueError(f"coding must be one of {CODINGS}, got {coding!r}.")
        if not 0 <= outside_amplitude <= 1:
            raise ValueError(f"outside_amplitude must be in [0, 1], got {outside_amplitude}.")
        if polarity not in (1, -1):
            raise ValueError(f"polarity must be 1 or -1, got {polarity}.")
        self.period, self.orientation, self.coding = float(period), orientation, coding
        self.polarity = int(polarity)
        self.outside_amplitude = float(outside_amplitude)
        self._axes = tuple(int(axis) for axis in axes)

    def settings(self) -> dict:
        return {**super().settings(), "axes": list(self._axes)}

    def wave(self, class_index: int, case_seed: int | None = None) -> tuple[list[float], float, float]:
        """Class ``class_index``'s direction d (3 components, zero off ``axes``), phase phi and period,
        drawn from (seed, class), or for "per_case" from (``case_seed``, class), ``case_seed`` being the
        seed of Protector.random_generator on the case."""
        if self.orientation == "diagonal":
            return [1.0 if axis in self._axes else 0.0 for axis in range(3)], math.pi / (2 * self.period), self.period
        generator = self.class_generator(class_index, case_seed)
        components = torch.randn(len(self._axes), generator=generator)
        components = components / components.norm()
        phase = 2 * math.pi * torch.rand((), generator=generator).item()
        period = self.period
        if self.orientation == "per_case":
            low, high = PER_CASE_PERIOD_FACTORS
            period *= low + (high - low) * torch.rand((), generator=generator).item()
        direction = [0.0, 0.0, 0.0]
        for axis, component in zip(self._axes, components.tolist()):
            direction[axis] = component
        return direction, phase, period

    def carrier(self, class_index: int, size: Sequence[int], device: torch.device | None = None,
                case_seed: int | None = None) -> torch.Tensor:
        """(H, W, D) = ``size`` carrier of class ``class_index`` (see the class's docstring) times the
        polarity, values +-1 (0 and +-1 for "dots"); ``case_seed`` is the case's, for "per_case"."""
        return self.polarity * self._unsigned_carrier(class_index, size, device, case_seed)

    def _unsigned_carrier(self, class_index: int, size: Sequence[int], device: torch.device | None,
                          case_seed: int | None) -> torch.Tensor:
        if self.orientation == "constant":
            return torch.ones(tuple(int(n) for n in size), device=device)
        if self.orientation == "isotropic":
            return self.isotropic_texture(class_index, size).to(device)
        if self.orientation == "dots":
            return self.dots(size, device)
        direction, phase, period = self.wave(class_index, case_seed)
        coordinates = _voxel_indices(size, device)
        position = sum(component * grid for component, grid in zip(direction, coordinates))
        wave = torch.cos(2 * math.pi * position / period + phase)
        return torch.where(wave >= 0, 1.0, -1.0).float()

    def isotropic_texture(self, class_index: int, size: Sequence[int]) -> torch.Tensor:
        """(H, W, D) = ``size``: sign of white noise (seeded by seed, class and size) kept on the ring
        of frequencies around 1/period over ``axes``, constant along the other axes."""
        plane = [int(size[axis]) for axis in sorted(self._axes)]
        generator = self.class_generator(class_index)
        noise = torch.randn(plane, generator=generator, dtype=torch.float64)
        frequencies = torch.meshgrid(*(torch.fft.fftfreq(n, dtype=torch.float64) for n in plane), indexing="ij")
        radius = torch.sqrt(sum(frequency ** 2 for frequency in frequencies))
        ring = (radius - 1 / self.period).abs() <= RING_HALF_WIDTH / self.period
        texture = torch.fft.ifftn(torch.fft.fftn(noise) * ring).real
        sign = torch.where(texture >= 0, 1.0, -1.0).float()
        # the texture spans the axes in increasing order; the other axes are broadcast
        shape = [int(size[axis]) if axis in self._axes else 1 for axis in range(3)]
        return sign.reshape(shape).expand(*(int(n) for n in size)).contiguous()

    def dots(self, size: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """(H, W, D) = ``size``: 1 within period / 4 of the lattice points (period - 1) / 2 + period x n over
        ``axes`` (every voxel distance measured over those axes only), 0 elsewhere."""
        coordinates = _voxel_indices(size, device)
        squared = sum((torch.remainder(coordinates[axis], self.period) - (self.period - 1) / 2) ** 2
                      for axis in self._axes)
        return (squared <= (self.period / 4) ** 2).float()

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.orientation == "per_case":  # each case its own draw
            return torch.cat([self._perturb_cases(image[b : b + 1], label[b : b + 1],
                                                  self.random_generator(image[b : b + 1]).initial_seed())
                              for b in range(image.shape[0])])
        return self._perturb_cases(image, label, None)

    def _perturb_cases(self, image: torch.Tensor, label: torch.Tensor, case_seed: int | None) -> torch.Tensor:
        """perturb for cases that share their carriers (one case for "per_case")."""
        foreground_classes = [int(c) for c in torch.unique(label).tolist() if c > 0]
        # each carrier built once: under phase coding class 1's also fills the rest of the support
        carriers = {c: self.carrier(c, image.shape[2:], image.device, case_seed)
                    for c in foreground_classes + ([1] if self.coding == "phase" else [])}
        pattern = torch.zeros_like(label, dtype=torch.float32)
        if self.coding == "phase":
            pattern = pattern - self.outside_amplitude * carriers[1]
        for class_index in foreground_classes:
            pattern = torch.where(label == class_index, carriers[class_index], pattern)
        noise = self.perturbation.eps * pattern.to(image).expand_as(image)
        return self.perturbation.project(image, noise, self.support(label))[1]
