"""Finding the cases of a dataset (MSD, nnU-Net v2 raw, BraTS19, FLARE21), checking them, and
loading them as normalised arrays on their native voxel grid."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monai.transforms import MapLabelValue, MapTransform

from custom.nifti_io import NiftiFile, VoxShieldInputError, load_nifti, read_nifti, slope_inter

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
BRATS_LABELS = {0: "background", 1: "necrotic and non-enhancing core", 2: "oedema", 4: "enhancing tumour"}
FLARE_LABELS = {0: "background", 1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
LAYOUTS = ("auto", "msd", "nnunetv2", "brats", "flare")
# Soft-tissue abdominal window, as in MONAI's BTCV/Swin UNETR recipes.
DEFAULT_CT_WINDOW = (-175.0, 250.0)
# Robust MRI range: percentiles of the non-zero voxels.
DEFAULT_MRI_PERCENTILES = (0.5, 99.5)
AFFINE_TOLERANCE_MM = 1e-3
NORMALISATIONS = ("auto", "ct", "mri", "zscore", "none")
# The authors' code z-scores, clips to +-5 standard deviations and maps that range to [0, 1].
ZSCORE_CLIP = 5.0
# dataset.json key of a copy written by custom.regrid: its intensities are already in [0, 1].
REGRID_RECORD = "voxshield_regrid"


@dataclass
class Case:
    """One labelled case: image files (one per channel, or one 4D file) and the label file, all
    given relative to the dataset root."""

    case_id: str
    images: list[str]
    label: str


@dataclass
class DatasetSpec:
    """What a dataset holds and how its intensities are normalised.

    Args:
        root: dataset folder.
        layout: one of ``msd``, ``nnunetv2``, ``brats``, ``flare``.
        cases: labelled cases.
        channel_names: one modality name per input channel.
        labels: label value -> name, background included.
        normalisation: ``"ct"``, ``"mri"``, ``"zscore"`` or ``"none"`` per channel.
        dataset_json: relative path of the dataset.json, if the layout has one.
        ct_window, mri_percentiles: see open_dataset.
        unlabelled_images: images without a label (copied, never protected).
        name: the dataset.json "name", else the folder name.
    """

    root: Path
    layout: str
    cases: list[Case]
    channel_names: list[str]
    labels: dict[int, str]
    normalisation: list[str]
    dataset_json: str | None = None
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    mri_percentiles: tuple[float, float] = DEFAULT_MRI_PERCENTILES
    unlabelled_images: list[str] = field(default_factory=list)
    name: str = ""

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def datalist(self) -> list[dict]:
        """MONAI-style list of dicts with absolute ``image`` (list of paths) and ``label`` paths."""
        return [
            {
                "case_id": case.case_id,
                "image": [str(self.root / name) for name in case.images],
                "label": str(self.root / case.label),
            }
            for case in self.cases
        ]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VoxShieldInputError(f"{path}: unreadable dataset.json ({error}).") from error


def _normalisation_for(channel_name: str) -> str:
    return "ct" if re.search(r"\bct\b", channel_name, re.IGNORECASE) else "mri"


def _case_id(file_name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", file_name)


def _msd(root: Path, meta: dict, lists: Sequence[str]) -> tuple[list[Case], list[str], dict[int, str], list[str]]:
    channels = [meta["modality"][key] for key in sorted(meta.get("modality", {"0": "MRI"}), key=int)]
    labels = {int(value): name for value, name in meta["labels"].items()}
    cases, unlabelled = [], []
    for list_name in lists:
        for entry in meta.get(list_name, []):
            if isinstance(entry, dict) and entry.get("label"):
                image = entry["image"]
                images = [image] if isinstance(image, str) else list(image)
                images = [str(Path(name)) for name in images]
                cases.append(Case(_case_id(Path(images[0]).name), images, str(Path(entry["label"]))))
            else:
                unlabelled.append(str(Path(entry if isinstance(entry, str) else entry["image"])))
    return cases, channels, labels, unlabelled


def _nnunetv2(root: Path, meta: dict) -> tuple[list[Case], list[str], dict[int, str], list[str]]:
    ending = meta["file_ending"]
    channels = [meta["channel_names"][key] for key in sorted(meta["channel_names"], key=int)]
    labels = {}
    for name, value in meta["labels"].items():
        if not isinstance(value, int):
            raise VoxShieldInputError(f"{root / 'dataset.json'}: region-based label '{name}' is not supported.")
        labels[value] = name
    cases = []
    for label_file in sorted((root / "labelsTr").glob(f"*{ending}")):
        case_id = label_file.name[: -len(ending)]
        images = [f"imagesTr/{case_id}_{channel:04d}{ending}" for channel in range(len(channels))]
        cases.append(Case(case_id, images, f"labelsTr/{label_file.name}"))
    unlabelled = [f"imagesTs/{path.name}" for path in sorted((root / "imagesTs").glob(f"*{ending}"))]
    return cases, channels, labels, unlabelled


def _brats(root: Path) -> list[Case]:
    cases = []
    for grade in ("HGG", "LGG"):
        for folder in sorted(path for path in (root / grade).glob("*") if path.is_dir()):
            images = [f"{grade}/{folder.name}/{folder.name}_{modality}.nii.gz" for modality in BRATS_MODALITIES]
            cases.append(Case(folder.name, images, f"{grade}/{folder.name}/{folder.name}_seg.nii.gz"))
    return cases


def _flare(root: Path) -> list[Case]:
    cases = []
    for label_file in sorted((root / "TrainingMask").glob("*.nii.gz")):
        case_id = _case_id(label_file.name)
        cases.append(Case(case_id, [f"TrainingImg/{case_id}_0000.nii.gz"], f"TrainingMask/{label_file.name}"))
    return cases


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from its files."""
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        return "nnunetv2" if "channel_names" in _read_json(dataset_json) else "msd"
    if (root / "HGG").is_dir() or (root / "LGG").is_dir():
        return "brats"
    if (root / "TrainingMask").is_dir():
        return "flare"
    raise VoxShieldInputError(
        f"{root}: no dataset.json, HGG/LGG or TrainingMask/ found; cannot tell the dataset layout."
    )


