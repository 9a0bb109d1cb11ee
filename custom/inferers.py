"""Protect's inference: a sliding window fitted to each volume so that thin volumes are not padded to a
thick window, and 3D convolutions that run PyTorch's fast CPU kernel on a batch of one window."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn


def fitted_window(volume_shape: Sequence[int], largest_window: Sequence[int], size_multiple: int) -> tuple[int, ...]:
    """
    The window for a volume: as many voxels as ``largest_window`` at most, and no side longer than the
    volume's rounded up to a multiple of ``size_multiple``.

    Each side starts at ``largest_window``'s or the rounded volume's, whichever is smaller; the
    voxels a short side leaves unused then go to the others, one ``size_multiple`` at a time in
    turn, while the window stays within the voxel count: a 192x192x10 volume runs in one 192x192x16
    window under a 96x96x64 largest window, not nine overlapping 96x96x16 ones.
    """
    rounded = [math.ceil(size / size_multiple) * size_multiple for size in volume_shape]
    window = [min(size, largest) for size, largest in zip(rounded, largest_window)]
    budget = math.prod(largest_window)
    growing = True
    while growing:
        growing = False
        for axis in range(len(window)):
            larger = window[axis] + size_multiple
            if larger <= rounded[axis] and math.prod(window) // window[axis] * larger <= budget:
                window[axis], growing = larger, True
    return tuple(window)


class FittedSlidingWindowInferer(SlidingWindowInferer):
    """
    A SlidingWindowInferer whose window is chosen per volume by ``fitted_window``: no more voxels
    than ``roi_size`` and no larger than the volume rounded up to a size the network accepts, so a
    10-slice volume runs in a 16-slice window (UNet strides [2, 2, 2]) instead of being padded to 64,
    and its other sides grow to use the voxels the short one leaves (fewer, larger windows).

    Args:
        roi_size: the largest window by voxel count, (H, W, D), each a multiple of ``size_multiple``.
        size_multiple: what every window side must be a multiple of, e.g. the product of a UNet's
            strides.
        kwargs: the other SlidingWindowInferer arguments.
    """

    def __init__(self, roi_size: Sequence[int], size_multiple: int, **kwargs) -> None:
        super().__init__(roi_size=roi_size, **kwargs)
        self.largest_window = tuple(roi_size)
        self.size_multiple = int(size_multiple)

    def __call__(self, inputs, network, *args, **kwargs):
        self.roi_size = fitted_window(inputs.shape[2:], self.largest_window, self.size_multiple)
        return super().__call__(inputs, network, *args, **kwargs)


class OneDNNConv3d(nn.Conv3d):
    """
    nn.Conv3d whose inference on a CPU always runs oneDNN's kernel (torch.mkldnn_convolution, the one
    PyTorch itself picks for a batch of two or more). For a batch of one, PyTorch picks its native
    kernel whenever N x C x H x W <= 20480, which it estimates to be faster; for a generator's deeper
    layers on a la_mri volume (32-128 channels at 24x18x12 voxels and below) the native kernel took
    longer, and the whole generator 128 ms instead of 65 ms (benchmarks/speed.py). The result equals
    nn.Conv3d's to float rounding (a generator's output moved by 7.9e-6). Anything else runs nn.Conv3d's
    own forward: gradients on, autocast, an unbatched input, another device or dtype, a padding mode or
    string padding, oneDNN switched off (torch.backends.mkldnn.flags) or not built.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and input.dim() == 5
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)


def with_onednn_convolutions(network: nn.Module) -> nn.Module:
    """``network`` with each module that is exactly an nn.Conv3d (not a subclass) turned into a
    OneDNNConv3d in place (same parameters, state_dict and training behaviour); returns it, for a bundle
    config to declare."""
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDNNConv3d
    return network
