"""Protect's sliding window, fitted to each volume so that thin volumes are not padded to a thick window."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.inferers import SlidingWindowInferer


def fitted_window(volume_shape: Sequence[int], largest_window: Sequence[int], size_multiple: int) -> tuple[int, ...]:
    """Along each axis, ``largest_window`` or the volume's size rounded up to a multiple of
    ``size_multiple``, whichever is smaller."""
    return tuple(
        min(largest, math.ceil(size / size_multiple) * size_multiple)
        for size, largest in zip(volume_shape, largest_window)
    )


class FittedSlidingWindowInferer(SlidingWindowInferer):
    """
    A SlidingWindowInferer whose window is chosen per volume by ``fitted_window``: no larger than
    ``roi_size`` and no larger than the volume rounded up to a size the network accepts, so a
    10-slice volume runs in a 16-slice window (UNet strides [2, 2, 2]) instead of being padded to 64.

    Args:
        roi_size: the largest window, (H, W, D), each a multiple of ``size_multiple``.
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
