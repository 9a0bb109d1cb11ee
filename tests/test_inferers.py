"""Protect's inference (custom.inferers), checked through what protect.json declares for VoxShield: the
sliding window fitted to each volume (the window the generator is run on, and the perturbation it gives),
and the generator's 3D convolutions on oneDNN's CPU kernel whatever the batch."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer
from torch import nn
from torch.profiler import profile

from conftest import EPS
from custom.bundle_utils import config_files
from custom.inferers import OneDNNConv3d, fitted_window, with_onednn_convolutions

THIN_VOLUME = (40, 37, 10)  # 10 slices, as a thick-slice MRI stack


def configured_voxshield(dataset_dir, **overrides):
    """protect.json's VoxShield with its declared inferer and a freshly initialised generator."""
    parser = ConfigParser()
    parser.read_config(config_files("voxshield_flare", "protect"))
    parser["dataset_dir"] = str(dataset_dir)
    for key, value in overrides.items():
        parser[key] = value
    torch.manual_seed(0)
    return parser.get_parsed_content("protectors#voxshield")


def thin_case():
    """A (1, 1, *THIN_VOLUME) image in [0, 1] and its label, foreground in a block inside the volume."""
    image = torch.rand((1, 1, *THIN_VOLUME), generator=torch.Generator().manual_seed(1))
    label = torch.zeros((1, 1, *THIN_VOLUME))
    label[..., 10:30, 8:28, 2:8] = 1
    return image, label


def perturb_recording_windows(protector, image, label):
    """The perturbation of ``image`` and the set of input shapes the generator was called on."""
    shapes = set()
    hook = protector.generator.register_forward_hook(lambda module, inputs, output: shapes.add(tuple(inputs[0].shape)))
    try:
        return protector.perturb(image, label), shapes
    finally:
        hook.remove()


def test_thin_volume_runs_in_a_window_fitted_to_it(flare_data):
    """window_size [96, 96, 64] and the generator's strides [2, 2, 2]: each side is the volume's size
    rounded up to a multiple of 8 (40 -> 40, 37 -> 40, 10 -> 16), not 96, 96 and 64."""
    delta, windows = perturb_recording_windows(configured_voxshield(flare_data), *thin_case())
    assert windows == {(1, 1, 40, 40, 16)}
    assert delta.shape == (1, 1, *THIN_VOLUME)


def test_window_stays_within_window_size_voxels(flare_data):
    """A window_size of as many voxels as the rounded volume's sides allow keeps its sides: 32, 32, then
    10 -> 16 (32 x 32 x 16 voxels, no room to grow)."""
    protector = configured_voxshield(flare_data, window_size=[32, 32, 16])
    _, windows = perturb_recording_windows(protector, *thin_case())
    assert windows == {(1, 1, 32, 32, 16)}


def test_short_side_leaves_voxels_to_the_others(flare_data):
    """window_size [24, 24, 64] holds 36864 voxels; the 10 slices need 16 of its 64, so the in-plane
    sides grow by 8 in turn (32 x 24, 32 x 32, 40 x 32, 40 x 40, times 16 slices, all within 36864)
    until each reaches the volume's rounded side: one 40 x 40 x 16 window instead of four 24 x 24 x 16."""
    protector = configured_voxshield(flare_data, window_size=[24, 24, 64])
    _, windows = perturb_recording_windows(protector, *thin_case())
    assert windows == {(1, 1, 40, 40, 16)}
    assert fitted_window((192, 192, 10), (96, 96, 64), 8) == (192, 192, 16)  # 589824 voxels, as 96 x 96 x 64
    assert fitted_window((512, 512, 10), (96, 96, 64), 8) == (192, 192, 16)  # 200 x 192 x 16 would be over
    assert fitted_window((91, 70, 44), (96, 96, 64), 8) == (96, 72, 48)


def test_fitted_window_perturbs_like_the_padded_window(flare_data):
    """The fitted window and a window_size window padded around the volume give a perturbation of the
    same shape, bound and support. Their values differ: the generator's instance norms take their
    statistics over the whole window, zero padding included, so only those properties are compared."""
    image, label = thin_case()
    protector = configured_voxshield(flare_data)
    fitted, fitted_windows = perturb_recording_windows(protector, image, label)
    protector.inferer = SlidingWindowInferer(roi_size=(96, 96, 64), overlap=0.25, mode="constant")
    padded, padded_windows = perturb_recording_windows(protector, image, label)
    assert fitted_windows == {(1, 1, 40, 40, 16)} and padded_windows == {(1, 1, 96, 96, 64)}
    assert fitted.shape == padded.shape == image.shape
    inside = label.expand_as(image) > 0
    for delta in (fitted, padded):
        assert delta.abs().max() <= EPS + 1e-7
        assert not delta[~inside].any()
        assert (delta[inside] != 0).float().mean() > 0.99


