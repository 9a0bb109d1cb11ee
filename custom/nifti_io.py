"""NIfTI reading with clear errors, and writing that keeps the source file's header bytes."""

from __future__ import annotations

import gzip
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

GZIP_LEVEL = 6  # what protect compresses a .nii.gz it writes with

class VoxShieldInputError(ValueError):
    """A problem with the user's data; the message is one line that names the file."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # library messages may span lines


def _check_nifti_name(path: Path) -> None:
    """Refuse a missing file, or one not named as a NIfTI file."""
    if not path.is_file():
        raise VoxShieldInputError(f"{path}: file not found.")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise VoxShieldInputError(f"{path}: not a NIfTI file (.nii or .nii.gz expected).")


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data is read lazily), raising VoxShieldInputError if unusable."""
    _check_nifti_name(path)
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for damaged files
        raise VoxShieldInputError(f"{path}: corrupt NIfTI ({error}).") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VoxShieldInputError(f"{path}: not a single-file NIfTI image.")
    return image


@dataclass
class NiftiFile:
    """
    A NIfTI file read from disk once, holding all that is made of it: its bytes as on disk (for
    byte-identical copies), the decompressed bytes before its voxel data (header, extensions,
    padding: written again in front of new values), the image nibabel reads from them (shape,
    affine, scaling, dtype) and the voxel values as stored (before scl_slope/scl_inter), in the
    file's dtype.
    """

    raw: bytes
    header_bytes: bytes
    image: nib.Nifti1Image | nib.Nifti2Image
    stored: np.ndarray


def read_nifti(path: Path) -> NiftiFile:
    """Read a whole NIfTI file with one read from disk, raising VoxShieldInputError if unusable."""
    _check_nifti_name(path)
    raw = path.read_bytes()
    try:
        data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
        image_class = nib.Nifti1Image if nib.Nifti1Header.may_contain_header(data) else nib.Nifti2Image
        image = image_class.from_bytes(data)
    except Exception as error:  # gzip and nibabel raise many types for damaged files
        raise VoxShieldInputError(f"{path}: corrupt NIfTI ({error}).") from error
    try:
        stored = np.asanyarray(image.dataobj.get_unscaled())
    except Exception as error:  # a truncated data block surfaces only when the data is read
        raise VoxShieldInputError(f"{path}: corrupt NIfTI data ({error}).") from error
    return NiftiFile(raw, data[: int(image.dataobj.offset)], image, stored)


def slope_inter(image: nib.Nifti1Image) -> tuple[float, float]:
    """The scaling nibabel applies to stored values (1, 0 when the header sets none)."""
    return float(image.dataobj.slope), float(image.dataobj.inter)


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


def write_stored_like(source: NiftiFile, stored: np.ndarray, destination: Path) -> None:
    """
    Write ``stored`` (values in the source's on-disk dtype) as a NIfTI whose header bytes are the
    source's own: same dtype, byte order, affine, scaling and extensions. Compression follows the
    file name (.nii.gz or .nii).
    """
    if stored.shape != source.image.shape:
        raise ValueError(f"{destination}: data shape {stored.shape} differs from source {source.image.shape}.")
    payload = source.header_bytes + np.asarray(stored, dtype=source.image.dataobj.dtype).tobytes(order="F")
    if destination.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0)
    write_atomic(destination, payload)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
