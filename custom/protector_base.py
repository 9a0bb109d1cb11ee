"""
The one interface of every protection method (in the spirit of torchattacks): custom.voxshield.
VoxShield and the baselines of custom.protectors subclass it.

A ``Protector`` is fitted batch by batch on training patches (``fit_step``; custom.trainer.
ProtectorTrainer runs it as an ignite engine) and then turns whole volumes into their perturbation
(``perturb``). All methods share the ROI rule and the L-infinity bound of one
custom.perturbation.ROIBoundedPerturbation, so a table compares the noise, not the budget.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from custom.perturbation import ROIBoundedPerturbation


class Protector(nn.Module):
    """
    The interface. Subclasses set ``name`` and implement ``perturb``; methods that learn something
    also implement ``fit_step`` and ``checkpoint_module`` (the module protect loads back).

    Shapes:
        image: (B, C, H, W, D) intensities normalised to [0, 1].
        label: (B, 1, H, W, D) integer class map.
        perturb(...) and forward(...)[1]: (B, C, H, W, D) delta, zero outside ``support(label)``,
        within the bound, and such that image + delta stays in [0, 1].

    Args:
        perturbation: eps and the ROI rule shared by every method.
        seed: makes every random draw a function of (seed, the input volume), so a case gets the
            same noise whatever the order or sharding of a run.
        amp: mixed precision (CUDA) for fitting and crafting.
    """

    name = ""
    checkpoint_name: str | None = None  # the file, in the checkpoint folder, that fitting writes

    def __init__(self, perturbation: ROIBoundedPerturbation, seed: int = 0, amp: bool = False) -> None:
        super().__init__()
        self.perturbation = perturbation
        self.seed = int(seed)
        self.amp = bool(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    @property
    def checkpoint_module(self) -> nn.Module | None:
        """What fitting learns and protect loads; None for a training-free method."""
        return None

    @property
    def trainable(self) -> bool:
        return self.checkpoint_module is not None

    def settings(self) -> dict:
        """The method's scalar hyperparameters, for the training record and the manifest."""
        return {key: value for key, value in vars(self).items()
                if not key.startswith("_") and key != "training" and isinstance(value, (bool, int, float, str))}

    def support(self, label: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) float mask of the voxels the method may change."""
        return self.perturbation.roi_mask(label)

    def start_epoch(self) -> None:
        """Called by the trainer before each pass over the training data; for per-epoch schedules."""

    def fit_step(self, image: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch of training patches; returns named losses."""
        raise NotImplementedError(f"{self.name} is training-free: there is nothing to fit.")

    def perturb(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.perturb(image, label)
        return image + delta, delta

    def random_generator(self, image: torch.Tensor) -> torch.Generator:
        """A CPU generator seeded by ``seed`` and the volume's bytes."""
        return torch.Generator().manual_seed(zlib.crc32(image.detach().float().cpu().numpy().tobytes(), self.seed))

    def class_generator(self, class_index: int, seed: int | None = None) -> torch.Generator:
        """A CPU generator for the secret draws of class ``class_index`` (a code, kernel or carrier that
        is the same for every volume): a function of (``seed``, by default the protector's, class) only."""
        return torch.Generator().manual_seed((self.seed if seed is None else seed) * 100_003 + int(class_index))

    def autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, enabled=self.amp)

    def optimiser_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
