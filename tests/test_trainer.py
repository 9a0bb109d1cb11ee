"""VoxShield's fit step through the ProtectorTrainer: which network each step updates, and how the
generator loss is weighted; the step without augmentation (the paper's) and through the exploiter's."""

import copy
import itertools
import math

import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from custom.perturbation import ROIBoundedPerturbation
from custom.voxshield import VoxShield
from custom.trainer import ProtectorTrainer
from test_augmentation import every_component, only


def tiny_unet(in_channels, out_channels):
    return UNet(3, in_channels, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def make_protector(seed=0, **options):
    """VoxShield with tiny networks initialised from ``seed``; ``options``: its step counts, schedule, augmentation."""
    torch.manual_seed(seed)
    generator, surrogate = tiny_unet(1, 1), tiny_unet(1, 2)
    return VoxShield(
        perturbation=ROIBoundedPerturbation(),
        generator=generator,
        surrogate=surrogate,
        generator_optimizer=torch.optim.Adam(generator.parameters(), 1e-2),
        surrogate_optimizer=torch.optim.Adam(surrogate.parameters(), 1e-2),
        segmentation_loss=DiceCELoss(to_onehot_y=True, softmax=True),
        **options,
    )


def make_trainer(surrogate_steps, generator_steps=1, surrogate_batches_per_epoch=None, batches=1, epochs=1):
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1
    loader = [{"image": image, "label": label}] * batches
    protector = make_protector(surrogate_steps=surrogate_steps, generator_steps=generator_steps,
                               surrogate_batches_per_epoch=surrogate_batches_per_epoch)
    trainer = ProtectorTrainer(device="cpu", max_epochs=epochs, train_data_loader=loader, protector=protector)
    return trainer, protector.generator, protector.surrogate


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


def cube_batch():
    image = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 3:11, 4:12, 5:13] = 1
    return image, label


def test_without_augmentation_the_fit_step_is_the_papers_bit_for_bit():
    """augmentation=None keeps the paper's step: the same losses and weights, to the bit, as the step
    written out here on a copy of the protector."""
    protector = make_protector()
    twin = copy.deepcopy(protector)
    image, label = cube_batch()
    output = protector.fit_step(image, label)

    roi = twin.perturbation.roi_mask(label)
    twin.generator.train()
    twin.surrogate.train()
    with torch.no_grad():
        protected, _ = twin.perturbation(image, twin.generator(image), roi)
    surrogate_loss = twin.segmentation_loss(twin.surrogate(protected), label)
    twin.surrogate_optimizer.zero_grad()
    surrogate_loss.backward()
    twin.surrogate_optimizer.step()
    twin.surrogate.eval().requires_grad_(False)
    with torch.no_grad():
        clean_logits = twin.surrogate(image)
    protected, delta = twin.perturbation(image, twin.generator(image), roi)
    protected_logits = twin.surrogate(protected)
    segmentation = twin.segmentation_loss(protected_logits, label)
    spd = twin.spd_loss(protected_logits, clean_logits)
    isc = twin.isc_loss(delta)
    loss = segmentation + 0.05 * spd + 0.2 * isc
    twin.generator_optimizer.zero_grad()
    loss.backward()
    twin.generator_optimizer.step()

    assert output == {"loss": loss.item(), "surrogate_loss": surrogate_loss.item(),
                      "segmentation_loss": segmentation.item(), "spd_loss": spd.item(), "isc_loss": isc.item()}
    for network in ("generator", "surrogate"):
        for a, b in zip(getattr(protector, network).parameters(), getattr(twin, network).parameters()):
            assert torch.equal(a, b), network


def test_fit_step_through_the_augmentation_trains_the_generator():
    protector = make_protector(augmentation=every_component())
    image, label = cube_batch()
    generator_before = copy.deepcopy(protector.generator)
    for _ in range(2):
        output = protector.fit_step(image, label)
        assert all(math.isfinite(value) for value in output.values()), output
    assert changed(generator_before, protector.generator)
    delta = protector.perturb(image, label)
    assert delta.abs().max() <= protector.perturbation.eps + 1e-7 and delta.abs().max() > 0
    assert not delta[(label == 0).expand_as(delta)].any()


