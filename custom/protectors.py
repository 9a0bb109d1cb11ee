"""
The 3D baselines EM, TAP, LSP, SEP, PUE, UMed and a random-noise control, behind the interface of
custom.protector_base.Protector, and the registry of every method (these, custom.voxshield.VoxShield
and custom.carriers.LabelCodedCarrier) that the bundle configs choose from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from custom.nifti_io import VoxShieldInputError
from custom.perturbation import ROIBoundedPerturbation, dilate
from custom.protector_base import Protector
from custom.carriers import LabelCodedCarrier
from custom.voxshield import VoxShield


def _uniform(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform in [-1, 1], drawn on the CPU (so the draw does not depend on the device)."""
    return (torch.rand(shape, generator=generator) * 2 - 1).to(like)


class RandomNoise(Protector):
    """
    Control: uniform noise in [-eps, eps] on the support. It shows how much of a method's effect
    comes from the ROI-shaped support alone. Training-free.

    Args: see Protector.
    """

    name = "random"

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        noise = self.perturbation.eps * _uniform(image.shape, self.random_generator(image), image)
        return self.perturbation.project(image, noise, self.support(label))[1]


class LinearSeparableNoise(Protector):
    """
    LSP (Yu et al., KDD 2022) in 3D, training-free: each class k gets a random code of
    C x grid^3 values drawn like sklearn's make_classification (a hypercube vertex scaled by
    ``class_separation`` plus unit Gaussian noise), so the codes are linearly separable; each code
    value fills a cube of ``patch_size`` voxels and the grid of cubes tiles the volume. The noise
    at a voxel is its class's pattern there (composed by the label map, as the paper adapts LSP
    to segmentation), scaled so the largest code value is eps and clipped to the eps ball.

    Args:
        perturbation, seed: see Protector (codes depend on seed and class only, not on the volume).
        patch_size: edge of each constant cube, voxels. Default 8 (LSP's 2D patch size).
        grid: cubes per period along each axis. Default 4 (LSP's 32/8 in 2D).
        class_separation: hypercube half-side in units of the code noise. Default 2.0.
    """

    name = "lsp"

    def __init__(self, perturbation: ROIBoundedPerturbation, patch_size: int = 8, grid: int = 4,
                 class_separation: float = 2.0, seed: int = 0, amp: bool = False) -> None:
        super().__init__(perturbation, seed, amp)
        if patch_size < 1 or grid < 1:
            raise ValueError("patch_size and grid must be >= 1.")
        self.patch_size, self.grid, self.class_separation = int(patch_size), int(grid), float(class_separation)

    def class_code(self, class_index: int, channels: int) -> torch.Tensor:
        """(channels, grid, grid, grid) code of one class, values scaled into [-1, 1]."""
        generator = self.class_generator(class_index)
        shape = (channels, self.grid, self.grid, self.grid)
        vertex = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        code = self.class_separation * vertex + torch.randn(shape, generator=generator)
        return code / code.abs().max()

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        channels, size = image.shape[1], image.shape[2:]
        cells = [(torch.arange(n, device=image.device) // self.patch_size) % self.grid for n in size]
        noise = torch.zeros_like(image)
        for class_index in torch.unique(label).tolist():
            code = self.class_code(int(class_index), channels).to(image)
            pattern = code[:, cells[0][:, None, None], cells[1][None, :, None], cells[2][None, None, :]]
            noise = torch.where(label == class_index, pattern.unsqueeze(0), noise)
        return self.perturbation.project(image, self.perturbation.eps * noise, self.support(label))[1]


class LabelConvolution(Protector):
    """
    Per-label convolution, after CUDA (Sadasivan et al., CVPR 2023: each class's images blurred by a
    secret kernel of its own), in 3D and by the label map: the voxels of foreground class c are
    replaced by the image convolved with class c's secret kernel K_c, so their texture, not their
    intensity, carries the label. K_c = (identity + ``blur`` x U_c) / its sum, U_c a ``kernel_size``^3
    array uniform in [0, 1) drawn from (seed, class): a weighted average (flat regions unchanged),
    anisotropic at random. The change is not an L-infinity noise: what it costs is the PSNR and SSIM
    protect records; ``perturbation.eps`` still clips it (``--eps 1`` leaves it whole). Training-free.

    Args:
        perturbation, seed: see Protector (kernels depend on seed and class only, not on the volume).
        kernel_size: K_c's edge, voxels, odd. Default 3.
        blur: weight of the random part against the identity. Default 0.3.

    Shapes:
        image: (B, C, H, W, D) in [0, 1]; label: (B, 1, H, W, D) class map.
        perturb(...): (B, C, H, W, D), each channel filtered by the same K_c (edges replicated).
    """

    name = "convolution"

    def __init__(self, perturbation: ROIBoundedPerturbation, kernel_size: int = 3, blur: float = 0.3,
                 seed: int = 0, amp: bool = False) -> None:
        super().__init__(perturbation, seed, amp)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number of voxels, got {kernel_size}.")
        if not blur > 0:
            raise ValueError(f"blur must be > 0, got {blur}.")
        self.kernel_size, self.blur = int(kernel_size), float(blur)

    def class_kernel(self, class_index: int) -> torch.Tensor:
        """(k, k, k) kernel of class ``class_index``, non-negative, summing to 1."""
        generator = self.class_generator(class_index)
        kernel = self.blur * torch.rand((self.kernel_size,) * 3, generator=generator, dtype=torch.float64)
        kernel[(self.kernel_size // 2,) * 3] += 1.0
        return kernel / kernel.sum()

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        channels, half = image.shape[1], self.kernel_size // 2
        padded = F.pad(image.double(), (half,) * 6, mode="replicate")
        change = torch.zeros_like(image)
        for class_index in [int(c) for c in torch.unique(label).tolist() if c > 0]:
            kernel = self.class_kernel(class_index).to(image.device).expand(channels, 1, *(self.kernel_size,) * 3)
            filtered = F.conv3d(padded, kernel, groups=channels).to(image.dtype)
            change = torch.where(label == class_index, filtered - image, change)
        return self.perturbation.project(image, change, self.support(label))[1]


class SurrogateNoise(Protector):
    """
    Base of the surrogate-based baselines (EM, SEP, PUE, TAP, UMed): sample-wise noise crafted by
    projected sign-gradient steps (PGD) on a 3D UNet surrogate F.

    Fitting trains F on batches of patches; with ``train_on_noise`` each batch first gets noise
    crafted against the current F (``train_steps`` steps), so F and the noise are optimised
    together (the min-min of EM). ``perturb`` crafts the published noise for a whole volume against
    the fitted F with ``steps`` steps (the volume is zero-padded to a multiple of ``divisible`` for
    the UNet and cropped back). Subclasses change ``objective`` (what the noise minimises),
    ``surrogate_loss`` (what F minimises) and ``bound`` (per-voxel budget).

    3D adaptation, the same for every subclass: noise is re-crafted for each training batch instead
    of kept in a per-sample table (random patches of a volume overlap differently each epoch), and
    the published noise is crafted against the final surrogate, so unseen cases can be protected.

    Args:
        perturbation, seed, amp: see Protector.
        surrogate: F, C input channels -> K class logits.
        surrogate_optimizer: optimiser over F's parameters (fitting only).
        segmentation_loss: e.g. DiceCELoss(to_onehot_y=True, softmax=True).
        steps: PGD steps for the published noise. Default 10.
        step_size: PGD step in normalised intensity. Default eps / 4.
        train_steps: PGD steps per training batch when ``train_on_noise``. Default 5.
        restarts: PGD runs from random starts; the one with the lowest objective wins. Default 1
            (a zero start).
        divisible: whole volumes are zero-padded to a multiple of this (the surrogate's stride
            product). Default 16.
    """

    checkpoint_name = "surrogate.pt"
    train_on_noise = True

    def __init__(self, perturbation: ROIBoundedPerturbation, surrogate: nn.Module,
                 surrogate_optimizer: torch.optim.Optimizer | None = None, segmentation_loss=None,
                 steps: int = 10, step_size: float | None = None, train_steps: int = 5, restarts: int = 1,
                 divisible: int = 16, seed: int = 0, amp: bool = False) -> None:
        super().__init__(perturbation, seed, amp)
        if isinstance(surrogate, nn.parallel.DistributedDataParallel):
            raise ValueError(f"{self.name}: multi-GPU fitting is implemented for VoxShield only; fit on one device.")
        if steps < 1 or train_steps < 0 or restarts < 1:
            raise ValueError("steps and restarts must be >= 1 and train_steps >= 0.")
        self.surrogate = surrogate
        self.surrogate_optimizer = surrogate_optimizer
        self.segmentation_loss = segmentation_loss
        self.steps, self.train_steps, self.restarts = int(steps), int(train_steps), int(restarts)
        self.step_size = float(step_size) if step_size is not None else perturbation.eps / 4
        self.divisible = int(divisible)

    @property
    def checkpoint_module(self) -> nn.Module:
        return self.surrogate

    def bound(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per-voxel L-infinity budget, (B, C or 1, H, W, D): eps on the support."""
        return self.perturbation.eps * self.support(label)

    def objective(self, image: torch.Tensor, delta: torch.Tensor, label: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """What the noise minimises; error-minimising by default: the surrogate's loss on x + delta."""
        return self.segmentation_loss(self.surrogate(image + delta), label)

    def surrogate_loss(self, inputs: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """What F minimises on its (noisy) training input."""
        return self.segmentation_loss(self.surrogate(inputs), label)

    def craft(self, image: torch.Tensor, label: torch.Tensor, steps: int) -> torch.Tensor:
        bound = self.bound(image, label)
        generator = self.random_generator(image)
        best, best_objective = torch.zeros_like(image), None
        for restart in range(self.restarts):
            delta = bound * _uniform(image.shape, generator, image) if restart else torch.zeros_like(image)
            for _ in range(steps):
                delta.requires_grad_(True)
                with self.autocast(image.device):
                    objective = self.objective(image, delta, label, generator)
                (gradient,) = torch.autograd.grad(objective, delta)
                delta = torch.maximum(torch.minimum(delta.detach() - self.step_size * gradient.sign(), bound), -bound)
                delta = (image + delta).clamp(0, 1) - image
            with torch.no_grad(), self.autocast(image.device):
                final = self.objective(image, delta, label, generator).item()
            if best_objective is None or final < best_objective:
                best, best_objective = delta, final
        return best

    def fit_step(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
        if self.surrogate_optimizer is None or self.segmentation_loss is None:
            raise ValueError(f"fitting {self.name} needs surrogate_optimizer and segmentation_loss.")
        self.surrogate.eval()
        delta = self.craft(image, label, self.train_steps) if self.train_on_noise else torch.zeros_like(image)
        self.surrogate.train()
        with self.autocast(image.device):
            loss = self.surrogate_loss(image + delta, label, self.random_generator(image))
        self.optimiser_step(self.surrogate_optimizer, loss)
        return {"loss": loss.item()}

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        size = image.shape[2:]
        # F.pad over the whole batch: MONAI's DivisiblePad pads one channel-first sample at a time
        padding = [p for n in reversed(size) for p in (0, -n % self.divisible)]
        padded_image, padded_label = F.pad(image, padding), F.pad(label, padding)
        self.surrogate.eval()
        self.surrogate.requires_grad_(False)
        try:
            delta = self.craft(padded_image, padded_label, self.steps)
        finally:
            self.surrogate.requires_grad_(True)
        delta = delta[(..., *(slice(0, n) for n in size))]
        return self.perturbation.project(image, delta, self.support(label))[1]


class ErrorMinimizing(SurrogateNoise):
    """
    EM (Huang et al., ICLR 2021) in 3D: min-min optimisation, the noise minimising the surrogate's
    loss while the surrogate trains on the noisy data. Published 2D defaults (eps 8/255, step
    0.8/255 = eps/10, 20 steps) become 10 steps of eps/4 at protect time and 5 per training batch.
    Args: see SurrogateNoise.
    """

    name = "em"


class AdversarialPoisoning(SurrogateNoise):
    """
    TAP (Fowl et al., NeurIPS 2021) in 3D: the surrogate trains on clean data; the noise then
    maximises its loss (untargeted) or, with ``targeted``, minimises cross-entropy toward the
    shifted label (class c -> c + 1 mod K at every voxel), with random restarts.

    Args:
        targeted: class-shift target instead of loss maximisation. Default True (TAP's main setting).
        others: see SurrogateNoise (TAP's restarts default to 2 here).
    """

    name = "tap"
    train_on_noise = False

    def __init__(self, *args, targeted: bool = True, restarts: int = 2, **kwargs) -> None:
        super().__init__(*args, restarts=restarts, **kwargs)
        self.targeted = bool(targeted)

    def objective(self, image, delta, label, generator):
        logits = self.surrogate(image + delta)
        if self.targeted:
            target = (label[:, 0].long() + 1) % logits.shape[1]
            return F.cross_entropy(logits, target)
        return -self.segmentation_loss(logits, label)


class StableErrorMinimizing(SurrogateNoise):
    """
    SEP, the stable error-minimising noise the paper cites (Liu et al., AAAI 2024), in 3D: EM whose
    surrogate trains on x + delta plus uniform random noise of radius ``random_radius`` (over the
    whole volume), and whose noise step averages the loss over ``draws`` such random noises.

    Args:
        random_radius: radius of the random noise; default eps / 2.
        draws: random noises averaged per noise step. Default 2 (reduced for 3D cost).
        others: see SurrogateNoise.
    """

    name = "sep"

    def __init__(self, *args, random_radius: float | None = None, draws: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if draws < 1:
            raise ValueError("draws must be >= 1.")
        self.random_radius = float(random_radius) if random_radius is not None else self.perturbation.eps / 2
        self.draws = int(draws)

    def _noisy(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (inputs + self.random_radius * _uniform(inputs.shape, generator, inputs)).clamp(0, 1)

    def objective(self, image, delta, label, generator):
        losses = [self.segmentation_loss(self.surrogate(self._noisy(image + delta, generator)), label)
                  for _ in range(self.draws)]
        return torch.stack(losses).mean()

    def surrogate_loss(self, inputs, label, generator):
        return self.segmentation_loss(self.surrogate(self._noisy(inputs, generator)), label)


class ProvablyUnlearnable(SurrogateNoise):
    """
    PUE (Wang et al., NDSS 2025) in 3D: EM where both the surrogate's training loss and the noise's
    objective are averaged over ``draws`` Gaussian perturbations of the surrogate's weights, each
    tensor's noise scaled by sigma times that tensor's RMS; sigma ramps linearly from 0 to
    ``weight_sigma`` over the first ``sigma_ramp_steps`` fit steps and is ``weight_sigma`` at protect time.

    Args:
        weight_sigma: relative weight-noise cap. Default 0.05.
        sigma_ramp_steps: fit steps to reach the cap. Default 200.
        draws: weight draws averaged per loss. Default 2 (reduced for 3D cost).
        others: see SurrogateNoise.
    """

    name = "pue"

    def __init__(self, *args, weight_sigma: float = 0.05, sigma_ramp_steps: int = 200, draws: int = 2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if draws < 1 or weight_sigma < 0:
            raise ValueError("draws must be >= 1 and weight_sigma >= 0.")
        self.weight_sigma, self.sigma_ramp_steps, self.draws = float(weight_sigma), int(sigma_ramp_steps), int(draws)
        self.fit_steps_done = 0
        self.sigma = self.weight_sigma  # the cap, except while the ramp of a fit is under way

    def _averaged_loss(self, inputs, label, generator):
        sigma, losses = self.sigma, []
        for _ in range(self.draws):
            weights = {
                name: parameter + sigma * parameter.detach().pow(2).mean().sqrt()
                * torch.randn(parameter.shape, generator=generator).to(parameter)
                for name, parameter in self.surrogate.named_parameters()
            }
            losses.append(self.segmentation_loss(functional_call(self.surrogate, weights, (inputs,)), label))
        return torch.stack(losses).mean()

    def objective(self, image, delta, label, generator):
        return self._averaged_loss(image + delta, label, generator)

    def surrogate_loss(self, inputs, label, generator):
        return self._averaged_loss(inputs, label, generator)

    def fit_step(self, image, label):
        self.sigma = self.weight_sigma * min(1.0, self.fit_steps_done / max(self.sigma_ramp_steps, 1))
        self.fit_steps_done += 1
        try:
            return super().fit_step(image, label)
        finally:
            self.sigma = self.weight_sigma


class UMed(SurrogateNoise):
    """
    UMed (Lin et al., arXiv 2403.14250) in 3D: contour- and texture-aware error-minimising noise on
    the ROI and its contour band. The paper has no public code and its method section gives no
    formulas we could check, so every choice here is ours:

    - contour band: the voxels within ``contour_width`` of the ROI boundary, inside and outside
      (dilation minus erosion of the ROI by a cube); support = ROI plus that band;
    - contour-aware: full eps on the band, and the objective adds ``contour_weight`` times the
      cross-entropy on the band voxels to the segmentation loss (the noise makes the boundary easy);
    - texture-aware: inside the ROI the budget is eps * (``texture_floor`` + (1 - floor) * t) with
      t the local contrast |x - mean of its 3x3x3 neighbourhood| over its 99th percentile in the
      ROI, clipped to [0, 1]: more noise where texture hides it;
    - optimisation: EM's min-min with PGD (see SurrogateNoise).

    Args:
        contour_width: band half-width in voxels. Default 1.
        contour_weight: weight of the band cross-entropy. Default 1.0.
        texture_floor: budget fraction in flat ROI regions. Default 0.25.
        others: see SurrogateNoise.
    """

    name = "umed"

    def __init__(self, *args, contour_width: int = 1, contour_weight: float = 1.0, texture_floor: float = 0.25,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if contour_width < 1 or not 0 <= texture_floor <= 1:
            raise ValueError("contour_width must be >= 1 and texture_floor in [0, 1].")
        self.contour_width, self.contour_weight, self.texture_floor = int(contour_width), float(contour_weight), float(texture_floor)

    def contour_band(self, label: torch.Tensor) -> torch.Tensor:
        roi = self.perturbation.roi_mask(label)
        return dilate(roi, self.contour_width) - (1 - dilate(1 - roi, self.contour_width))

    def support(self, label: torch.Tensor) -> torch.Tensor:
        return dilate(self.perturbation.roi_mask(label), self.contour_width)

    def bound(self, image, label):
        roi, band = self.perturbation.roi_mask(label), self.contour_band(label)
        contrast = (image - F.avg_pool3d(image, 3, stride=1, padding=1, count_include_pad=False)).abs()
        inside = (roi * (1 - band)).expand_as(image) > 0
        values = contrast[inside]
        scale = values.kthvalue(max(1, int(0.99 * values.numel()))).values if values.numel() else contrast.new_ones(())
        texture = (contrast / scale.clamp_min(1e-6)).clamp(0, 1)
        interior = roi * (1 - band) * (self.texture_floor + (1 - self.texture_floor) * texture)
        return self.perturbation.eps * (band + interior)

    def objective(self, image, delta, label, generator):
        logits = self.surrogate(image + delta)
        band = self.contour_band(label)[:, 0]
        voxel_losses = F.cross_entropy(logits, label[:, 0].long(), reduction="none")
        band_loss = (voxel_losses * band).sum() / band.sum().clamp_min(1)
        return self.segmentation_loss(logits, label) + self.contour_weight * band_loss


METHODS = {method.name: method for method in (VoxShield, ErrorMinimizing, AdversarialPoisoning, LinearSeparableNoise,
                                              StableErrorMinimizing, ProvablyUnlearnable, UMed, RandomNoise,
                                              LabelCodedCarrier, LabelConvolution)}


def select(protectors: dict, method: str) -> Protector:
    """The configured protector of ``method`` (configs disable the others, which resolve to None)."""
    if method not in METHODS or protectors.get(method) is None:
        raise VoxShieldInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    return protectors[method]
