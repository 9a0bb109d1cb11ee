"""Independent checks of a protected copy against its source, using only numpy, nibabel and hashlib
(none of VoxShield's own code), so a bug in protect cannot hide itself."""

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

CT_WINDOW_WIDTH = 250.0 - (-175.0)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_bytes(path: Path) -> bytes:
    image = nib.load(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        return stream.read(int(image.dataobj.offset))


def independent_scales(values: np.ndarray, ct: bool) -> np.ndarray:
    """Per-channel normalisation scale from the documented rule: CT window width, or the MRI
    0.5-99.5 percentile range of the non-zero voxels."""
    if ct:
        return np.full(values.shape[-1], CT_WINDOW_WIDTH)
    scales = []
    for channel in np.moveaxis(values, -1, 0):
        foreground = channel[channel != 0]
        low, high = np.percentile(foreground, [0.5, 99.5])
        scales.append(high - low)
    return np.array(scales)


def assert_protected_copy(source: Path, output: Path, eps: float, ct: bool, support_dilation: int = 0) -> dict:
    """Check every guarantee protect makes; returns the manifest. ``support_dilation``: the method may
    also change voxels within this many voxels (a cube) of the label (UMed's contour band)."""
    manifest = json.loads((output / "voxshield_manifest.json").read_text())
    source_files = {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}
    output_files = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    assert output_files == source_files | {"voxshield_manifest.json"}, "layout not mirrored"
    assert not list(output.rglob("*.tmp")) and not (output / ".voxshield_progress").exists()

    for name, digest in manifest["copied_files"].items():
        assert (output / name).read_bytes() == (source / name).read_bytes()
        assert file_sha256(output / name) == digest
    for record in manifest["cases"]:
        for name, digest in record["files"].items():
            assert file_sha256(output / name) == digest, name
        assert (output / record["label"]).read_bytes() == (source / record["label"]).read_bytes()
        label = np.asanyarray(nib.load(source / record["label"]).dataobj)
        roi = label > 0
        if support_dilation:
            roi = ndimage.binary_dilation(roi, np.ones((3, 3, 3), bool), iterations=support_dilation)
        values = []
        for name in record["images"]:
            original, protected = nib.load(source / name), nib.load(output / name)
            assert header_bytes(output / name) == header_bytes(source / name), name
            assert protected.get_data_dtype() == original.get_data_dtype()
            assert protected.shape == original.shape and np.array_equal(protected.affine, original.affine)
            stored_in = np.asanyarray(original.dataobj.get_unscaled())
            stored_out = np.asanyarray(protected.dataobj.get_unscaled())
            assert stored_out.dtype == stored_in.dtype
            outside = ~roi if stored_in.ndim == 3 else ~roi[..., None].repeat(stored_in.shape[3], -1)
            assert np.array_equal(stored_out[outside], stored_in[outside]), f"{name}: outside-ROI voxels changed"
            before = original.get_fdata(dtype=np.float64).reshape(label.shape + (-1,))
            after = protected.get_fdata(dtype=np.float64).reshape(label.shape + (-1,))
            values.append((before, after))
        before = np.concatenate([pair[0] for pair in values], axis=-1)
        after = np.concatenate([pair[1] for pair in values], axis=-1)
        bound = eps * independent_scales(before, ct)
        change = np.abs(after - before)
        assert (change <= bound).all(), f"{record['case_id']}: bound exceeded by {(change - bound).max()}"
        if record["protected"]:
            assert change[roi].max() > 0, f"{record['case_id']}: nothing was perturbed"
            np.testing.assert_allclose(record["bound_source_units"], bound, rtol=1e-9)
            np.testing.assert_allclose(record["max_abs_delta_source_units"], change.reshape(-1, change.shape[-1]).max(0))
            assert record["fraction_voxels_changed"] == (change > 0).mean()
            assert record["max_abs_delta_normalised"] <= eps + 1e-12
    return manifest
