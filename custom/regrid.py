"""
``voxshield regrid``: a copy of a labelled dataset in the authors' evaluation form, every volume resized
to one cube grid (160^3 in their code) and its intensities normalised to float32 in [0, 1], so that a
protection is generated and scored on the grid and the scale the paper's numbers come from.

    voxshield regrid --source DATA --output OUT --grid 160 [--normalisation zscore]

The copy is an MSD dataset (imagesTr/<case>.nii.gz, labelsTr/<case>.nii.gz, dataset.json) that
custom.data opens with normalisation ``none`` (its intensities are used as they are, and a bound eps
stays eps on them); its dataset.json keeps the source's ``training`` / ``test`` lists and records
where it comes from under ``voxshield_regrid``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Resize

from custom.data import (
    DEFAULT_CT_WINDOW,
    DEFAULT_MRI_PERCENTILES,
    REGRID_RECORD,
    Case,
    DatasetSpec,
    fit_scaling,
    load_case,
    normalise,
    open_dataset,
)
from custom.nifti_io import VoxShieldInputError, load_nifti
from custom.protect import check_output_location
from custom.provenance import software_versions

# Trilinear image resampling, Gaussian-smoothed first along the axes that shrink (MONAI's anti-aliasing).
# Each label voxel takes the source voxel whose centre is nearest to its own: "nearest-exact" follows the
# half-voxel convention of the trilinear resize and of regridded_affine, where torch's "nearest" is
# shifted by up to half a source voxel.
IMAGE_MODE = "trilinear"
LABEL_MODE = "nearest-exact"


def regridded_affine(affine: np.ndarray, shape: Sequence[int], grid: Sequence[int]) -> np.ndarray:
    """
    The voxel-to-world affine of a volume of ``shape`` resized to ``grid`` over the same physical extent:
    each voxel axis is scaled by shape / grid and the outer corner of the first voxel stays in place.

    Args:
        affine: (4, 4) source affine.
        shape: the source's 3 spatial sizes.
        grid: the 3 new sizes.

    Returns:
        (4, 4) affine; its spacing is the source extent (shape x spacing) / grid.
    """
    scale = np.asarray(shape, dtype=np.float64) / np.asarray(grid, dtype=np.float64)
    result = np.array(affine, dtype=np.float64)
    result[:3, :3] = affine[:3, :3] * scale
    # voxel 0 of the new grid has its centre at source voxel coordinate (scale - 1) / 2
    result[:3, 3] = affine[:3, :3] @ ((scale - 1) / 2) + affine[:3, 3]
    return result


def _case_lists(spec: DatasetSpec, lists: Sequence[str]) -> dict[str, str]:
    """Case id -> the dataset.json list it comes from (``training`` for layouts without lists)."""
    if spec.layout != "msd":
        return {case.case_id: "training" for case in spec.cases}
    meta = json.loads((spec.root / spec.dataset_json).read_text())
    list_of_image = {
        str(Path(entry["image"] if isinstance(entry["image"], str) else entry["image"][0])): name
        for name in lists for entry in meta.get(name, []) if isinstance(entry, dict)
    }
    return {case.case_id: list_of_image[case.images[0]] for case in spec.cases}


def _check_case_ids(spec: DatasetSpec) -> None:
    """Case ids name the written files, so they must be unique."""
    seen = set()
    for case in spec.cases:
        if case.case_id in seen:
            raise VoxShieldInputError(f"{spec.root / case.images[0]}: case id {case.case_id!r} is not unique.")
        seen.add(case.case_id)


def _write_case(spec: DatasetSpec, case: Case, grid: tuple[int, int, int], folder: Path) -> dict:
    """
    Resize one case to ``grid`` and write it into ``folder``; the images are normalised after resizing,
    as in the authors' code.

    Returns:
        its provenance record: source files, shape, spacing, and per channel the normalisation offset
        and scale (source units) of the resized volume.
    """
    loaded = load_case(spec, case)
    label_image = load_nifti(spec.root / case.label)
    resized = Resize(grid, mode=IMAGE_MODE, anti_aliasing=True)(torch.as_tensor(loaded.image, dtype=torch.float32))
    resized = resized.numpy().astype(np.float64)
    label = Resize(grid, mode=LABEL_MODE)(torch.as_tensor(loaded.label[None], dtype=torch.float32))[0].numpy()
    # "none" was checked on the source by load_case; resizing steps past [0, 1] by rounding only, which normalise clips
    scaling = [
        (offset, scale) if kind == "none" else fit_scaling(values, kind, spec)
        for values, kind, offset, scale in zip(resized, spec.normalisation, loaded.offsets, loaded.scales)
    ]
    offsets, scales = (np.array(values, dtype=np.float64) for values in zip(*scaling))
    image = np.moveaxis(normalise(resized, offsets, scales), 0, -1)  # (H, W, D, C) as NIfTI stores channels
    affine = regridded_affine(label_image.affine, loaded.label.shape, grid)
    label_dtype = np.uint8 if loaded.label.max() <= np.iinfo(np.uint8).max else np.int16
    for name, array in ((f"imagesTr/{case.case_id}.nii.gz", image[..., 0] if image.shape[-1] == 1 else image),
                        (f"labelsTr/{case.case_id}.nii.gz", np.rint(label).astype(label_dtype))):
        written = nib.Nifti1Image(array, affine)
        written.header.set_xyzt_units(*label_image.header.get_xyzt_units())
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(written, folder / name)
    return {
        "source_images": case.images,
        "source_label": case.label,
        "source_shape": list(loaded.label.shape),
        "source_spacing_mm": [float(value) for value in label_image.header.get_zooms()[:3]],
        "spacing_mm": [float(value) for value in np.linalg.norm(affine[:3, :3], axis=0)],
        "normalisation_offset": offsets.tolist(),
        "normalisation_scale": scales.tolist(),
    }


def regrid_dataset(
    source: str | os.PathLike,
    output: str | os.PathLike,
    grid: int | Sequence[int] = 160,
    normalisation: str = "zscore",
    layout: str = "auto",
    lists: Sequence[str] = ("training", "test"),
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
    mri_percentiles: tuple[float, float] = DEFAULT_MRI_PERCENTILES,
) -> Path:
    """
    Write the labelled cases of ``source`` as an MSD dataset at ``output`` on a cube (or given) grid.

    Each image (C channels) is resized trilinearly with anti-aliasing to ``grid``, then normalised per
    channel to [0, 1] (``zscore``: mean +- 5 standard deviations of the non-zero voxels, the authors'
    mapping) and written as float32, (H, W, D) or (H, W, D, C); each label is resized nearest-neighbour
    (nearest-exact) and written as integers. The affine keeps the physical extent: spacing = source
    extent / grid. The source is only read; the copy is written into a temporary folder beside
    ``output`` and renamed into place, so a failure leaves no output.

    Args:
        source: the labelled dataset (MSD, nnU-Net v2, BraTS19 or FLARE21 layout).
        output: the new dataset folder; must not exist, nor be inside ``source`` (or hold it).
        grid: one size for a cube, or 3 sizes.
        normalisation: ``zscore`` (default), ``mri``, ``ct``, ``none`` (values already in [0, 1], e.g. a
            regridded copy) or ``auto``, as in custom.data.open_dataset.
        layout: as in custom.data.open_dataset.
        lists: the MSD dataset.json lists to copy (each case keeps its list); other layouts put every
            case in ``training``. Images without a label (nothing can score them) are left out and
            listed in the provenance record.
        ct_window, mri_percentiles: as in custom.data.open_dataset.

    Returns:
        the output folder.

    Raises:
        VoxShieldInputError: naming the file or folder, for bad input, a bad grid or output location.
    """
    try:
        sizes = (int(grid),) * 3 if np.isscalar(grid) else tuple(int(size) for size in grid)
    except (TypeError, ValueError):
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise VoxShieldInputError(f"{source}: grid must be one positive size or 3 of them, got {grid!r}.")
    spec = open_dataset(source, layout, normalisation, ct_window, mri_percentiles, lists)
    target = Path(output).expanduser().resolve()
    check_output_location(spec.root, target)
    if target.exists():
        raise VoxShieldInputError(f"{target}: output folder exists; regrid writes a new folder only.")
    _check_case_ids(spec)
    membership = _case_lists(spec, lists)

    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir(parents=True)
    try:
        cases = {case.case_id: _write_case(spec, case, sizes, temporary) for case in spec.cases}
        entries = {name: [] for name in dict.fromkeys(membership.values())}
        for case_id, name in membership.items():
            entries[name].append({"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"})
        meta = {
            "name": f"{spec.name}-grid{'x'.join(map(str, sizes))}",
            "description": f"{spec.name} resized to {sizes} and normalised to [0, 1] by voxshield regrid",
            "tensorImageSize": "3D" if spec.num_channels == 1 else "4D",
            "modality": {str(index): name for index, name in enumerate(spec.channel_names)},
            "labels": {str(value): name for value, name in sorted(spec.labels.items())},
            **{f"num{name[:1].upper()}{name[1:]}": len(items) for name, items in entries.items()},
            **entries,
            REGRID_RECORD: {
                "source": str(spec.root),
                "source_name": spec.name,
                "source_layout": spec.layout,
                "grid": list(sizes),
                "normalisation": spec.normalisation,
                "normalisation_order": "resized first, then normalised per channel; float32 in [0, 1]",
                "image_interpolation": f"{IMAGE_MODE}, anti-aliased (MONAI Resize)",
                "label_interpolation": f"{LABEL_MODE} (MONAI Resize)",
                "cases": cases,
                "unlabelled_images_left_out": spec.unlabelled_images,
                "software": software_versions(),
            },
        }
        (temporary / "dataset.json").write_text(json.dumps(meta, indent=1))
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target
