"""
Deterministic synthetic phantom datasets in the FLARE21 and BraTS19 training layouts.

The bundles of VoxShield train on public 3D segmentation datasets; these phantoms let them (and the tests)
run end to end with nothing downloaded. Every case is drawn from its own child seed, so the same arguments
always give byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from custom.data import BRATS_LABELS, BRATS_MODALITIES, FLARE_LABELS
from custom.nifti_io import write_atomic

__all__ = ["BRATS_LABELS", "BRATS_MODALITIES", "FLARE_LABELS", "LAYOUTS", "make_demo_dataset"]

LAYOUTS = ("flare", "brats")
FLARE_SPACING = (0.8, 0.8, 2.5)
BRATS_SPACING = (1.0, 1.0, 1.0)
MANIFEST_NAME = "voxshield_demo.json"
MIN_SIZE = 16
# Bumped whenever the generator changes, so a stale demo is regenerated instead of reused.
FORMAT_VERSION = 1

_GZIP_LEVEL = 6
_AIR_HU = -1000
# Relative change of the squared radius by the smooth field: turns ellipsoids into irregular blobs.
_WOBBLE = 0.2
_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


class _Organ(NamedTuple):
    """Sampling ranges of one phantom organ; coordinates are normalised to [-1, 1] across the volume."""

    label: int
    centre: tuple[tuple[float, float], ...]
    radii: tuple[tuple[float, float], ...]
    hu: tuple[float, float]
    texture: float
    bilateral: bool


# Axes are RAS (+x patient right, +y anterior, +z superior). Painted in this order, so where organs touch
# the later (smaller) one wins and every organ keeps its centre voxel.
_FLARE_ORGANS = (
    # liver: right upper abdomen
    _Organ(
        label=1,
        centre=((0.30, 0.45), (0.00, 0.20), (0.05, 0.25)),
        radii=((0.30, 0.40), (0.35, 0.45), (0.45, 0.60)),
        hu=(55, 65),
        texture=6,
        bilateral=False,
    ),
    # spleen: left upper abdomen
    _Organ(
        label=3,
        centre=((-0.50, -0.40), (-0.15, 0.05), (0.10, 0.30)),
        radii=((0.15, 0.20), (0.20, 0.26), (0.30, 0.40)),
        hu=(45, 55),
        texture=5,
        bilateral=False,
    ),
    # kidneys: posterior, both sides, contrast-enhanced
    _Organ(
        label=2,
        centre=((0.30, 0.40), (-0.40, -0.30), (-0.30, -0.10)),
        radii=((0.14, 0.18), (0.16, 0.20), (0.30, 0.40)),
        hu=(140, 160),
        texture=8,
        bilateral=True,
    ),
    # pancreas: flat, across the midline, lobulated texture
    _Organ(
        label=4,
        centre=((-0.15, 0.05), (0.10, 0.25), (-0.15, 0.05)),
        radii=((0.28, 0.36), (0.12, 0.15), (0.18, 0.24)),
        hu=(35, 45),
        texture=15,
        bilateral=False,
    ),
)

# Per modality: mean brain magnitude, grey/white matter contrast, and intensity of each tumour sub-region
# relative to brain, after the usual appearance (oedema bright on FLAIR/T2, enhancing rim bright on T1ce,
# necrosis dark on T1/T1ce and fluid-bright on T2).
_BRATS_CONTRAST = {
    "flair": (300.0, -0.06, {1: 1.2, 2: 1.8, 4: 1.5}),
    "t1": (500.0, 0.12, {1: 0.5, 2: 0.85, 4: 0.8}),
    "t1ce": (600.0, 0.10, {1: 0.45, 2: 0.9, 4: 2.2}),
    "t2": (700.0, -0.12, {1: 2.2, 2: 1.7, 4: 1.3}),
}


def make_demo_dataset(
    root: str | os.PathLike, layout: str, num_cases: int = 8, shape: Sequence[int] = (48, 48, 32), seed: int = 0
) -> Path:
    """
    Write a deterministic synthetic phantom dataset in the FLARE21 or BraTS19 training layout.

    ``"flare"`` writes ``TrainingImg/train_XXX_0000.nii.gz`` (int16 CT in HU) and ``TrainingMask/train_XXX.nii.gz``
    (uint8 labels of ``FLARE_LABELS``) at (0.8, 0.8, 2.5) mm. ``"brats"`` writes ``{HGG,LGG}/BraTS19_DEMO_XXX/``
    with one float32 volume per modality of ``BRATS_MODALITIES`` and a uint8 ``seg`` of ``BRATS_LABELS`` at 1 mm;
    the first two thirds of the cases go to HGG. Every case holds every label. Files are written atomically and
    ``voxshield_demo.json`` is rewritten last with ``"complete": true``, so a folder that already holds the same
    dataset is returned untouched and a folder holding only an earlier demo (complete or interrupted) is replaced.

    Args:
        root: folder to write into; created if missing.
        layout: one of ``LAYOUTS``: ``"flare"`` or ``"brats"``.
        num_cases: number of cases, at least 1.
        shape: spatial shape of every volume, three integers each at least 16.
        seed: non-negative seed; case ``i`` is drawn from the ``i``-th child of ``numpy.random.default_rng(seed)``,
            so it does not depend on ``num_cases``.

    Returns:
        the dataset folder ``root`` as a ``pathlib.Path``.

    Raises:
        ValueError: when an argument is invalid.
        FileExistsError: when ``root`` is a file, or holds anything other than an earlier demo dataset.
    """
    params = _validate(layout, num_cases, shape, seed)
    root = Path(root)
    if _read_manifest(root) == (params, True) and all((root / p).is_file() for p in _dataset_files(params)):
        return root
    _clear_previous_demo(root)
    root.mkdir(parents=True, exist_ok=True)
    # Claim the folder before any data lands, so an interrupted run is recognised as ours next time.
    _write_manifest(root, params, complete=False)

    spacing = FLARE_SPACING if layout == "flare" else BRATS_SPACING
    affine = np.diag([*spacing, 1.0])
    # Centre the volume on the scanner origin, as a plausible world position.
    affine[:3, 3] = -0.5 * (np.asarray(params["shape"]) - 1) * spacing
    grid = _grid(params["shape"])
    # Children of the seed, as ``default_rng(seed).spawn`` gives (spelt out for numpy < 1.25).
    children = np.random.SeedSequence(params["seed"]).spawn(num_cases)
    for index, rng in enumerate(map(np.random.default_rng, children)):
        volumes = _flare_case(rng, grid) if layout == "flare" else _brats_case(rng, grid)
        for key, relative in _case_files(layout, index, num_cases).items():
            _write_nifti(root / relative, volumes[key], affine)
    _write_manifest(root, params, complete=True)
    return root


def _validate(layout: str, num_cases: int, shape: Sequence[int], seed: int) -> dict:
    """
    Check the arguments of ``make_demo_dataset`` and normalise them to plain JSON types.

    Args:
        layout: requested layout.
        num_cases: requested number of cases.
        shape: requested spatial shape.
        seed: requested seed.

    Returns:
        dict with keys ``layout``, ``num_cases``, ``shape`` (list) and ``seed``, as stored in the manifest.

    Raises:
        ValueError: naming the offending argument and what it must be.
    """

    def is_int(value) -> bool:
        return isinstance(value, Integral) and not isinstance(value, bool)

    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}.")
    if not is_int(num_cases) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer >= 1, got {num_cases!r}.")
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) != 3
        or not all(is_int(s) and s >= MIN_SIZE for s in shape)
    ):
        raise ValueError(f"shape must be 3 integers each >= {MIN_SIZE}, got {shape!r}.")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return {"layout": layout, "num_cases": int(num_cases), "shape": [int(s) for s in shape], "seed": int(seed)}


def _case_files(layout: str, index: int, num_cases: int) -> dict[str, str]:
    """
    Relative paths of the files of one case.

    Args:
        layout: one of ``LAYOUTS``.
        index: case index, from 0.
        num_cases: number of cases in the dataset (decides HGG or LGG for BraTS).

    Returns:
        dict from volume key (``image``/``label`` for FLARE, the modalities and ``seg`` for BraTS) to POSIX path.
    """
    if layout == "flare":
        case = f"train_{index:03d}"
        return {"image": f"TrainingImg/{case}_0000.nii.gz", "label": f"TrainingMask/{case}.nii.gz"}
    grade = "HGG" if index < (2 * num_cases + 1) // 3 else "LGG"
    case = f"BraTS19_DEMO_{index:03d}"
    return {key: f"{grade}/{case}/{case}_{key}.nii.gz" for key in (*BRATS_MODALITIES, "seg")}


def _dataset_files(params: dict) -> list[str]:
    """
    Relative paths of all data files of a dataset.

    Args:
        params: normalised arguments, as returned by ``_validate``.

    Returns:
        list of POSIX paths relative to the dataset root, manifest excluded.
    """
    n = params["num_cases"]
    return [p for i in range(n) for p in _case_files(params["layout"], i, n).values()]


def _read_manifest(root: Path) -> tuple[dict, bool] | None:
    """
    Read the demo manifest of a folder.

    Args:
        root: dataset folder.

    Returns:
        ``(params, complete)`` where ``complete`` is true only for a finished dataset of the current
        ``FORMAT_VERSION``, or None when there is no readable manifest.
    """
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        params = _validate(manifest["layout"], manifest["num_cases"], manifest["shape"], manifest["seed"])
        return params, manifest["complete"] is True and manifest["version"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_manifest(root: Path, params: dict, complete: bool) -> None:
    """
    Atomically write the demo manifest.

    Args:
        root: dataset folder.
        params: normalised arguments, as returned by ``_validate``.
        complete: whether all data files have been written.
    """
    manifest = {**params, "complete": complete, "version": FORMAT_VERSION}
    write_atomic(root / MANIFEST_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def _clear_previous_demo(root: Path) -> None:
    """
    Empty ``root`` if it holds nothing but an earlier demo dataset (complete or interrupted).

    Args:
        root: dataset folder; may be missing.

    Raises:
        FileExistsError: when ``root`` is not a folder or holds anything a demo would not have written.
    """
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder.")
    entries = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    if not entries:
        return
    manifest = _read_manifest(root)
    owned = {MANIFEST_NAME}
    if manifest is not None:
        files = _dataset_files(manifest[0])
        owned.update(files, (str(parent) for f in files for parent in Path(f).parents if str(parent) != "."))
    foreign = {e for e in entries if e not in owned and not _TEMP_NAME.fullmatch(Path(e).name)}
    # Without our manifest nothing is provably ours: a real FLARE folder uses the very same file names.
    if manifest is None or foreign:
        raise FileExistsError(f"{root} is not empty and does not hold a VoxShield demo dataset; not overwriting it.")
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """
    Write a volume as ``.nii.gz`` with byte-identical output for identical input.

    Args:
        path: destination ``.nii.gz`` file.
        array: volume; its dtype is kept on disk, without scaling.
        affine: 4x4 voxel-to-world matrix, stored as both qform and sform.
    """
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code="scanner")
    image.set_sform(affine, code="scanner")
    image.header.set_xyzt_units("mm")
    # gzip.compress with mtime=0: the gzip header would otherwise embed the time of writing.
    write_atomic(path, gzip.compress(image.to_bytes(), compresslevel=_GZIP_LEVEL, mtime=0))


def _grid(shape: Sequence[int]) -> np.ndarray:
    """
    Normalised voxel-centre coordinates, so structures scale with the volume whatever its shape.

    Args:
        shape: spatial shape.

    Returns:
        array of shape ``(3, *shape)`` with values in (-1, 1).
    """
    axes = [(np.arange(n) + 0.5) / n * 2 - 1 for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _snap(centre: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """
    Move a normalised point onto the nearest voxel centre, so a shape centred there contains at least that voxel.

    Args:
        centre: normalised coordinates.
        shape: spatial shape.

    Returns:
        the snapped normalised coordinates.
    """
    n = np.asarray(shape)
    index = np.clip(np.floor((centre + 1) / 2 * n), 0, n - 1)
    return (index + 0.5) / n * 2 - 1


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], scale: float) -> np.ndarray:
    """
    Zero-mean, unit-variance smooth Gaussian random field.

    Args:
        rng: random generator.
        shape: spatial shape.
        scale: correlation length as a fraction of each axis length.

    Returns:
        float64 array of ``shape``.
    """
    field = gaussian_filter(rng.standard_normal(shape), sigma=[scale * n for n in shape], mode="wrap")
    return (field - field.mean()) / field.std()


def _blob(
    grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray, wobble: np.ndarray
) -> np.ndarray:
    """
    Mask of a rotated ellipsoid whose surface is displaced by a smooth field.

    Args:
        grid: normalised coordinates, shape ``(3, X, Y, Z)``.
        centre: centre, normalised coordinates.
        radii: semi-axes, normalised units.
        rotation: 3x3 matrix from the ellipsoid frame to the volume frame.
        wobble: field in (-1, 1) of shape ``(X, Y, Z)``, scaling the squared radius by up to ``_WOBBLE``.

    Returns:
        boolean mask of shape ``(X, Y, Z)``; it always holds a voxel at ``centre``.
    """
    local = np.tensordot(rotation.T, grid - centre[:, None, None, None], axes=1) / radii[:, None, None, None]
    return (local**2).sum(axis=0) <= 1.0 + _WOBBLE * wobble


def _uniform(rng: np.random.Generator, ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """
    Draw one value per ``(low, high)`` range.

    Args:
        rng: random generator.
        ranges: one ``(low, high)`` pair per axis.

    Returns:
        float64 array with one value per range.
    """
    low, high = np.transpose(ranges)
    return rng.uniform(low, high)


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """
    Small random rotation, so shapes are not all aligned with the voxel axes.

    Args:
        rng: random generator.
        max_angle: largest angle about each axis, in radians.

    Returns:
        3x3 rotation matrix.
    """
    return Rotation.from_euler("xyz", rng.uniform(-max_angle, max_angle, 3)).as_matrix()


def _flare_case(rng: np.random.Generator, grid: np.ndarray) -> dict[str, np.ndarray]:
    """
    Draw one abdominal CT phantom: body with fat rim and spine, liver, kidneys, spleen and pancreas.

    Args:
        rng: random generator of this case.
        grid: normalised coordinates from ``_grid``.

    Returns:
        dict with ``image`` (int16 HU) and ``label`` (uint8 ``FLARE_LABELS``).
    """
    shape = grid.shape[1:]
    wobble = np.tanh(_smooth_field(rng, shape, 0.08))
    texture = _smooth_field(rng, shape, 0.05)
    noise = rng.normal(0.0, 8.0, shape)

    # Body: elliptic cylinder through all slices, rotated about z only so it stays upright, with a gentler
    # outline than the organs; a rim of subcutaneous fat and an unlabelled spine give the network distractors.
    outline = 0.3 * wobble
    body_radii = np.array([rng.uniform(0.85, 0.92), rng.uniform(0.68, 0.78), 10.0])
    upright = Rotation.from_euler("z", rng.uniform(-0.1, 0.1)).as_matrix()
    body_centre = rng.uniform(-0.03, 0.03, 3) * [1, 1, 0]
    body = _blob(grid, body_centre, body_radii, upright, outline)
    inner = _blob(grid, body_centre, body_radii * [0.88, 0.85, 1.0], upright, outline)
    spine_centre = body_centre + [0.0, rng.uniform(-0.58, -0.52), 0.0]
    spine = _blob(grid, spine_centre, np.array([0.11, 0.11, 10.0]), upright, outline)

    ct = np.where(inner, 40.0, -100.0) + 5.0 * texture + noise
    ct[spine] = (400.0 + 40.0 * texture + noise)[spine]
    ct[~body] = _AIR_HU

    labels = np.zeros(shape, np.uint8)
    for organ in _FLARE_ORGANS:
        mean_hu = rng.uniform(*organ.hu)
        for side in (1, -1) if organ.bilateral else (1,):
            centre = _snap(_uniform(rng, organ.centre) * [side, 1, 1], shape)
            mask = body & _blob(grid, centre, _uniform(rng, organ.radii), _rotation(rng, 0.3), wobble)
            labels[mask] = organ.label
            ct[mask] = (mean_hu + organ.texture * texture + noise)[mask]
    return {"image": np.clip(np.rint(ct), -1024, 3071).astype(np.int16), "label": labels}


def _brats_case(rng: np.random.Generator, grid: np.ndarray) -> dict[str, np.ndarray]:
    """
    Draw one skull-stripped brain MRI phantom with a nested glioma: oedema around an enhancing rim around necrosis.

    Args:
        rng: random generator of this case.
        grid: normalised coordinates from ``_grid``.

    Returns:
        dict with one float32 volume per modality of ``BRATS_MODALITIES`` and ``seg`` (uint8 ``BRATS_LABELS``).
    """
    shape = grid.shape[1:]
    wobble = np.tanh(_smooth_field(rng, shape, 0.08))
    tissue = np.tanh(2.0 * _smooth_field(rng, shape, 0.04))
    bias = _smooth_field(rng, shape, 0.25)

    brain_radii = _uniform(rng, ((0.80, 0.90), (0.85, 0.93), (0.75, 0.85)))
    brain = _blob(grid, rng.uniform(-0.03, 0.03, 3), brain_radii, _rotation(rng, 0.1), 0.3 * wobble)

    # One centre, rotation and wobble for all three sub-regions keeps them strictly nested.
    centre = _snap(rng.uniform(-0.3, 0.3, 3), shape)
    rotation = _rotation(rng, 0.4)
    oedema_radii = rng.uniform(0.35, 0.48, 3)
    enhancing_radii = oedema_radii * rng.uniform(0.55, 0.70)
    necrosis_radii = enhancing_radii * rng.uniform(0.50, 0.65)
    seg = np.zeros(shape, np.uint8)
    for label, radii in ((2, oedema_radii), (4, enhancing_radii), (1, necrosis_radii)):
        seg[brain & _blob(grid, centre, radii, rotation, wobble)] = label

    volumes = {}
    for modality in BRATS_MODALITIES:
        base, tissue_contrast, region = _BRATS_CONTRAST[modality]
        factor = np.ones(shape)
        for label, value in region.items():
            factor[seg == label] = value
        image = base * rng.uniform(0.9, 1.1) * factor * (1.0 + tissue_contrast * tissue) * (1.0 + 0.05 * bias)
        image += rng.normal(0.0, 0.03 * base, shape)
        # Magnitude images: strictly positive inside the brain, exactly 0 outside as in skull-stripped BraTS.
        volumes[modality] = np.where(brain, np.maximum(image, 1.0), 0.0).astype(np.float32)
    volumes["seg"] = seg
    return volumes
