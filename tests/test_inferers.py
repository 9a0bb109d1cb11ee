"""Protect's sliding window is fitted to each volume (custom.inferers), checked through the inferer that
protect.json declares for VoxShield: the window the generator is run on, and the perturbation it gives."""

import torch
from monai.bundle import ConfigParser
from monai.inferers import SlidingWindowInferer

from conftest import EPS
from custom.bundle_utils import config_files
from custom.inferers import fitted_window

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
