"""Fitting any protection method (custom.protectors) as a MONAI ignite Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch

from custom.protector_base import Protector


class ProtectorTrainer(Trainer):
    """
    Fits a Protector: each epoch starts with ``protector.start_epoch()``, then each iteration hands
    one batch of training patches to ``protector.fit_step``, whose dict of losses becomes
    ``engine.state.output`` (for StatsHandler / TensorBoardStatsHandler with
    ``output_transform=lambda output: output``). A training-free protector runs no iteration.
    Mixed precision is the protector's own (its ``amp``).

    Args:
        device: device the protector lives on.
        max_epochs: number of passes over ``train_data_loader``.
        train_data_loader: yields dicts with ``image`` (B, C, H, W, D) in [0, 1] and ``label``
            (B, 1, H, W, D) integer class map.
        protector: the method to fit.
        epoch_length: iterations per epoch; default len(train_data_loader).
        non_blocking, prepare_batch, handlers: as in monai.engines.SupervisedTrainer.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        protector: Protector,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=handlers,
        )
        self.protector = protector
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: protector.start_epoch())

    def run(self) -> None:
        if not self.protector.trainable:
            self.logger.info(f"{self.protector.name} is training-free: nothing to fit.")
            return
        super().run()

    def _iteration(self, engine: ProtectorTrainer, batchdata: dict) -> dict:
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        return self.protector.fit_step(image, label)
