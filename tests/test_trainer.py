"""VoxShield's fit step through the ProtectorTrainer: which network each step updates, and how the
generator loss is weighted."""

import copy

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from custom.perturbation import ROIBoundedPerturbation
from custom.protectors import VoxShield
from custom.trainer import ProtectorTrainer


def tiny_unet(in_channels, out_channels):
    return UNet(3, in_channels, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def make_trainer(surrogate_steps, generator_steps=1):
    torch.manual_seed(0)
    image = torch.rand(2, 1, 16, 16, 16)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1
    loader = [{"image": image, "label": label}]
    generator, surrogate = tiny_unet(1, 1), tiny_unet(1, 2)
    protector = VoxShield(
        perturbation=ROIBoundedPerturbation(),
        generator=generator,
        surrogate=surrogate,
        generator_optimizer=torch.optim.Adam(generator.parameters(), 1e-2),
        surrogate_optimizer=torch.optim.Adam(surrogate.parameters(), 1e-2),
        segmentation_loss=DiceCELoss(to_onehot_y=True, softmax=True),
        surrogate_steps=surrogate_steps,
        generator_steps=generator_steps,
    )
    trainer = ProtectorTrainer(device="cpu", max_epochs=1, train_data_loader=loader, protector=protector)
    return trainer, generator, surrogate


def changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before.parameters(), module.parameters()))


def test_generator_step_updates_only_the_generator():
    trainer, generator, surrogate = make_trainer(surrogate_steps=0)
    generator_before, surrogate_before = copy.deepcopy(generator), copy.deepcopy(surrogate)
    trainer.run()
    assert changed(generator_before, generator)
    assert not changed(surrogate_before, surrogate)
    assert all(parameter.grad is None for parameter in surrogate.parameters())
    assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in generator.parameters())
    assert all(parameter.requires_grad for parameter in surrogate.parameters())  # unfrozen afterwards


def test_surrogate_step_updates_the_surrogate_and_loss_is_weighted_sum():
    trainer, generator, surrogate = make_trainer(surrogate_steps=2)
    surrogate_before = copy.deepcopy(surrogate)
    trainer.run()
    assert changed(surrogate_before, surrogate)
    output = trainer.state.output
    assert set(output) == {"loss", "surrogate_loss", "segmentation_loss", "spd_loss", "isc_loss"}
    expected = output["segmentation_loss"] + 0.05 * output["spd_loss"] + 0.2 * output["isc_loss"]
    assert output["loss"] == pytest.approx(expected, rel=1e-5)
    assert output["spd_loss"] <= 0 and -1 <= output["isc_loss"] <= 0


def test_step_counts_are_validated():
    with pytest.raises(ValueError, match="generator_steps"):
        make_trainer(surrogate_steps=1, generator_steps=0)
