"""The label-coded carrier (custom.carriers): the pattern, its coding by the label, its support, and
what z-smoothing leaves of it, each checked against values computed here with numpy."""

import numpy as np
import pytest
import torch

from custom.carriers import LabelCodedCarrier
from custom.countermeasures import GaussianSmoothNearestd
from custom.perturbation import ROIBoundedPerturbation

EPS = 8 / 255
SHAPE = (12, 10, 6)


def boxes():
    """A mid-grey volume (so the [0, 1] clamp never bites) with a box of class 1 and one of class 2."""
    label = torch.zeros((1, 1, *SHAPE))
    label[..., 2:6, 2:8, :] = 1
    label[..., 7:11, 3:7, :] = 2
    return torch.full_like(label, 0.5), label


def carrier(mask_roi=True, roi_dilation=0, **options):
    return LabelCodedCarrier(ROIBoundedPerturbation(eps=EPS, mask_roi=mask_roi, roi_dilation=roi_dilation), **options)


def test_phase_coded_checkerboard_over_the_whole_volume():
    image, label = boxes()
    delta = carrier(mask_roi=False, coding="phase").perturb(image, label)[0, 0].numpy()
    i, j, _ = np.indices(SHAPE)
    checkerboard = (-1.0) ** (i + j)  # in-plane, the same on every slice
    sign = np.where(label[0, 0].numpy() > 0, 1.0, -1.0)  # "diagonal": one carrier for both classes
    np.testing.assert_allclose(delta, EPS * checkerboard * sign, atol=1e-7)


def test_outside_amplitude_scales_the_opposite_phase_outside_the_label_only():
    image, label = boxes()
    delta = carrier(mask_roi=False, outside_amplitude=0.25).perturb(image, label)[0, 0].numpy()
    i, j, _ = np.indices(SHAPE)
    expected = np.where(label[0, 0].numpy() > 0, 1.0, -0.25) * (-1.0) ** (i + j)
    np.testing.assert_allclose(delta, EPS * expected, atol=1e-7)


def test_three_axes_make_the_3d_checkerboard_and_presence_coding_leaves_the_rest_untouched():
    image, label = boxes()
    delta = carrier(mask_roi=False, coding="presence", axes=(0, 1, 2)).perturb(image, label)[0, 0].numpy()
    i, j, k = np.indices(SHAPE)
    expected = np.where(label[0, 0].numpy() > 0, (-1.0) ** (i + j + k), 0.0)
    np.testing.assert_allclose(delta, EPS * expected, atol=1e-7)


def test_a_longer_period_repeats_after_its_period_with_balanced_signs():
    image, label = boxes()
    label[:] = 1
    delta = carrier(period=4, axes=(0,)).perturb(image, label)[0, 0].numpy()
    assert np.array_equal(delta[4:], delta[:-4])  # period 4 along axis 0
    assert (np.diff(delta, axis=1) == 0).all() and (np.diff(delta, axis=2) == 0).all()  # constant along 1, 2
    np.testing.assert_allclose(np.sort(delta[:4, 0, 0]), EPS * np.array([-1, -1, 1, 1]), atol=1e-7)


def test_phase_coding_on_a_band_flips_the_sign_outside_the_label():
    image, label = boxes()
    label[label == 2] = 0
    delta = carrier(roi_dilation=1, coding="phase").perturb(image, label)[0, 0].numpy()
    inside = label[0, 0].numpy() > 0
    band = np.zeros(SHAPE, bool)
    band[1:7, 1:9, :] = True  # the box 2:6, 2:8 dilated by one voxel in-plane (it fills z already)
    i, j, _ = np.indices(SHAPE)
    expected = np.where(inside, 1.0, np.where(band, -1.0, 0.0)) * (-1.0) ** (i + j)
    np.testing.assert_allclose(delta, EPS * expected, atol=1e-7)


def test_random_orientation_gives_each_class_a_secret_in_plane_carrier():
    protector = carrier(period=5, orientation="random", seed=3)
    first, second = protector.carrier(1, (40, 40, 4)).numpy(), protector.carrier(2, (40, 40, 4)).numpy()
    assert set(np.unique(first)) == {-1.0, 1.0} and abs(first.mean()) < 0.1
    assert (first == first[..., :1]).all()  # constant along the slice axis
    assert (first != second).mean() > 0.2, "two classes share a carrier"
    assert (first != carrier(period=5, orientation="random", seed=4).carrier(1, (40, 40, 4)).numpy()).mean() > 0.2
    assert np.array_equal(first, carrier(period=5, orientation="random", seed=3).carrier(1, (40, 40, 4)).numpy())
    # the square wave's strongest in-plane frequency is 1/period cycles per voxel
    spectrum = np.abs(np.fft.fft2(first[..., 0]))
    spectrum[0, 0] = 0
    peak = np.unravel_index(spectrum.argmax(), spectrum.shape)
    frequency = np.hypot(*(np.fft.fftfreq(40)[index] for index in peak))
    assert frequency == pytest.approx(1 / 5, abs=1 / 40)