def open_dataset(
    dataset_dir: str | Path,
    layout: str = "auto",
    normalisation: str = "auto",
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW,
    mri_percentiles: tuple[float, float] = DEFAULT_MRI_PERCENTILES,
    lists: Sequence[str] = ("training", "test"),
) -> DatasetSpec:
    """
    Find the labelled cases of a dataset and decide how to normalise it.

    Args:
        dataset_dir: dataset root.
        layout: ``auto`` (detect), ``msd``, ``nnunetv2``, ``brats`` or ``flare``.
        normalisation: ``auto`` (``none`` for a copy written by custom.regrid, else the CT window for
            channels named CT and MRI percentiles otherwise, from the dataset.json or the layout), or
            ``ct`` / ``mri`` / ``zscore`` (mean +- 5 std of the non-zero voxels, as in the authors'
            code) / ``none`` (intensities already in [0, 1], taken as they are) for every channel.
        ct_window: HU window mapped to [0, 1] for CT channels.
        mri_percentiles: percentiles of the non-zero voxels mapped to 0 and 1 for MRI channels.
        lists: the MSD dataset.json lists whose labelled entries are used (e.g. only "training" to
            keep held-out test cases out of generator training); other layouts ignore it.

    Returns:
        the DatasetSpec; raises VoxShieldInputError for a missing or unrecognised dataset.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise VoxShieldInputError(f"{root}: dataset folder not found.")
    if layout not in LAYOUTS:
        raise VoxShieldInputError(f"{root}: unknown layout {layout!r}; expected one of {LAYOUTS}.")
    if normalisation not in NORMALISATIONS:
        raise VoxShieldInputError(f"{root}: unknown normalisation {normalisation!r}; expected one of {NORMALISATIONS}.")
    layout = detect_layout(root) if layout == "auto" else layout
    dataset_json, unlabelled, name, regridded = None, [], root.name, False
    if layout in ("msd", "nnunetv2"):
        dataset_json = "dataset.json"
        meta = _read_json(root / dataset_json)
        name = str(meta.get("name", name))
        regridded = REGRID_RECORD in meta
        try:
            cases, channels, labels, unlabelled = _msd(root, meta, lists) if layout == "msd" else _nnunetv2(root, meta)
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, VoxShieldInputError):
                raise
            raise VoxShieldInputError(f"{root / dataset_json}: not a valid {layout} dataset.json ({error}).") from error
    elif layout == "brats":
        cases, channels, labels = _brats(root), list(BRATS_MODALITIES), dict(BRATS_LABELS)
    else:
        cases, channels, labels = _flare(root), ["CT"], dict(FLARE_LABELS)
    if not cases:
        raise VoxShieldInputError(f"{root}: no labelled cases found in the {layout} layout.")
    if 0 not in labels:
        labels[0] = "background"
    if normalisation == "auto" and regridded:  # normalising [0, 1] values again would change the bound's scale
        normalisation = "none"
    kinds = [_normalisation_for(name) if normalisation == "auto" else normalisation for name in channels]
    return DatasetSpec(
        root, layout, cases, channels, labels, kinds, dataset_json,
        tuple(ct_window), tuple(mri_percentiles), unlabelled, name,
    )


@dataclass
class LoadedCase:
    """A case in memory: source-unit channels (C, H, W, D) float64, the label map, per channel
    the normalisation offset and scale: normalised = clip((source - offset) / scale, 0, 1), the
    label's 4x4 voxel-to-world affine (the images share it), and each of the case's files as read
    (relative name -> NiftiFile), so that writing a protected copy reads nothing again."""

    image: np.ndarray
    label: np.ndarray
    offsets: np.ndarray
    scales: np.ndarray
    affine: np.ndarray
    files: dict[str, NiftiFile]


def _check_label_header(path: Path, label_image: nib.Nifti1Image) -> None:
    """Refuse a label that is not a 3D volume."""
    if len(label_image.shape) != 3:
        raise VoxShieldInputError(f"{path}: label must be a 3D volume, got shape {label_image.shape}.")


def _check_image_header(
    spec: DatasetSpec, case: Case, path: Path, image: nib.Nifti1Image, label_image: nib.Nifti1Image
) -> None:
    """Refuse an image file of ``case`` (at ``path``) that does not hold its expected channels of a 3D
    volume on the label's voxel grid (shape and affine)."""
    shape = image.shape
    expected = spec.num_channels if len(case.images) == 1 else 1
    if len(shape) == 4 and shape[3] == expected and expected > 1:
        spatial = shape[:3]
    elif len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        spatial = shape[:3]
        if expected != 1:
            raise VoxShieldInputError(f"{path}: 1 channel found, {expected} expected.")
    elif len(shape) == 2:
        raise VoxShieldInputError(f"{path}: 2D image; VoxShield needs 3D volumes.")
    else:
        raise VoxShieldInputError(f"{path}: shape {shape} does not hold {expected} channel(s) of a 3D volume.")
    if spatial != label_image.shape:
        raise VoxShieldInputError(f"{path}: image shape {spatial} differs from label shape {label_image.shape}.")
    if not np.allclose(image.affine, label_image.affine, atol=AFFINE_TOLERANCE_MM):
        raise VoxShieldInputError(f"{path}: affine differs from the label's affine.")


