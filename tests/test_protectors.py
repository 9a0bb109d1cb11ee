"""Every protection method behind the one interface: the bound, the support, determinism, and one
check per method that it does what it claims (values computed here, not by the method)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from scipy import ndimage

from custom.perturbation import ROIBoundedPerturbation
from custom.protectors import (
    METHODS,
    AdversarialPoisoning,
    ErrorMinimizing,
    LabelConvolution,
    LinearSeparableNoise,
    ProvablyUnlearnable,
    RandomNoise,
    StableErrorMinimizing,
    UMed,
    select,
)
from custom.voxshield import VoxShield
from custom.nifti_io import VoxShieldInputError
from custom.trainer import ProtectorTrainer
from custom.verify import dilate

EPS = 4 / 255
PAD = (0, 0, 0, 2)  # volume()'s default shape padded to a multiple of the tiny UNet's stride product
SURROGATE_METHODS = {"em": ErrorMinimizing, "tap": AdversarialPoisoning, "sep": StableErrorMinimizing,
                     "pue": ProvablyUnlearnable, "umed": UMed}


def tiny_unet(in_channels, out_channels, seed=0):
    torch.manual_seed(seed)
    return UNet(3, in_channels, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


def seg_loss():
    return DiceCELoss(to_onehot_y=True, softmax=True)


def volume(seed=0, shape=(20, 18, 12)):
    """Two textured volumes in [0, 1] with a bright box labelled 1 and a smaller box labelled 2;
    sizes not divisible by the UNet's stride product, as real cases are."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.3 + 0.1 * torch.rand((2, 1, *shape), generator=generator)
    label = torch.zeros((2, 1, *shape))
    label[:, :, 5:15, 4:13, 3:9] = 1
    label[:, :, 8:11, 7:10, 4:7] = 2
    image = image + 0.3 * (label > 0)
    return image.clamp(0, 1), label


def make(method, seed=0, **options):
    perturbation = ROIBoundedPerturbation(eps=EPS)
    if method == "voxshield":
        return VoxShield(perturbation, tiny_unet(1, 1, seed=1), SlidingWindowInferer(roi_size=(16, 16, 8)), seed=seed)
    if method in SURROGATE_METHODS:
        surrogate = tiny_unet(1, 3)
        optimizer = torch.optim.Adam(surrogate.parameters(), 1e-2)
        return SURROGATE_METHODS[method](perturbation, surrogate, optimizer, seg_loss(), steps=5, divisible=4,
                                         seed=seed, **options)
    return METHODS[method](perturbation, seed=seed, **options)


@pytest.mark.parametrize("method", list(METHODS))
def test_bound_support_and_determinism(method):
    image, label = volume()
    protector = make(method)
    protected, delta = protector(image, label)
    assert delta.shape == image.shape
    assert delta.abs().max() <= EPS + 1e-7 and delta.abs().max() > EPS / 4
    assert protected.min() >= 0 and protected.max() <= 1
    torch.testing.assert_close(protected, image + delta)
    support = dilate(label.numpy() > 0, 1 if method == "umed" else 0)  # UMed: ROI plus its contour band
    assert not delta.numpy()[~support].any(), "changed voxels outside the method's support"
    again = make(method)(image, label)[1]
    assert torch.equal(delta, again), "same seed, same input, different noise"


@pytest.mark.parametrize("method", ["random", "lsp", "sep"])
def test_seed_changes_random_draws(method):
    image, label = volume()
    assert not torch.equal(make(method, seed=0).perturb(image, label), make(method, seed=1).perturb(image, label))


def test_mask_roi_off_perturbs_outside_the_label():
    image, label = volume()
    protector = RandomNoise(ROIBoundedPerturbation(eps=EPS, mask_roi=False))
    delta = protector.perturb(image, label)
    outside = (label == 0).expand_as(delta)
    assert (delta[outside] != 0).float().mean() > 0.9 and delta.abs().max() <= EPS + 1e-7


def test_random_noise_is_uniform_in_the_ball():
    image, label = volume(shape=(40, 40, 20))
    label[:] = 1
    values = make("random").perturb(torch.full_like(image, 0.5), label).flatten()
    assert abs(values.mean().item()) < 0.02 * EPS
    assert values.std().item() == pytest.approx(EPS / np.sqrt(3), rel=0.02)
    assert values.max().item() > 0.99 * EPS and values.min().item() < -0.99 * EPS