def test_per_case_orientation_draws_each_case_its_own_direction_and_period():
    """Each case of a batch gets the carrier of its own draw (a function of seed, class and the case's
    voxels): the same case gives the same stripes, another case other stripes, whose strongest in-plane
    frequency is 1 / (period x a factor in [0.7, 1.4])."""
    generator = torch.Generator().manual_seed(0)
    shape = (48, 48, 3)
    image = 0.3 + 0.4 * torch.rand((3, 1, *shape), generator=generator)
    image[2] = image[0]  # the third case is the first again
    label = torch.ones((3, 1, *shape))
    protector = carrier(period=8, orientation="per_case", coding="presence", seed=3)
    delta = protector.perturb(image, label)[:, 0].numpy()
    np.testing.assert_allclose(np.abs(delta), EPS, atol=1e-6)  # saturated on every labelled voxel
    signs = np.sign(delta)
    assert np.array_equal(delta[0], delta[2]) and (signs[0] != signs[1]).mean() > 0.2
    assert (signs[0] == signs[0][..., :1]).all()  # constant along the slice axis, as "random"
    periods = []
    for case in (0, 1):
        spectrum = np.abs(np.fft.fft2(signs[case][..., 0]))
        spectrum[0, 0] = 0
        peak = np.unravel_index(spectrum.argmax(), spectrum.shape)
        periods.append(1 / np.hypot(*(np.fft.fftfreq(48)[index] for index in peak)))
    assert all(8 * 0.7 - 1 <= period <= 8 * 1.4 + 1 for period in periods)
    drawn = [protector.wave(1, protector.random_generator(image[case : case + 1]).initial_seed())[2] for case in (0, 1)]
    assert all(8 * 0.7 <= period <= 8 * 1.4 for period in drawn) and drawn[0] != drawn[1]
    same_seed = carrier(period=8, orientation="per_case", coding="presence", seed=3).perturb(image[:1], label[:1])
    assert np.array_equal(same_seed[0, 0].numpy(), delta[0])


def test_isotropic_texture_is_a_seeded_ring_of_frequencies_without_a_preferred_orientation():
    protector = carrier(period=4, orientation="isotropic", seed=3)
    first = protector.carrier(1, (64, 48, 3)).numpy()
    assert set(np.unique(first)) == {-1.0, 1.0} and abs(first.mean()) < 0.1
    assert (first == first[..., :1]).all()  # constant along the slice axis
    assert np.array_equal(first, carrier(period=4, orientation="isotropic", seed=3).carrier(1, (64, 48, 3)).numpy())
    assert np.array_equal(first, carrier(period=4, orientation="isotropic", seed=3, axes=(1, 0)).carrier(1, (64, 48, 3)).numpy())
    assert (first != protector.carrier(2, (64, 48, 3)).numpy()).mean() > 0.3, "two classes share a texture"
    assert (first != carrier(period=4, orientation="isotropic", seed=4).carrier(1, (64, 48, 3)).numpy()).mean() > 0.3
    power = np.abs(np.fft.fft2(first[..., 0])) ** 2
    power[0, 0] = 0
    fy, fx = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(48), indexing="ij")
    radius = np.hypot(fy, fx)
    # the sign keeps most of the power near 1/period (its harmonics lie at 3/period and beyond)
    assert power[np.abs(radius - 1 / 4) <= 0.25 / 4].sum() > 0.6 * power.sum()
    # every orientation in the plane carries about the same power (a stripe would put it all in one bin)
    ring = np.abs(radius - 1 / 4) <= 0.25 / 4
    angle = np.arctan2(fy, fx)[ring] % np.pi
    per_quadrant, _ = np.histogram(angle, bins=4, range=(0, np.pi), weights=power[ring])
    assert per_quadrant.min() > 0.15 * per_quadrant.sum()