def check_case_headers(spec: DatasetSpec, case: Case) -> None:
    """
    The checks of load_case that the headers answer, without reading any voxel data: every file
    exists and opens as a NIfTI, the label is 3D, and each image has the label's shape and affine and
    the expected channel count. What only the data shows (values, corrupt data) is left to load_case.

    Raises:
        VoxShieldInputError: with a one-line message naming the offending file.
    """
    label_path = spec.root / case.label
    label_image = load_nifti(label_path)
    _check_label_header(label_path, label_image)
    for name in case.images:
        _check_image_header(spec, case, spec.root / name, load_nifti(spec.root / name), label_image)


def _channel_arrays(
    spec: DatasetSpec, case: Case, label_image: nib.Nifti1Image
) -> tuple[list[np.ndarray], dict]:
    """Each image file of ``case`` read and checked against the label: (its channels in source units,
    relative name -> NiftiFile)."""
    arrays, files = [], {}
    for name in case.images:
        path = spec.root / name
        files[name] = read_nifti(path)
        image = files[name].image
        _check_image_header(spec, case, path, image, label_image)
        slope, inter = slope_inter(image)
        values = files[name].stored.astype(np.float64) * slope + inter
        if not np.isfinite(values).all():
            raise VoxShieldInputError(f"{path}: contains NaN or Inf values.")
        values = values.reshape(label_image.shape + (-1,))
        arrays.extend(np.moveaxis(values, -1, 0))
    return arrays, files