# ---- 3D convolutions on oneDNN's kernel --------------------------------------------------------------
def operators_run(function) -> set[str]:
    """The names of the ATen operators ``function()`` runs."""
    with profile() as recorded:
        function()
    return {event.key for event in recorded.key_averages()}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_batch_of_one_runs_onednn_and_equals_conv3d():
    """32 channels at 12x9x6 voxels, one volume: N x C x H x W = 3456 <= 20480, so PyTorch's own choice is
    its native kernel; the OneDNNConv3d runs oneDNN's and gives nn.Conv3d's values to float rounding."""
    torch.manual_seed(0)
    plain = nn.Conv3d(32, 32, kernel_size=3, padding=1)
    onednn = with_onednn_convolutions(copy.deepcopy(plain))
    assert type(onednn) is OneDNNConv3d
    volume = torch.rand(1, 32, 12, 9, 6)
    with torch.no_grad():
        assert "aten::slow_conv3d_forward" in operators_run(lambda: plain(volume))
        ran = operators_run(lambda: onednn(volume))
        assert "aten::mkldnn_convolution" in ran and "aten::slow_conv3d_forward" not in ran
        expected = F.conv3d(volume.double(), plain.weight.double(), plain.bias.double(), padding=1)
        torch.testing.assert_close(onednn(volume).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["gradients", "float64", "reflect padding", "unbatched", "autocast", "oneDNN off"])
def test_everything_else_keeps_conv3d(case):
    """Where OneDNNConv3d must not change anything, it runs nn.Conv3d's own forward, on a batch of one
    that PyTorch sends to its native kernel: the same operators and values, bit for bit, and with
    gradients on (fitting) the same weight and bias gradients."""
    torch.manual_seed(0)
    plain = nn.Conv3d(32, 32, kernel_size=3, padding=1, padding_mode="reflect" if case == "reflect padding" else "zeros")
    volume = torch.rand(1, 32, 12, 9, 6)
    if case == "float64":
        plain, volume = plain.double(), volume.double()
    if case == "unbatched":
        volume = volume[0]
    onednn = with_onednn_convolutions(copy.deepcopy(plain))
    settings = {"gradients": contextlib.nullcontext(), "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
                "oneDNN off": torch.backends.mkldnn.flags(enabled=False)}.get(case, contextlib.nullcontext())
    with torch.set_grad_enabled(case == "gradients"), settings:
        assert operators_run(lambda: plain(volume)) == operators_run(lambda: onednn(volume))
        expected, ran = plain(volume), onednn(volume)
        assert torch.equal(expected, ran)
        if case == "gradients":
            expected.square().sum().backward()
            ran.square().sum().backward()
            assert torch.equal(plain.weight.grad, onednn.weight.grad) and torch.equal(plain.bias.grad, onednn.bias.grad)


def test_protect_runs_the_generator_on_onednn(flare_data):
    """protect.json's generator: every Conv3d converted, the transposed ones left, the parameters and
    state_dict those of train.json's generator (a checkpoint loads unchanged), its output the plain
    generator's to float rounding."""
    protector = configured_voxshield(flare_data)
    converted = protector.generator
    torch.manual_seed(0)
    parser = ConfigParser()
    parser.read_config(config_files("voxshield_flare", "training"))
    plain = parser.get_parsed_content("generator_def").eval()
    kinds = {type(module) for module in converted.modules()}
    assert OneDNNConv3d in kinds and nn.Conv3d not in kinds and nn.ConvTranspose3d in kinds
    assert sum(isinstance(module, nn.Conv3d) for module in plain.modules()) == sum(
        type(module) is OneDNNConv3d for module in converted.modules())
    plain_state, converted_state = plain.state_dict(), converted.state_dict()
    assert list(plain_state) == list(converted_state)
    assert all(torch.equal(plain_state[key], converted_state[key]) for key in plain_state)
    image = torch.rand((1, 1, 40, 40, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(image), plain(image), atol=1e-4, rtol=0)