def test_isotropic_texture_over_three_axes_varies_along_every_axis():
    texture = carrier(period=3, orientation="isotropic", axes=(0, 1, 2)).carrier(1, (16, 16, 16)).numpy()
    for axis in range(3):
        assert (np.diff(texture, axis=axis) != 0).mean() > 0.1


def test_constant_carrier_offsets_the_label_and_polarity_flips_it():
    image, label = boxes()
    brighter = carrier(orientation="constant", coding="presence").perturb(image, label)[0, 0].numpy()
    np.testing.assert_allclose(brighter, EPS * (label[0, 0].numpy() > 0), atol=1e-7)
    darker = carrier(orientation="constant", polarity=-1, roi_dilation=1).perturb(image, label)[0, 0].numpy()
    band = np.zeros(SHAPE, bool)
    band[1:7, 1:9, :] = band[6:12, 2:8, :] = True  # both boxes (2:6, 2:8 and 7:11, 3:7) dilated by one voxel
    expected = np.where(label[0, 0].numpy() > 0, -1.0, np.where(band, 1.0, 0.0))
    np.testing.assert_allclose(darker, EPS * expected, atol=1e-7)
    # a square wave's polarity is its half-period shift
    wave = carrier(period=4, axes=(0,)).carrier(1, SHAPE).numpy()
    np.testing.assert_array_equal(carrier(period=4, axes=(0,), polarity=-1).carrier(1, SHAPE).numpy(), -wave)
    np.testing.assert_array_equal(-wave[:-2], wave[2:])


def test_dots_are_discs_on_a_lattice_that_flips_and_transposition_keep():
    dots = carrier(period=8, orientation="dots").carrier(1, (24, 16, 3)).numpy()
    disc = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], float)  # within 2 of (3.5, 3.5)
    np.testing.assert_array_equal(dots[:8, :8, 0], np.pad(disc, 2))
    assert np.array_equal(dots[8:], dots[:-8]) and np.array_equal(dots[:, 8:], dots[:, :-8])  # the lattice
    assert (dots == dots[..., :1]).all()  # rods along the slice axis
    cell = dots[:8, :8, 0]
    assert np.array_equal(cell, cell[::-1]) and np.array_equal(cell, cell[:, ::-1]) and np.array_equal(cell, cell.T)
    image, label = boxes()
    delta = carrier(period=4, orientation="dots").perturb(image, label)[0, 0].numpy()
    i, j, _ = np.indices(SHAPE)
    expected = ((i % 4 - 1.5) ** 2 + (j % 4 - 1.5) ** 2 <= 1) & (label[0, 0].numpy() > 0)
    np.testing.assert_allclose(delta, EPS * expected, atol=1e-7)


def test_the_in_plane_carrier_survives_z_smoothing_where_the_3d_one_does_not():
    label = torch.ones((1, 1, 8, 8, 24))
    image = torch.full_like(label, 0.5)
    smooth = GaussianSmoothNearestd("image", sigma=[0.0, 0.0, 1.0])
    in_plane = carrier().perturb(image, label)[0]
    in_3d = carrier(axes=(0, 1, 2)).perturb(image, label)[0]
    after_in_plane = smooth({"image": (image[0] + in_plane).numpy()})["image"] - image[0].numpy()
    after_3d = smooth({"image": (image[0] + in_3d).numpy()})["image"] - image[0].numpy()
    np.testing.assert_allclose(after_in_plane, in_plane.numpy(), atol=1e-6)
    # away from the first and last slices, the (-1)^k factor is damped by the kernel's response at
    # the Nyquist frequency: sum_m w_m (-1)^m / sum_m w_m, scipy's kernel truncated at 4 sigma
    kernel = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    damping = abs((kernel * (-1.0) ** np.arange(-4, 5)).sum() / kernel.sum())
    np.testing.assert_allclose(np.abs(after_3d[..., 5:19]), EPS * damping, rtol=1e-3)
    assert damping < 0.02


@pytest.mark.parametrize("options, message", [
    ({"period": 1}, "period must be >= 2"),
    ({"axes": (0, 3)}, "axes must be distinct spatial axes"),
    ({"axes": ()}, "axes must be distinct spatial axes"),
    ({"orientation": "spiral"}, "orientation must be one of"),
    ({"coding": "amplitude"}, "coding must be one of"),
    ({"outside_amplitude": 1.5}, "outside_amplitude must be in"),
    ({"polarity": 0.5}, "polarity must be 1 or -1"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        carrier(**options)
