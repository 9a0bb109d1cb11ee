"""VoxShield, the paper's method: a noise generator trained against a surrogate segmenter."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from custom.losses import InterSliceSpectralLoss, SemanticPredictionDisruptionLoss
from custom.perturbation import ROIBoundedPerturbation
from custom.protector_base import Protector


class VoxShield(Protector):
    """
    VoxShield (the paper's method): a generator G makes the noise, trained against a surrogate F
    in alternation. Each ``fit_step`` runs ``surrogate_steps`` updates of F on x_p with G fixed
    (DiceCE; only on the first ``surrogate_batches_per_epoch`` batches of an epoch when that is
    set), then ``generator_steps`` updates of G with F frozen, minimising
    L = segmentation_loss(F(x_p), y) + lambda_spd * L_SPD(F(x_p), F(x)) + lambda_isc * L_ISC(delta);
    the two parts are ``fit_surrogate`` and ``fit_generator`` (benchmarks/speed.py times them apart).
    ``perturb`` runs G over a whole volume with ``inferer`` (sliding windows).

    With ``augmentation`` (e.g. custom.augmentation.ExploiterAugmentation) the fit is an expectation
    over an augmenting exploiter's transformations, not the paper's method: F trains on augmented
    x_p, and each G update draws one transformation and applies it alike to x, x_p and y, so the
    noise is fitted to keep its shortcut through the augmentation. L_ISC still sees the un-augmented delta.

    fit_step returns ``loss`` (the generator's L), ``surrogate_loss``, ``segmentation_loss``,
    ``spd_loss`` and ``isc_loss``.

    Args:
        perturbation, seed, amp: see Protector.
        generator: G, C input channels -> C output channels (raw noise before the bound).
        inferer: runs G over a whole volume, e.g. monai.inferers.SlidingWindowInferer; None calls G.
        surrogate: F, C input channels -> K class logits (fitting only).
        generator_optimizer, surrogate_optimizer: optimisers over G's and F's parameters (fitting only).
        segmentation_loss: e.g. monai.losses.DiceCELoss(to_onehot_y=True, softmax=True) (fitting only).
        lambda_spd: weight of L_SPD. Default 0.05 (paper).
        lambda_isc: weight of L_ISC. Default 0.2 (paper).
        isc_loss: the L_ISC module; default InterSliceSpectralLoss().
        spd_loss: the L_SPD module; default SemanticPredictionDisruptionLoss().
        surrogate_steps: F updates per batch. Default 1.
        generator_steps: G updates per batch. Default 1.
        surrogate_batches_per_epoch: update F on this many batches per epoch only (the authors' code:
            10 surrogate minibatches, then a generator pass over every case); None, the default,
            updates F on every batch.
        augmentation: the exploiter's augmentation to fit through (fitting only), such as
            custom.augmentation.ExploiterAugmentation: ``augmentation(image, label)`` draws and applies
            a transformation, ``draw(shape)`` and ``apply(draw, image, label=None)`` do it in two steps,
            both returning (image, label). None, the default, fits on the data as it is (the paper).
        surrogate_restart_every: re-initialise F every this many fit steps (fresh weights drawn from
            ``seed`` and the restart's number, its optimiser's state cleared), so G is fitted against
            surrogates of every age, fresh ones among them: noise that a victim learns from its first
            steps, not only noise a converged F finds easy (issue 14; not the paper's method). None,
            the default (the paper), never.
    """

    name = "voxshield"
    checkpoint_name = "generator.pt"

    def __init__(
        self,
        perturbation: ROIBoundedPerturbation,
        generator: nn.Module,
        inferer=None,
        surrogate: nn.Module | None = None,
        generator_optimizer: torch.optim.Optimizer | None = None,
        surrogate_optimizer: torch.optim.Optimizer | None = None,
        segmentation_loss=None,
        lambda_spd: float = 0.05,
        lambda_isc: float = 0.2,
        isc_loss: nn.Module | None = None,
        spd_loss: nn.Module | None = None,
        surrogate_steps: int = 1,
        generator_steps: int = 1,
        surrogate_batches_per_epoch: int | None = None,
        augmentation: nn.Module | None = None,
        surrogate_restart_every: int | None = None,
        seed: int = 0,
        amp: bool = False,
    ) -> None:
        super().__init__(perturbation, seed, amp)
        if surrogate_steps < 0 or generator_steps < 1:
            raise ValueError("surrogate_steps must be >= 0 and generator_steps >= 1.")
        if surrogate_batches_per_epoch is not None and surrogate_batches_per_epoch < 0:
            raise ValueError(f"surrogate_batches_per_epoch must be None or >= 0, got {surrogate_batches_per_epoch}.")
        if surrogate_restart_every is not None and surrogate_restart_every < 1:
            raise ValueError(f"surrogate_restart_every must be None or >= 1, got {surrogate_restart_every}.")
        self.generator = generator
        self.inferer = inferer
        self.surrogate = surrogate
        self.generator_optimizer = generator_optimizer
        self.surrogate_optimizer = surrogate_optimizer
        self.segmentation_loss = segmentation_loss
        self.lambda_spd = lambda_spd
        self.lambda_isc = lambda_isc
        self.isc_loss = isc_loss if isc_loss is not None else InterSliceSpectralLoss()
        self.spd_loss = spd_loss if spd_loss is not None else SemanticPredictionDisruptionLoss()
        self.surrogate_steps = surrogate_steps
        self.generator_steps = generator_steps
        self.surrogate_batches_per_epoch = surrogate_batches_per_epoch
        self._surrogate_batches_left = surrogate_batches_per_epoch
        self.augmentation = augmentation
        self.surrogate_restart_every = surrogate_restart_every
        self._fit_steps = 0

    def start_epoch(self) -> None:
        self._surrogate_batches_left = self.surrogate_batches_per_epoch

    @property
    def checkpoint_module(self) -> nn.Module:
        return self.generator

    def fit_step(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
        if None in (self.surrogate, self.generator_optimizer, self.surrogate_optimizer, self.segmentation_loss):
            raise ValueError("fitting VoxShield needs surrogate, both optimisers and segmentation_loss.")
        roi = self.support(label)
        if self.surrogate_restart_every and self._fit_steps and self._fit_steps % self.surrogate_restart_every == 0:
            self.restart_surrogate(self._fit_steps // self.surrogate_restart_every)
        self._fit_steps += 1
        self.generator.train()
        self.surrogate.train()
        surrogate_steps = self.surrogate_steps
        if self._surrogate_batches_left is not None:
            surrogate_steps = surrogate_steps if self._surrogate_batches_left > 0 else 0
            self._surrogate_batches_left -= 1
        surrogate_loss = self.fit_surrogate(image, label, roi, surrogate_steps)
        generator_losses = self.fit_generator(image, label, roi)
        return {"loss": generator_losses.pop("loss"), "surrogate_loss": surrogate_loss.item(), **generator_losses}

    def restart_surrogate(self, restart: int) -> None:
        """F's weights drawn afresh, as at construction (each layer's reset_parameters) but from
        (seed, ``restart``), and its optimiser's state (Adam's moments and step counts) cleared."""
        devices = sorted({p.device.index or 0 for p in self.surrogate.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 100_003 + restart)
            for module in self.surrogate.modules():
                if module is not self.surrogate and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.surrogate_optimizer.state.clear()

    def fit_surrogate(self, image: torch.Tensor, label: torch.Tensor, roi: torch.Tensor, steps: int) -> torch.Tensor:
        """
        The surrogate's part of a fit step: ``steps`` DiceCE updates of F on x_p (a fresh draw of
        ``augmentation`` each, when set), G fixed.

        Args:
            image, label: the batch of training patches.
            roi: ``support(label)``.
            steps: the number of updates (0 leaves F as it is).

        Returns:
            the last update's loss (a zero tensor when ``steps`` is 0).
        """
        surrogate_loss = torch.zeros(())
        for _ in range(steps):
            with torch.no_grad(), self.autocast(image.device):
                protected, _ = self.perturbation(image, self.generator(image), roi)
            seen, seen_label = protected, label
            if self.augmentation is not None:
                seen, seen_label = self.augmentation(protected, label)
            with self.autocast(image.device):
                surrogate_loss = self.segmentation_loss(self.surrogate(seen), seen_label)
            self.optimiser_step(self.surrogate_optimizer, surrogate_loss)
        return surrogate_loss

    def fit_generator(self, image: torch.Tensor, label: torch.Tensor, roi: torch.Tensor) -> dict[str, float]:
        """
        The generator's part of a fit step: F's clean logits once, without gradients, then
        ``generator_steps`` updates of G against F, frozen. With ``augmentation``, each update draws
        one transformation for x, x_p and y, so the clean logits are computed per update, on augmented x.

        Args:
            image, label: the batch of training patches.
            roi: ``support(label)``.

        Returns:
            the last update's ``loss`` (L), ``segmentation_loss``, ``spd_loss`` and ``isc_loss``.
        """
        frozen = getattr(self.surrogate, "module", self.surrogate)  # skip DDP's all-reduce in frozen passes
        frozen.eval()
        frozen.requires_grad_(False)
        try:
            # the labelled phases show where the step's time goes under torch.profiler (benchmarks/speed.py)
            def clean_forward(clean: torch.Tensor) -> torch.Tensor:
                with torch.no_grad(), self.autocast(image.device), record_function("voxshield.clean_forward"):
                    return frozen(clean)

            if self.augmentation is None:
                clean_logits = clean_forward(image)  # the same for every update: no draw to depend on
            for _ in range(self.generator_steps):
                seen_label = label
                if self.augmentation is not None:
                    draw = self.augmentation.draw(image.shape)
                    with record_function("voxshield.exploiter_augmentation"):
                        clean = self.augmentation.apply(draw, image)[0]
                    clean_logits = clean_forward(clean)
                with self.autocast(image.device):
                    with record_function("voxshield.generator_forward"):
                        protected, delta = self.perturbation(image, self.generator(image), roi)
                    if self.augmentation is not None:
                        with record_function("voxshield.exploiter_augmentation"):
                            protected, seen_label = self.augmentation.apply(draw, protected, label)
                    with record_function("voxshield.surrogate_forward_and_losses"):
                        protected_logits = frozen(protected)
                        segmentation = self.segmentation_loss(protected_logits, seen_label)
                        spd = self.spd_loss(protected_logits, clean_logits)
                        isc = self.isc_loss(delta)
                        loss = segmentation + self.lambda_spd * spd + self.lambda_isc * isc
                with record_function("voxshield.backward_and_update"):
                    self.optimiser_step(self.generator_optimizer, loss)
        finally:
            frozen.requires_grad_(True)
        return {"loss": loss.item(), "segmentation_loss": segmentation.item(), "spd_loss": spd.item(),
                "isc_loss": isc.item()}

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.generator.eval()
        with torch.no_grad():
            noise = self.inferer(image, self.generator) if self.inferer is not None else self.generator(image)
            if not torch.isfinite(noise).all():
                raise RuntimeError("the generator produced NaN or Inf; its checkpoint is unusable.")
            return self.perturbation(image, noise, self.support(label))[1]