def test_lsp_is_a_tiled_class_code():
    image, label = volume(shape=(40, 36, 20))
    protector = make("lsp", patch_size=4, grid=3)
    delta = protector.perturb(torch.full_like(image, 0.5), label)[0, 0].numpy()
    labels = label[0, 0].numpy()
    codes = {k: protector.class_code(k, 1)[0].numpy() for k in (1, 2)}
    for voxel in np.argwhere(labels > 0)[::7]:
        cell = tuple((voxel // 4) % 3)
        assert delta[tuple(voxel)] == pytest.approx(EPS * codes[int(labels[tuple(voxel)])][cell], abs=1e-7)
    # the class codes are linearly separable: the hypercube vertices they are drawn around differ
    flat = np.stack([codes[1].ravel(), codes[2].ravel()])
    assert np.abs(flat[0] - flat[1]).mean() > 0.5


def test_convolution_filters_each_label_with_its_own_kernel():
    """Unclipped (eps 1), each class's voxels become the image correlated with that class's kernel
    (edges replicated: scipy's "nearest"), computed here by scipy; the rest of the volume is untouched,
    kernels are non-negative, sum to 1 (a flat image does not change) and differ by class and seed."""
    image, label = volume(shape=(16, 14, 10))
    protector = LabelConvolution(ROIBoundedPerturbation(eps=1.0), kernel_size=3, blur=0.5)
    delta = protector.perturb(image, label).double().numpy()
    kernels = {k: protector.class_kernel(k).numpy() for k in (1, 2)}
    for k, kernel in kernels.items():
        assert kernel.min() >= 0 and kernel.sum() == pytest.approx(1.0)
        assert kernel[1, 1, 1] == kernel.max()  # the identity's weight on the centre
        for b in range(2):
            filtered = ndimage.correlate(image[b, 0].double().numpy(), kernel, mode="nearest")
            where = label[b, 0].numpy() == k
            np.testing.assert_allclose(delta[b, 0][where], (filtered - image[b, 0].double().numpy())[where], atol=1e-6)
    assert not delta[(label == 0).numpy()].any()
    assert np.abs(kernels[1] - kernels[2]).max() > 0.01
    assert not np.allclose(LabelConvolution(ROIBoundedPerturbation(eps=1.0), seed=1).class_kernel(1).numpy(),
                           LabelConvolution(ROIBoundedPerturbation(eps=1.0)).class_kernel(1).numpy())
    assert protector.perturb(torch.full_like(image, 0.4), label).abs().max() < 1e-6
    for options, message in (({"kernel_size": 4}, "kernel_size must be a positive odd"), ({"blur": 0}, "blur must be > 0")):
        with pytest.raises(ValueError, match=message):
            LabelConvolution(ROIBoundedPerturbation(eps=1.0), **options)


def loss_on(surrogate, inputs, label):
    with torch.no_grad():
        return seg_loss()(surrogate(F.pad(inputs, PAD)), F.pad(label, PAD)).item()


def test_em_lowers_and_tap_raises_the_surrogate_loss():
    image, label = volume()
    em = make("em", step_size=EPS / 2)
    reference = copy.deepcopy(em.surrogate)
    clean_loss = loss_on(reference, image, label)
    assert loss_on(reference, image + em.perturb(image, label), label) < clean_loss - 1e-3
    tap = make("tap", targeted=False, step_size=EPS / 2)
    assert loss_on(tap.surrogate, image + tap.perturb(image, label), label) > clean_loss + 1e-3


def test_targeted_tap_moves_voxels_toward_the_shifted_class():
    image, label = volume()
    tap = make("tap", step_size=EPS / 2)
    shifted = (label[:, 0].long() + 1) % 3
    padding = PAD

    def target_loss(inputs):
        with torch.no_grad():
            return F.cross_entropy(tap.surrogate(F.pad(inputs, padding)), F.pad(shifted, padding)).item()

    assert target_loss(image + tap.perturb(image, label)) < target_loss(image)


def test_sep_and_pue_lower_their_averaged_losses():
    image, label = volume()
    sep = make("sep", step_size=EPS / 2, draws=3)
    generator = torch.Generator().manual_seed(5)
    padded = (F.pad(image, PAD), F.pad(label, PAD))
    delta = F.pad(sep.perturb(image, label), PAD)
    with torch.no_grad():
        noisy = [(padded[0] + 0.5 * EPS * (torch.rand(padded[0].shape, generator=generator) * 2 - 1), padded[1])
                 for _ in range(8)]
        before = np.mean([seg_loss()(sep.surrogate(x.clamp(0, 1)), y).item() for x, y in noisy])
        after = np.mean([seg_loss()(sep.surrogate((x + delta).clamp(0, 1)), y).item() for x, y in noisy])
    assert after < before

    pue = make("pue", step_size=EPS / 2)
    delta = F.pad(pue.perturb(image, label), PAD)
    losses = {"clean": [], "protected": []}
    torch.manual_seed(3)
    for _ in range(6):  # weights perturbed as PUE says: sigma times each tensor's RMS
        noisy = copy.deepcopy(pue.surrogate)
        with torch.no_grad():
            for parameter in noisy.parameters():
                parameter.add_(0.05 * parameter.pow(2).mean().sqrt() * torch.randn_like(parameter))
            losses["clean"].append(seg_loss()(noisy(padded[0]), padded[1]).item())
            losses["protected"].append(seg_loss()(noisy(padded[0] + delta), padded[1]).item())
    assert np.mean(losses["protected"]) < np.mean(losses["clean"])


def test_umed_budget_follows_contour_and_texture():
    image, label = volume()
    umed = make("umed")
    bound = umed.bound(image, label)[0, 0].numpy()
    roi = label[0, 0].numpy() > 0
    band = dilate(roi, 1) & ~ndimage.binary_erosion(roi, np.ones((3, 3, 3), bool), border_value=1)
    np.testing.assert_allclose(bound[band], EPS)
    interior = roi & ~band
    assert (bound[interior] >= 0.25 * EPS - 1e-9).all() and (bound[interior] <= EPS + 1e-9).all()
    assert bound[interior].std() > 0, "the interior budget should follow the texture"
    assert not bound[~dilate(roi, 1)].any()
    delta = umed.perturb(image, label)[0, 0].numpy()
    assert (np.abs(delta) <= bound + 1e-7).all()


@pytest.mark.parametrize("method", ["em", "sep", "pue", "umed"])
def test_error_minimising_fit_step_trains_the_surrogate_on_noisy_data(method):
    image, label = volume(shape=(16, 16, 16))
    protector = make(method, train_steps=2)
    # The noise this step must train on: the same 2-step PGD against a copy of the surrogate before the step.
    twin = copy.deepcopy(protector)
    twin.surrogate.eval()
    if method == "pue":
        twin.sigma = 0.0  # the first fit step's weight noise: the start of its ramp
    delta = twin.craft(image, label, 2)
    assert delta.abs().max() > 0
    expected = image + delta
    if method == "sep":  # SEP's surrogate also sees uniform noise of random_radius over the whole volume
        expected = twin._noisy(expected, twin.random_generator(image))
    seen = []
    record = protector.surrogate.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].detach().clone()) if module.training else None
    )
    before = copy.deepcopy(protector.surrogate)
    output = protector.fit_step(image, label)
    record.remove()
    assert np.isfinite(output["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), protector.surrogate.parameters()))
    assert seen, "the surrogate never ran in training mode"
    for inputs in seen:  # PUE: one per weight draw
        assert not torch.equal(inputs, image), "the surrogate was trained on the clean volume"
        torch.testing.assert_close(inputs, expected)


def test_tap_fit_step_is_a_plain_clean_training_step():
    image, label = volume(shape=(16, 16, 16))
    tap = make("tap")
    twin = copy.deepcopy(tap.surrogate)
    optimizer = torch.optim.Adam(twin.parameters(), 1e-2)
    loss = seg_loss()(twin(image), label)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert tap.fit_step(image, label)["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for a, b in zip(twin.parameters(), tap.surrogate.parameters()):
        torch.testing.assert_close(a, b)


def test_pue_ramps_weight_noise_during_fitting_only():
    pue = make("pue", weight_sigma=0.1, sigma_ramp_steps=4)
    seen = []
    original = pue._averaged_loss
    pue._averaged_loss = lambda *args: seen.append(pue.sigma) or original(*args)
    image, label = volume(shape=(16, 16, 16))
    for _ in range(3):
        pue.fit_step(image, label)
    assert [round(s, 6) for s in sorted(set(seen))] == [0.0, 0.025, 0.05]
    assert pue.sigma == 0.1  # protect-time noise uses the cap


def test_training_free_methods_fit_nothing():
    image, label = volume(shape=(16, 16, 16))
    for method in ("lsp", "random"):
        protector = make(method)
        assert not protector.trainable and protector.checkpoint_module is None
        with pytest.raises(NotImplementedError, match="training-free"):
            protector.fit_step(image, label)
        trainer = ProtectorTrainer("cpu", 3, [{"image": image, "label": label}], protector)
        trainer.run()
        assert trainer.state.iteration == 0


def test_select_names_the_choices():
    assert select({"em": "x"}, "em") == "x"
    with pytest.raises(VoxShieldInputError, match="unknown method 'emm'; choose one of voxshield, em, tap"):
        select({"em": "x"}, "emm")
