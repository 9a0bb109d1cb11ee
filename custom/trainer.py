"""VoxShield's alternating surrogate / generator training as a MONAI ignite Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.utils import CommonKeys
from torch import nn

from custom.losses import InterSliceSpectralLoss, SemanticPredictionDisruptionLoss
from custom.perturbation import ROIBoundedPerturbation


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, so frozen passes skip its all-reduce."""
    return getattr(network, "module", network)


class VoxShieldTrainer(Trainer):
    """
    Trains the noise generator G against a surrogate segmenter F, in alternation.

    Each iteration takes one batch (x, y) and runs

    1. ``surrogate_steps`` updates of F on the protected batch x_p = x + delta(G(x)) with G fixed,
       minimising ``segmentation_loss(F(x_p), y)`` (F learns whatever the noise teaches);
    2. ``generator_steps`` updates of G with F frozen, minimising
       L = segmentation_loss(F(x_p), y) + lambda_spd * L_SPD(F(x_p), F(x)) + lambda_isc * L_ISC(delta),
       i.e. noise that makes the task trivially easy for F (error-minimising), moves F's prediction
       away from its clean prediction, and flickers between slices.

    ``engine.state.output`` is a dict of floats, keys ``loss`` (the generator's L), ``surrogate_loss``,
    ``segmentation_loss``, ``spd_loss`` and ``isc_loss``, for StatsHandler / TensorBoardStatsHandler
    (``output_transform=lambda out: out["loss"]`` or ``from_dict``).

    Args:
        device: device the networks live on.
        max_epochs: number of passes over ``train_data_loader``.
        train_data_loader: yields dicts with ``image`` (B, C, H, W, D) in [0, 1] and ``label``
            (B, 1, H, W, D) integer class map.
        generator: G, C input channels -> C output channels (raw noise before the bound).
        surrogate: F, C input channels -> K class logits.
        generator_optimizer: optimiser over G's parameters.
        surrogate_optimizer: optimiser over F's parameters.
        segmentation_loss: e.g. monai.losses.DiceCELoss(to_onehot_y=True, softmax=True).
        perturbation: the ROI mask and bound (eps, dilation).
        lambda_spd: weight of L_SPD. Default 0.05 (paper).
        lambda_isc: weight of L_ISC. Default 0.2 (paper).
        isc_loss: the L_ISC module; default InterSliceSpectralLoss().
        spd_loss: the L_SPD module; default SemanticPredictionDisruptionLoss().
        surrogate_steps: F updates per iteration. Default 1.
        generator_steps: G updates per iteration. Default 1.
        epoch_length: iterations per epoch; default len(train_data_loader).
        non_blocking, prepare_batch, handlers, amp: as in monai.engines.SupervisedTrainer.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        surrogate: nn.Module,
        generator_optimizer: torch.optim.Optimizer,
        surrogate_optimizer: torch.optim.Optimizer,
        segmentation_loss: Callable,
        perturbation: ROIBoundedPerturbation,
        lambda_spd: float = 0.05,
        lambda_isc: float = 0.2,
        isc_loss: nn.Module | None = None,
        spd_loss: nn.Module | None = None,
        surrogate_steps: int = 1,
        generator_steps: int = 1,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        handlers: Sequence | None = None,
        amp: bool = False,
    ) -> None:
        if surrogate_steps < 0 or generator_steps < 1:
            raise ValueError("surrogate_steps must be >= 0 and generator_steps >= 1.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=handlers,
            amp=amp,
        )
        self.generator = generator
        self.surrogate = surrogate
        self.generator_optimizer = generator_optimizer
        self.surrogate_optimizer = surrogate_optimizer
        self.segmentation_loss = segmentation_loss
        self.perturbation = perturbation
        self.lambda_spd = lambda_spd
        self.lambda_isc = lambda_isc
        self.isc_loss = isc_loss if isc_loss is not None else InterSliceSpectralLoss()
        self.spd_loss = spd_loss if spd_loss is not None else SemanticPredictionDisruptionLoss()
        self.surrogate_steps = surrogate_steps
        self.generator_steps = generator_steps

    def _autocast(self):
        return torch.autocast(device_type=torch.device(self.state.device).type, enabled=self.amp)

    def _step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def _iteration(self, engine: VoxShieldTrainer, batchdata: dict) -> dict:
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        roi = self.perturbation.roi_mask(label)
        surrogate_loss = torch.zeros(())

        self.generator.train()
        self.surrogate.train()
        for _ in range(self.surrogate_steps):
            with torch.no_grad(), self._autocast():
                protected, _ = self.perturbation(image, self.generator(image), roi)
            with self._autocast():
                surrogate_loss = self.segmentation_loss(self.surrogate(protected), label)
            self._step(self.surrogate_optimizer, surrogate_loss)

        frozen = _unwrap(self.surrogate)
        frozen.eval()
        frozen.requires_grad_(False)
        try:
            with torch.no_grad(), self._autocast():
                clean_logits = frozen(image)
            for _ in range(self.generator_steps):
                with self._autocast():
                    protected, delta = self.perturbation(image, self.generator(image), roi)
                    protected_logits = frozen(protected)
                    segmentation = self.segmentation_loss(protected_logits, label)
                    spd = self.spd_loss(protected_logits, clean_logits)
                    isc = self.isc_loss(delta)
                    loss = segmentation + self.lambda_spd * spd + self.lambda_isc * isc
                self._step(self.generator_optimizer, loss)
        finally:
            frozen.requires_grad_(True)

        return {
            CommonKeys.LOSS: loss.item(),
            "surrogate_loss": surrogate_loss.item(),
            "segmentation_loss": segmentation.item(),
            "spd_loss": spd.item(),
            "isc_loss": isc.item(),
        }