def fit_scaling(values: np.ndarray, kind: str, spec: DatasetSpec, source: Path | str = "") -> tuple[float, float]:
    """Offset and scale that map a channel's source units to [0, 1]: the CT window; the MRI percentiles
    of the non-zero voxels; ("zscore", the authors' code) mean +- 5 standard deviations of them; or
    ("none") 0 and 1 for values already in [0, 1].

    Raises:
        VoxShieldInputError: naming ``source`` (the channel's file) when ``kind`` is ``none`` and a value
            lies outside [0, 1].
    """
    if kind == "none":
        if values.min() < 0 or values.max() > 1:
            raise VoxShieldInputError(
                f"{source}: intensities span [{values.min():.6g}, {values.max():.6g}], not [0, 1], "
                "so normalisation 'none' cannot take them as they are."
            )
        return 0.0, 1.0
    if kind == "ct":
        return float(spec.ct_window[0]), float(spec.ct_window[1] - spec.ct_window[0])
    foreground = values[values != 0]
    foreground = foreground if foreground.size else values
    if kind == "zscore":
        low, high = foreground.mean() - ZSCORE_CLIP * foreground.std(), foreground.mean() + ZSCORE_CLIP * foreground.std()
    else:
        low, high = np.percentile(foreground, spec.mri_percentiles)
    return float(low), float(max(high - low, 1e-6))


def load_case(spec: DatasetSpec, case: Case, allow_empty_label: bool = False) -> LoadedCase:
    """
    Read (each file once) and check one case: every file exists and is a readable NIfTI, the label
    is 3D, integer and (unless ``allow_empty_label``) non-empty with values from the dataset's
    labels, each image has the label's shape and affine, the expected channel count and only finite
    values.

    Raises:
        VoxShieldInputError: with a one-line message naming the offending file.
    """
    label_path = spec.root / case.label
    label_file = read_nifti(label_path)
    label_image = label_file.image
    _check_label_header(label_path, label_image)
    slope, inter = slope_inter(label_image)
    label_values = label_file.stored.astype(np.float64) * slope + inter
    if not np.isfinite(label_values).all() or not np.array_equal(label_values, np.round(label_values)):
        raise VoxShieldInputError(f"{label_path}: label holds non-integer values.")
    label = label_values.astype(np.int64)
    unknown = sorted(set(np.unique(label).tolist()) - set(spec.labels))  # negatives land here too
    if unknown:
        raise VoxShieldInputError(f"{label_path}: label values {unknown} are not in the dataset's labels.")
    if not allow_empty_label and not (label > 0).any():
        raise VoxShieldInputError(f"{label_path}: label is empty (no foreground), so there is no ROI to protect.")
    channels, image_files = _channel_arrays(spec, case, label_image)
    files = case.images if len(case.images) > 1 else case.images * len(channels)  # the file of each channel
    scaling = [
        fit_scaling(values, kind, spec, spec.root / name)
        for values, kind, name in zip(channels, spec.normalisation, files)
    ]
    offsets, scales = (np.array(values) for values in zip(*scaling))
    return LoadedCase(
        np.stack(channels), label, offsets, scales, label_image.affine, {case.label: label_file, **image_files}
    )


def normalise(image: np.ndarray, offsets: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(C, H, W, D) source-unit channels -> float32 intensities in [0, 1], per-channel offset/scale."""
    shape = (-1,) + (1,) * (image.ndim - 1)
    unit = (image - offsets.reshape(shape)) / scales.reshape(shape)
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


class LoadCased(MapTransform):
    """
    MONAI transform: replaces a datalist entry's ``case_id`` with the checked, normalised case, the
    same loading and normalisation that protect uses, so the generator is trained on exactly the
    intensities it will later perturb.

    Args:
        spec: the dataset.
        image_key, label_key: output keys; image (C, H, W, D) float32 in [0, 1], label (1, H, W, D)
            with the dataset's label values mapped to 0..K-1.
        with_affine: give both as MetaTensors carrying the label's affine (for spatial transforms
            such as Spacingd); numpy arrays otherwise.
    """

    def __init__(self, spec: DatasetSpec, image_key: str = "image", label_key: str = "label",
                 with_affine: bool = False) -> None:
        super().__init__(keys=[image_key, label_key])
        self.spec = spec
        self.with_affine = with_affine
        self.cases = {case.case_id: case for case in spec.cases}
        self.image_key, self.label_key = image_key, label_key
        # load_case rejects values outside spec.labels, so every voxel has a class index
        self.to_class_index = MapLabelValue(
            orig_labels=spec.label_values, target_labels=range(len(spec.label_values)), dtype=np.float32
        )

    def __call__(self, data: dict) -> dict:
        loaded = load_case(self.spec, self.cases[data["case_id"]])
        image, label = normalise(loaded.image, loaded.offsets, loaded.scales), self.to_class_index(loaded.label[None])
        if self.with_affine:
            image, label = MetaTensor(image, affine=loaded.affine), MetaTensor(label, affine=loaded.affine)
        return {**data, self.image_key: image, self.label_key: label}