def test_one_draw_moves_clean_image_protected_image_and_label_alike():
    """With per-sample random flips as the exploiter's augmentation, F trains on flipped x_p and y, and
    in G's update the clean image, x_p and y are flipped along the same axes."""
    protector = make_protector(augmentation=only(seed=2, flip_prob=0.5))
    image, label = cube_batch()
    label[:, :, 3:5, 4:6, 5:7] = 0  # an asymmetric label, so every flip changes it
    with torch.no_grad():  # the generator is still as it is here when F and G use it in the step
        expected = protector.perturbation(image, protector.generator(image), protector.support(label))[0]
    surrogate_inputs, labels = [], []
    protector.surrogate.register_forward_hook(
        lambda module, inputs, output: surrogate_inputs.append((module.training, inputs[0].detach().clone())))
    protector.segmentation_loss.register_forward_pre_hook(lambda module, inputs: labels.append(inputs[1]))
    protector.fit_step(image, label)

    (trained, surrogate_input), (clean_mode, clean), (protected_mode, protected) = surrogate_inputs
    assert trained and not clean_mode and not protected_mode
    surrogate_label, generator_label = labels
    flipped_any = False
    for sample in range(image.shape[0]):
        for seen, seen_label, reference in ((surrogate_input, surrogate_label, expected),
                                            (protected, generator_label, expected), (clean, generator_label, image)):
            axes = flip_axes(seen_label[sample], label[sample])
            flipped_any |= bool(axes)
            torch.testing.assert_close(seen[sample], reference[sample].flip(axes))
        assert flip_axes(clean[sample], image[sample]) == flip_axes(generator_label[sample], label[sample])
    assert flipped_any


def flip_axes(seen, original):
    """The axes (of a C, H, W, D sample) along which ``seen`` is ``original`` flipped."""
    for flips in itertools.product((False, True), repeat=3):
        axes = [1 + axis for axis, flipped in enumerate(flips) if flipped]
        if torch.equal(seen, original.flip(axes)):
            return axes
    raise AssertionError("not a flip of the original")


def test_surrogate_restarts_draw_fresh_weights_every_n_steps(monkeypatch):
    """surrogate_restart_every=2: F is re-initialised before fit steps 3 and 5 (restarts 1 and 2); a
    restart puts back initial values that training moved (PReLU slopes to PyTorch's 0.25), clears Adam's
    moments, and depends on (seed, restart) only: two protectors trained apart restart to the same F."""
    protector = make_protector(surrogate_restart_every=2)
    image, label = cube_batch()
    for _ in range(2):
        protector.fit_step(image, label)
    slopes = [module.weight for module in protector.surrogate.modules() if isinstance(module, torch.nn.PReLU)]
    assert any(not torch.allclose(slope, torch.full_like(slope, 0.25)) for slope in slopes)
    assert protector.surrogate_optimizer.state

    other = make_protector(seed=5, surrogate_restart_every=2)
    other.fit_step(torch.rand_like(image), label)
    for restarted in (protector, other):
        restarted.restart_surrogate(1)
        assert not restarted.surrogate_optimizer.state
    assert all(torch.allclose(slope, torch.full_like(slope, 0.25)) for slope in slopes)
    for a, b in zip(protector.surrogate.parameters(), other.surrogate.parameters()):
        assert torch.equal(a, b)
    before = copy.deepcopy(protector.surrogate)
    protector.restart_surrogate(2)
    assert changed(before, protector.surrogate)

    restarts = []
    counted = make_protector(surrogate_restart_every=2)
    monkeypatch.setattr(counted, "restart_surrogate", restarts.append)
    for _ in range(5):
        counted.fit_step(image, label)
    assert restarts == [1, 2]
    with pytest.raises(ValueError, match="surrogate_restart_every must be None or >= 1, got 0"):
        make_protector(surrogate_restart_every=0)
