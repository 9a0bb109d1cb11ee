"""VoxShield's fit step through the ProtectorTrainer: which network each step updates, and how the
generator loss is weighted."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from custom.perturbation import ROIBoundedPerturbation
from custom.voxshield import VoxShield
from custom.trainer import ProtectorTrainer


def tiny_unet(in_channels, out_channels):
    return UNet(3, in_channels, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def make_trainer(surrogate_steps, generator_steps=1, surrogate_batches_per_epoch=None, batches=1, epochs=1):
    torch.manual_seed(0)
    image = torch.rand(2, 1, 16, 16, 16)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1
    loader = [{"image": image, "label": label}] * batches
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
        surrogate_batches_per_epoch=surrogate_batches_per_epoch,
    )
    trainer = ProtectorTrainer(device="cpu", max_epochs=epochs, train_data_loader=loader, protector=protector)
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


def test_surrogate_trains_on_the_first_batches_of_each_epoch_only():
    """The authors' schedule: F is updated on the first N batches of every epoch, G on every batch."""
    trainer, generator, surrogate = make_trainer(surrogate_steps=1, surrogate_batches_per_epoch=2, batches=3, epochs=2)
    updates = []  # (epoch, iteration in epoch, surrogate changed, generator changed, surrogate loss)
    before = {}

    @trainer.on(Events.ITERATION_STARTED)
    def snapshot(engine):
        before["surrogate"], before["generator"] = copy.deepcopy(surrogate), copy.deepcopy(generator)

    @trainer.on(Events.ITERATION_COMPLETED)
    def compare(engine):
        in_epoch = (engine.state.iteration - 1) % engine.state.epoch_length + 1
        updates.append((engine.state.epoch, in_epoch, changed(before["surrogate"], surrogate),
                        changed(before["generator"], generator), engine.state.output["surrogate_loss"]))

    trainer.run()
    assert [(epoch, step, surrogate_changed) for epoch, step, surrogate_changed, _, _ in updates] == [
        (1, 1, True), (1, 2, True), (1, 3, False), (2, 1, True), (2, 2, True), (2, 3, False)]
    assert all(generator_changed for _, _, _, generator_changed, _ in updates)
    assert [loss > 0 for *_, loss in updates] == [True, True, False, True, True, False]


def test_step_counts_are_validated():
    with pytest.raises(ValueError, match="generator_steps"):
        make_trainer(surrogate_steps=1, generator_steps=0)
    with pytest.raises(ValueError, match="surrogate_batches_per_epoch must be None or >= 0, got -1"):
        make_trainer(surrogate_steps=1, surrogate_batches_per_epoch=-1)
