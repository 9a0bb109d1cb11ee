"""L_ISC, L_SPD and the ROI-bounded perturbation against values computed independently with numpy."""

import numpy as np
import pytest
import torch

from custom.losses import InterSliceSpectralLoss, SemanticPredictionDisruptionLoss
from custom.perturbation import ROIBoundedPerturbation


def numpy_isc(delta: np.ndarray, axis: int, relative: bool) -> float:
    """Loop-by-loop reference: every (batch, channel, adjacent slice pair)."""
    pairs = []
    for b in range(delta.shape[0]):
        for c in range(delta.shape[1]):
            volume = np.moveaxis(delta[b, c], axis, 0)
            for z in range(volume.shape[0] - 1):
                norm = "ortho" if relative else "backward"
                a0 = np.abs(np.fft.fft2(volume[z], norm=norm))
                a1 = np.abs(np.fft.fft2(volume[z + 1], norm=norm))
                distance = np.sqrt(((a1 - a0) ** 2).sum())
                if not relative:
                    pairs.append(distance)
                    continue
                energy = np.sqrt((a0**2).sum()) + np.sqrt((a1**2).sum())
                if energy > 0:
                    pairs.append(distance / energy)
    return -float(np.mean(pairs))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("normalisation", ["relative", "none"])
def test_isc_matches_numpy(axis, normalisation):
    rng = np.random.default_rng(axis)
    delta = rng.uniform(-1, 1, size=(2, 3, 6, 5, 4))
    delta[0, 1, :, :, 2:] = 0  # some empty slices, as outside an ROI
    expected = numpy_isc(delta, axis, normalisation == "relative")
    loss = InterSliceSpectralLoss(slice_axis=axis, normalisation=normalisation)
    got = loss(torch.as_tensor(delta)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_isc_hand_example():
    # Slice 0 is a constant 1 (all energy at DC), slice 1 is a checkerboard (all energy at Nyquist).
    # With the orthonormal FFT each spectrum has a single 2.0 entry, in different bins:
    # distance sqrt(2^2 + 2^2) = 2*sqrt(2), energies 2 + 2, relative distance sqrt(2)/2.
    constant = np.ones((4, 4))
    checker = np.indices((4, 4)).sum(0) % 2 * 2.0 - 1.0
    delta = torch.as_tensor(np.stack([constant, checker], axis=-1)[None, None])
    assert InterSliceSpectralLoss(normalisation="relative")(delta).item() == pytest.approx(-np.sqrt(2) / 2)
    # Unnormalised FFT: each spectrum has a single 16.0 entry -> distance 16*sqrt(2).
    assert InterSliceSpectralLoss(normalisation="none")(delta).item() == pytest.approx(-16 * np.sqrt(2))


def test_isc_relative_ignores_scale_and_identical_slices_score_zero():
    rng = np.random.default_rng(1)
    delta = torch.as_tensor(rng.normal(size=(1, 1, 8, 8, 5)))
    loss = InterSliceSpectralLoss()
    assert loss(delta).item() == pytest.approx(loss(delta * 1e-3).item(), rel=1e-6)
    same = delta[..., :1].repeat(1, 1, 1, 1, 5)
    assert loss(same).item() == pytest.approx(0.0, abs=1e-7)


def test_isc_all_zero_has_finite_gradient():
    delta = torch.zeros(1, 1, 4, 4, 3, requires_grad=True)
    value = InterSliceSpectralLoss()(delta)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(delta.grad).all()


def test_isc_rejects_bad_input():
    with pytest.raises(ValueError, match="slice_axis"):
        InterSliceSpectralLoss(slice_axis=3)
    with pytest.raises(ValueError, match="normalisation"):
        InterSliceSpectralLoss(normalisation="unit")
    with pytest.raises(ValueError, match="at least two slices"):
        InterSliceSpectralLoss()(torch.zeros(1, 1, 4, 4, 1))


def test_spd_matches_numpy_and_pushes_away():
    rng = np.random.default_rng(2)
    protected, clean = rng.normal(size=(2, 3, 4, 4, 4)), rng.normal(size=(2, 3, 4, 4, 4))
    expected = -np.abs(protected - clean).mean()
    loss = SemanticPredictionDisruptionLoss()
    assert loss(torch.as_tensor(protected), torch.as_tensor(clean)).item() == pytest.approx(expected)
    # Its gradient moves the protected logits away from the clean ones, and never into the clean ones.
    logits = torch.tensor(protected, requires_grad=True)
    clean_tensor = torch.tensor(clean, requires_grad=True)
    loss(logits, clean_tensor).backward()
    assert torch.equal(torch.sign(-logits.grad), torch.sign(logits.detach() - clean_tensor.detach()))
    assert clean_tensor.grad is None
    with pytest.raises(ValueError, match="logit shapes differ"):
        loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))


def test_perturbation_bound_support_and_clamp():
    rng = np.random.default_rng(3)
    eps = 4 / 255
    image = torch.as_tensor(rng.uniform(0, 1, size=(2, 2, 6, 6, 6)), dtype=torch.float32)
    image[0, 0, 0, 0, 0] = 0.0
    image[0, 0, 0, 0, 1] = 1.0
    label = torch.zeros(2, 1, 6, 6, 6)
    label[:, :, 2:4, 2:4, 2:4] = 2
    label[:, :, 0, 0, :2] = 1
    noise = torch.as_tensor(rng.normal(scale=10, size=(2, 2, 6, 6, 6)), dtype=torch.float32)
    noise[0, 0, 0, 0, 0], noise[0, 0, 0, 0, 1] = -100.0, 100.0
    for squash in ("tanh", "none"):
        perturbation = ROIBoundedPerturbation(eps=eps, squash=squash)
        roi = perturbation.roi_mask(label)
        protected, delta = perturbation(image, noise, roi)
        inside = roi.expand_as(image).bool()
        assert delta.abs().max() <= eps + 1e-7
        assert torch.equal(protected[~inside], image[~inside])
        assert torch.count_nonzero(delta[~inside]) == 0
        assert protected.min() >= 0 and protected.max() <= 1
        assert protected[0, 0, 0, 0, 0] == 0.0 and protected[0, 0, 0, 0, 1] == 1.0
    expected = np.clip(eps * np.tanh(noise.numpy()) * roi.numpy(), -eps, eps)
    _, delta = ROIBoundedPerturbation(eps=eps)(image, noise, roi)
    free = (image + torch.as_tensor(expected) > 0) & (image + torch.as_tensor(expected) < 1)
    np.testing.assert_allclose(delta[free].numpy(), expected[free.numpy()], atol=1e-6)


def test_roi_dilation_grows_mask_by_a_cube():
    label = torch.zeros(1, 1, 7, 7, 7)
    label[0, 0, 3, 3, 3] = 1
    mask = ROIBoundedPerturbation(roi_dilation=1).roi_mask(label)
    expected = torch.zeros_like(mask)
    expected[0, 0, 2:5, 2:5, 2:5] = 1
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="roi_dilation"):
        ROIBoundedPerturbation(roi_dilation=-1)
    with pytest.raises(ValueError, match="eps"):
        ROIBoundedPerturbation(eps=0)
