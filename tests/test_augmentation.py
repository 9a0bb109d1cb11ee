"""custom.augmentation.ExploiterAugmentation: the exploiter's augmentation VoxShield can fit through."""

import pytest
import torch
import torch.nn.functional as F

from custom.augmentation import ExploiterAugmentation

COMPONENTS = ("flip_prob", "rotation_prob", "zoom_prob", "noise_prob", "blur_prob", "brightness_prob",
              "contrast_prob", "low_resolution_prob")


def only(seed=0, **probabilities):
    """An augmentation with every component off but ``probabilities``."""
    return ExploiterAugmentation(**{**dict.fromkeys(COMPONENTS, 0.0), **probabilities}, seed=seed)


def every_component(seed=0):
    """An augmentation that applies each of its components to every sample."""
    return ExploiterAugmentation(**dict.fromkeys(COMPONENTS, 1.0), seed=seed)


def asymmetric_volume(batch=2, shape=(10, 12, 8)):
    """Intensities that differ under every flip, and a label that follows them."""
    image = torch.rand((batch, 1, *shape), generator=torch.Generator().manual_seed(5))
    return image, (image > 0.6).long()


def cube(shape=(24, 24, 24)):
    """Two samples, each a cube of ones off the volume's centre, labelled 1."""
    label = torch.zeros((2, 1, *shape), dtype=torch.long)
    label[:, :, 4:14, 6:16, 8:18] = 1
    return label.float(), label


def test_every_probability_zero_is_the_identity():
    image, label = asymmetric_volume()
    for seed in range(3):
        augmented, augmented_label = only(seed)(image, label)
        assert torch.equal(augmented, image) and torch.equal(augmented_label, label)
        assert augmented_label.dtype == label.dtype


def test_flips_alone_are_torch_flips():
    image, label = asymmetric_volume(batch=8)
    augmented, augmented_label = only(flip_prob=1.0)(image, label)
    assert torch.equal(augmented, image.flip(2, 3, 4)) and torch.equal(augmented_label, label.flip(2, 3, 4))

    halves = only(seed=3, flip_prob=0.5)
    draw = halves.draw(image.shape)
    augmented, augmented_label = halves.apply(draw, image, label)
    assert 0 < draw.flips.sum() < draw.flips.numel()  # a mix of flipped and kept axes
    for sample, flips in enumerate(draw.flips.tolist()):
        axes = [1 + axis for axis, flipped in enumerate(flips) if flipped]  # a sample has no batch axis
        assert torch.equal(augmented[sample], image[sample].flip(axes))
        assert torch.equal(augmented_label[sample], label[sample].flip(axes))


def test_image_and_label_move_together():
    """After rotation, zoom and flips, the label is the thresholded image but for voxels on the label's
    one-voxel boundary, where trilinear and nearest interpolation may round apart."""
    image, label = cube()
    moved = 0
    for seed in range(5):
        augmented, augmented_label = only(seed, flip_prob=0.5, rotation_prob=1.0, zoom_prob=1.0)(image, label)
        foreground = augmented_label.float()
        dilated = F.max_pool3d(foreground, 3, stride=1, padding=1)
        eroded = -F.max_pool3d(-foreground, 3, stride=1, padding=1)
        boundary = dilated != eroded
        disagree = (augmented > 0.5) != (augmented_label == 1)
        assert not (disagree & ~boundary).any(), f"seed {seed}: image and label apart inside the label"
        assert disagree.sum() <= 0.1 * boundary.sum()
        moved += not torch.equal(augmented_label, label)
        assert 0.7 ** 3 * 0.5 < augmented_label.sum() / label.sum() < 1.4 ** 3 * 1.5  # the zoom's range, loosely
    assert moved == 5


def test_same_seed_same_output_other_seed_other_output():
    image, label = asymmetric_volume()
    first = every_component(seed=0)(image, label)
    again = every_component(seed=0)(image, label)
    other = every_component(seed=1)(image, label)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_a_seeded_augmentation_leaves_the_global_generator_alone():
    image, label = asymmetric_volume()
    state = torch.get_rng_state()
    every_component()(image, label)
    assert torch.equal(torch.get_rng_state(), state)


def test_gradient_reaches_the_image():
    image, label = asymmetric_volume()
    weights = torch.rand(image.shape, generator=torch.Generator().manual_seed(1))
    image.requires_grad_(True)
    augmented, _ = every_component()(image, label)
    (augmented * weights).sum().backward()
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0

    image.grad = None
    flipped, _ = only(flip_prob=1.0)(image, label)
    (flipped * weights).sum().backward()
    assert torch.equal(image.grad, weights.flip(2, 3, 4))  # d/dx sum(flip(x) * w) = flip(w)


def test_intensity_components():
    image, label = asymmetric_volume()
    brightened, _ = only(brightness_prob=1.0)(image, label)
    ratio = (brightened / image).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))  # one factor per sample
    assert ((ratio >= 0.75 - 1e-6) & (ratio <= 1.25 + 1e-6)).all()

    contrasted, _ = only(contrast_prob=1.0)(image, label)
    low, high = image.flatten(1).min(1).values, image.flatten(1).max(1).values
    assert (contrasted.flatten(1).min(1).values >= low).all() and (contrasted.flatten(1).max(1).values <= high).all()
    assert not torch.equal(contrasted, image)

    noisy, _ = only(noise_prob=1.0)(image, label)
    noise = noisy - image
    assert 0 < noise.std() < 0.1 * 1.1 and noise.mean().abs() < 0.01


def test_blur_spreads_an_impulse_symmetrically_and_keeps_its_mass():
    impulse = torch.zeros(1, 1, 15, 15, 15)
    impulse[0, 0, 7, 7, 7] = 1.0
    blurred, _ = only(blur_prob=1.0)(impulse)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))  # the kernel fits inside: nothing padded away
    torch.testing.assert_close(blurred, blurred.flip(2, 3, 4))
    assert blurred.max() < 1.0 and all((blurred.sum(dim=dims) > 0).sum() > 1 for dims in ((3, 4), (2, 4), (2, 3)))


def test_a_draw_fits_one_shape():
    augmentation = ExploiterAugmentation(seed=0)
    draw = augmentation.draw((2, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"the draw is for shape \(2, 1, 8, 8, 8\)"):
        augmentation.apply(draw, torch.zeros(2, 1, 8, 8, 6))
    with pytest.raises(ValueError, match="probabilities must lie in"):
        ExploiterAugmentation(flip_prob=1.5)
