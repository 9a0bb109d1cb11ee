"""A protected copy checked by custom.verify, the project's one independent checker, with the bound
asserted again here in plain numpy from the documented normalisation constants, so that a bug in
verify cannot hide a broken bound either."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.verify import dilate, verify_copy

# The documented normalisations: the soft-tissue CT window (-175, 250) HU; the MRI 0.5-99.5
# percentile range of the non-zero voxels.
CT_WINDOW_WIDTH = 250.0 - (-175.0)
MRI_PERCENTILES = (0.5, 99.5)


def independent_scales(values: np.ndarray, ct: bool) -> np.ndarray:
    """Per-channel normalisation scale of (H, W, D, C) source values: the CT window width, or the MRI
    percentile range of each channel's non-zero voxels."""
    if ct:
        return np.full(values.shape[-1], CT_WINDOW_WIDTH)
    scales = []
    for channel in np.moveaxis(values, -1, 0):
        low, high = np.percentile(channel[channel != 0], MRI_PERCENTILES)
        scales.append(high - low)
    return np.array(scales)


def case_values(root: Path, record: dict, shape: tuple) -> np.ndarray:
    """A case's channels in source units (slope and intercept applied), shape (H, W, D, C)."""
    channels = [nib.load(root / name).get_fdata(dtype=np.float64).reshape(shape + (-1,)) for name in record["images"]]
    return np.concatenate(channels, axis=-1)


def assert_protected_copy(source: Path, output: Path, eps: float, ct: bool, support_dilation: int = 0) -> dict:
    """Check every guarantee protect makes; returns the manifest.

    custom.verify checks the files (mirrored layout, sha256s, byte-identical labels and non-case files,
    header bytes, dtype, shape, affine, the support and the recorded bound). Here, per case: no temporary
    or progress files remain; |x_p - x| <= eps on normalised intensities, zero outside the support (the
    label dilated by ``support_dilation`` voxels, a cube: UMed's contour band); a protected case is
    perturbed somewhere and its manifest figures are the measured ones.
    """
    failures, _ = verify_copy(source, output)
    assert not failures, "\n".join(failures)
    assert not list(output.rglob("*.tmp")) and not (output / ".voxshield_progress").exists()
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    for record in manifest["cases"]:
        label = np.asanyarray(nib.load(source / record["label"]).dataobj)
        support = dilate(label > 0, support_dilation)
        before = case_values(source, record, label.shape)
        change = np.abs(case_values(output, record, label.shape) - before)
        # |x_p - x| <= eps in normalised units is |protected - source| <= eps x scale in source units
        bound = eps * independent_scales(before, ct)
        assert (change <= bound).all(), f"{record['case_id']}: bound exceeded by {(change - bound).max()}"
        assert not change[~support].any(), f"{record['case_id']}: voxels outside the support changed"
        if record["protected"]:
            assert change[support].max() > 0, f"{record['case_id']}: nothing was perturbed"
            np.testing.assert_allclose(record["bound_source_units"], bound, rtol=1e-9)
            np.testing.assert_allclose(record["max_abs_delta_source_units"], change.reshape(-1, change.shape[-1]).max(0))
            assert record["fraction_voxels_changed"] == (change > 0).mean()
            assert record["max_abs_delta_normalised"] <= eps + 1e-12
    return manifest
