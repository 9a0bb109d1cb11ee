"""NIfTI reading with clear errors, and writing that keeps the source file's header bytes."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np


class VoxShieldInputError(ValueError):
    """A problem with the user's data; the message is one line that names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # library messages may span lines


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data is read lazily), raising VoxShieldInputError if unusable."""
    if not path.is_file():
        raise VoxShieldInputError(f"{path}: file not found.")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise VoxShieldInputError(f"{path}: not a NIfTI file (.nii or .nii.gz expected).")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for damaged files
        raise VoxShieldInputError(f"{path}: corrupt NIfTI ({error}).") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VoxShieldInputError(f"{path}: not a single-file NIfTI image.")
    return image


def read_stored(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel values as stored on disk (before scl_slope/scl_inter), in the file's dtype."""
    try:
        return np.asanyarray(image.dataobj.get_unscaled())
    except Exception as error:  # truncated gzip streams surface only when the data is read
        raise VoxShieldInputError(f"{path}: corrupt NIfTI data ({error}).") from error


def slope_inter(image: nib.Nifti1Image) -> tuple[float, float]:
    """The scaling nibabel applies to stored values (1, 0 when the header sets none)."""
    return float(image.dataobj.slope), float(image.dataobj.inter)


def _header_prefix(source: Path, vox_offset: int) -> bytes:
    """The source file's bytes before the voxel data: header, extensions and padding, verbatim."""
    opener = gzip.open if source.name.endswith(".gz") else open
    with opener(source, "rb") as stream:
        return stream.read(vox_offset)


def _temporary_for(path: Path) -> Path:
    """A fresh hidden name beside ``path``; open(..., "xb") on it keeps the usual umask permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file in the same folder, so no reader sees half a file."""
    temporary = _temporary_for(path)
    try:
        with open(temporary, "xb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def copy_atomic(source: Path, destination: Path) -> None:
    """Byte-identical copy of a file, through a temporary file."""
    temporary = _temporary_for(destination)
    try:
        with open(source, "rb") as reader, open(temporary, "xb") as writer:
            shutil.copyfileobj(reader, writer)
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_stored_like(source: Path, image: nib.Nifti1Image, stored: np.ndarray, destination: Path) -> None:
    """
    Write ``stored`` (values in the source's on-disk dtype) as a NIfTI whose header bytes are the
    source's own: same dtype, byte order, affine, scaling and extensions. Compression follows the
    file name (.nii.gz or .nii).
    """
    vox_offset = int(image.dataobj.offset)
    dtype = image.dataobj.dtype
    if stored.shape != image.shape:
        raise ValueError(f"{destination}: data shape {stored.shape} differs from source {image.shape}.")
    payload = _header_prefix(source, vox_offset) + np.asarray(stored, dtype=dtype).tobytes(order="F")
    if destination.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    write_atomic(destination, payload)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
