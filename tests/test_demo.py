"""Tests of the synthetic phantom datasets written by ``custom.demo.make_demo_dataset``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custom.demo import BRATS_LABELS, BRATS_MODALITIES, FLARE_LABELS, MANIFEST_NAME, make_demo_dataset

SHAPE = (48, 48, 32)
NUM_CASES = 8


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root, by POSIX path relative to root, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The image and its voxels exactly as stored (no float conversion)."""
    image = nib.load(path)
    return image, np.asanyarray(image.dataobj)


def _flare_cases(root: Path) -> list[tuple[Path, Path]]:
    return [
        (root / f"TrainingImg/train_{i:03d}_0000.nii.gz", root / f"TrainingMask/train_{i:03d}.nii.gz")
        for i in range(NUM_CASES)
    ]


def _brats_cases(root: Path) -> list[Path]:
    """Path prefix ``.../BraTS19_DEMO_XXX/BraTS19_DEMO_XXX`` of every case."""
    return sorted(folder / folder.name for folder in root.glob("?GG/BraTS19_DEMO_*"))


@pytest.fixture(scope="module")
def flare_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("flare") / "data", "flare", NUM_CASES, SHAPE, seed=0)


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("brats") / "data", "brats", NUM_CASES, SHAPE, seed=0)


def test_flare_layout_and_names(flare_root):
    expected = {MANIFEST_NAME}
    for i in range(NUM_CASES):
        expected |= {f"TrainingImg/train_{i:03d}_0000.nii.gz", f"TrainingMask/train_{i:03d}.nii.gz"}
    assert set(_files(flare_root)) == expected


def test_brats_layout_and_names(brats_root):
    # Two thirds of 8 rounds to 5 HGG cases; the rest are LGG and the numbering continues across grades.
    grades = {"HGG": range(0, 5), "LGG": range(5, NUM_CASES)}
    expected = {MANIFEST_NAME}
    for grade, indices in grades.items():
        for i in indices:
            case = f"BraTS19_DEMO_{i:03d}"
            expected |= {f"{grade}/{case}/{case}_{key}.nii.gz" for key in ("flair", "t1", "t1ce", "t2", "seg")}
    assert set(_files(brats_root)) == expected


def test_manifest_records_arguments_and_is_written_last(flare_root):
    manifest = json.loads((flare_root / MANIFEST_NAME).read_text())
    assert {k: manifest[k] for k in ("layout", "num_cases", "shape", "seed")} == {
        "layout": "flare",
        "num_cases": NUM_CASES,
        "shape": list(SHAPE),
        "seed": 0,
    }
    assert manifest["complete"] is True
    data_mtimes = [p.stat().st_mtime_ns for p in flare_root.rglob("*.nii.gz")]
    assert (flare_root / MANIFEST_NAME).stat().st_mtime_ns >= max(data_mtimes)


def test_flare_dtypes_shapes_affines_labels(flare_root):
    for image_path, label_path in _flare_cases(flare_root):
        image, ct = _load(image_path)
        label, labels = _load(label_path)
        assert image.get_data_dtype() == np.int16 and ct.dtype == np.int16
        assert label.get_data_dtype() == np.uint8 and labels.dtype == np.uint8
        assert ct.shape == labels.shape == SHAPE
        assert np.array_equal(image.affine, label.affine)
        np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), (0.8, 0.8, 2.5), rtol=1e-6)
        np.testing.assert_allclose(image.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
        assert np.count_nonzero(image.affine[:3, :3] - np.diag(np.diag(image.affine[:3, :3]))) == 0
        assert set(np.unique(labels).tolist()) == set(FLARE_LABELS)


def test_flare_hounsfield_units(flare_root):
    windows = {1: (45, 75), 2: (125, 175), 3: (35, 65), 4: (20, 60)}
    for image_path, label_path in _flare_cases(flare_root):
        ct = _load(image_path)[1].astype(float)
        labels = _load(label_path)[1]
        assert ct.min() == -1000 and ct[0, 0, 0] == -1000  # air surrounds the body
        assert ct.max() < 3072
        assert (ct[labels > 0] > -100).all()
        means = {organ: ct[labels == organ].mean() for organ in windows}
        for organ, (low, high) in windows.items():
            assert low < means[organ] < high, (image_path.name, FLARE_LABELS[organ], means[organ])
        assert means[2] == max(means.values())  # contrast-enhanced kidneys are the brightest organ


def test_brats_dtypes_shapes_affines_labels(brats_root):
    cases = _brats_cases(brats_root)
    assert len(cases) == NUM_CASES
    for case in cases:
        seg_image, seg = _load(Path(f"{case}_seg.nii.gz"))
        assert seg_image.get_data_dtype() == np.uint8 and seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) == set(BRATS_LABELS)
        np.testing.assert_allclose(nib.affines.voxel_sizes(seg_image.affine), (1.0, 1.0, 1.0))
        for modality in BRATS_MODALITIES:
            image, voxels = _load(Path(f"{case}_{modality}.nii.gz"))
            assert image.get_data_dtype() == np.float32 and voxels.dtype == np.float32
            assert voxels.shape == seg.shape == SHAPE
            assert np.array_equal(image.affine, seg_image.affine)
            np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.0))


def test_brats_intensities_and_contrasts(brats_root):
    for case in _brats_cases(brats_root):
        seg = _load(Path(f"{case}_seg.nii.gz"))[1]
        volumes = {m: _load(Path(f"{case}_{m}.nii.gz"))[1] for m in BRATS_MODALITIES}
        brain = volumes["flair"] > 0
        assert 0.1 < brain.mean() < 0.9 and brain[0, 0, 0] == 0
        for modality, voxels in volumes.items():
            assert (voxels >= 0).all() and np.array_equal(voxels > 0, brain), modality
        assert not (seg[~brain]).any()
        normal = brain & (seg == 0)

        def ratio(modality, label):
            return volumes[modality][seg == label].mean() / volumes[modality][normal].mean()

        assert ratio("t1ce", 4) > 1.5  # enhancing rim
        assert ratio("flair", 2) > 1.3  # oedema
        assert ratio("t1", 1) < 0.7 and ratio("t2", 1) > 1.5  # necrosis: dark T1, fluid-bright T2


def test_brats_tumour_sub_regions_are_nested(brats_root):
    grid = np.indices(SHAPE)
    for case in _brats_cases(brats_root):
        seg = _load(Path(f"{case}_seg.nii.gz"))[1]
        centre = grid[:, seg == 1].mean(axis=1)
        distance = {
            label: np.linalg.norm(grid[:, seg == label] - centre[:, None], axis=0).mean() for label in (1, 2, 4)
        }
        assert distance[1] < distance[4] < distance[2], case.name


def _z_extent(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.any(axis=(0, 1)))


def test_structures_continue_across_slices(flare_root, brats_root):
    for _, label_path in _flare_cases(flare_root):
        labels = _load(label_path)[1]
        for organ in FLARE_LABELS:
            slices = _z_extent(labels == organ)
            assert np.array_equal(slices, np.arange(slices[0], slices[-1] + 1)), (label_path.name, organ)
        assert len(_z_extent(labels == 1)) >= SHAPE[2] / 3  # liver
    for case in _brats_cases(brats_root):
        seg = _load(Path(f"{case}_seg.nii.gz"))[1]
        slices = _z_extent(seg == 2)
        assert np.array_equal(slices, np.arange(slices[0], slices[-1] + 1)) and len(slices) >= SHAPE[2] / 4
        assert len(_z_extent(_load(Path(f"{case}_t1.nii.gz"))[1] > 0)) >= SHAPE[2] * 2 / 3  # brain


def test_cases_differ(flare_root, brats_root):
    volumes = [_load(label)[1].tobytes() for _, label in _flare_cases(flare_root)]
    volumes += [_load(Path(f"{case}_seg.nii.gz"))[1].tobytes() for case in _brats_cases(brats_root)]
    assert len(set(volumes)) == 2 * NUM_CASES


@pytest.mark.parametrize("layout", ["flare", "brats"])
def test_same_seed_gives_byte_identical_files(tmp_path, layout):
    first = _files(make_demo_dataset(tmp_path / "a", layout, num_cases=3, shape=(24, 24, 16), seed=7))
    second = _files(make_demo_dataset(tmp_path / "b", layout, num_cases=3, shape=(24, 24, 16), seed=7))
    other = _files(make_demo_dataset(tmp_path / "c", layout, num_cases=3, shape=(24, 24, 16), seed=8))
    assert first == second
    # gzip headers carry no time of writing (bytes 4-7: MTIME), else the bytes would differ run to run.
    gzipped = [data for name, data in first.items() if name.endswith(".gz")]
    assert all(data[:2] == b"\x1f\x8b" and data[4:8] == bytes(4) for data in gzipped)
    assert set(other) == set(first)
    assert all(other[name] != first[name] for name in first if name.endswith(".nii.gz"))


def test_case_does_not_depend_on_num_cases(tmp_path):
    one = _files(make_demo_dataset(tmp_path / "one", "flare", num_cases=1, shape=(24, 24, 16), seed=3))
    three = _files(make_demo_dataset(tmp_path / "three", "flare", num_cases=3, shape=(24, 24, 16), seed=3))
    for name in ("TrainingImg/train_000_0000.nii.gz", "TrainingMask/train_000.nii.gz"):
        assert one[name] == three[name]


def test_second_call_does_not_rewrite(tmp_path):
    root = make_demo_dataset(tmp_path / "data", "brats", num_cases=2, shape=(24, 24, 16))
    old = 1_000_000_000_000_000_000  # a fixed past time, so any rewrite shows whatever the clock resolution
    for path in root.rglob("*"):
        os.utime(path, ns=(old, old))
    assert make_demo_dataset(root, "brats", num_cases=2, shape=(24, 24, 16)) == root
    assert {p.stat().st_mtime_ns for p in root.rglob("*")} == {old}


def test_regenerates_over_a_previous_demo(tmp_path):
    root = make_demo_dataset(tmp_path / "data", "flare", num_cases=3, shape=(24, 24, 16))
    make_demo_dataset(root, "brats", num_cases=2, shape=(24, 24, 16), seed=1)
    fresh = _files(make_demo_dataset(tmp_path / "fresh", "brats", num_cases=2, shape=(24, 24, 16), seed=1))
    assert _files(root) == fresh


def test_completes_an_interrupted_run(tmp_path):
    root = make_demo_dataset(tmp_path / "data", "flare", num_cases=2, shape=(24, 24, 16))
    expected = _files(root)
    (root / "TrainingMask/train_001.nii.gz").unlink()
    (root / "TrainingMask/.train_001.nii.gz.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"partial")
    make_demo_dataset(root, "flare", num_cases=2, shape=(24, 24, 16))
    assert _files(root) == expected


def test_refuses_foreign_folders(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(foreign)):
        make_demo_dataset(foreign, "flare", num_cases=1, shape=(16, 16, 16))
    assert _files(foreign) == {"notes.txt": b"keep me"}

    # A real dataset with demo-like names but no manifest is never ours to overwrite.
    real = tmp_path / "real"
    (real / "TrainingImg").mkdir(parents=True)
    (real / "TrainingImg/train_000_0000.nii.gz").write_bytes(b"real scan")
    with pytest.raises(FileExistsError, match=str(real)):
        make_demo_dataset(real, "flare", num_cases=1, shape=(16, 16, 16))
    assert _files(real) == {"TrainingImg/train_000_0000.nii.gz": b"real scan"}

    demo = make_demo_dataset(tmp_path / "demo", "flare", num_cases=1, shape=(16, 16, 16))
    (demo / "TrainingImg/extra.nii.gz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match=str(demo)):
        make_demo_dataset(demo, "brats", num_cases=1, shape=(16, 16, 16))
    assert (demo / "TrainingImg/extra.nii.gz").read_bytes() == b"user data"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match=str(a_file)):
        make_demo_dataset(a_file, "flare", num_cases=1, shape=(16, 16, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "msd"}, r"layout must be one of 'flare', 'brats'"),
        ({"layout": "FLARE"}, r"layout must be one of 'flare', 'brats'"),
        ({"num_cases": 0}, r"num_cases must be an integer >= 1"),
        ({"num_cases": 2.0}, r"num_cases must be an integer >= 1"),
        ({"shape": (15, 48, 32)}, r"shape must be 3 integers each >= 16"),
        ({"shape": (48, 48)}, r"shape must be 3 integers each >= 16"),
        ({"shape": (48.0, 48, 32)}, r"shape must be 3 integers each >= 16"),
        ({"shape": "abc"}, r"shape must be 3 integers each >= 16"),
        ({"seed": -1}, r"seed must be a non-negative integer"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, message):
    arguments = {"layout": "flare", "num_cases": 1, "shape": (16, 16, 16), "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_demo_dataset(tmp_path / "data", **arguments)
    assert not (tmp_path / "data").exists()


@settings(max_examples=12, deadline=None)
@given(
    layout=st.sampled_from(["flare", "brats"]),
    shape=st.tuples(*[st.integers(16, 24)] * 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_label_in_every_case(layout, shape, seed):
    expected = set(FLARE_LABELS if layout == "flare" else BRATS_LABELS)
    with tempfile.TemporaryDirectory() as folder:
        root = make_demo_dataset(Path(folder) / "data", layout, num_cases=2, shape=shape, seed=seed)
        masks = sorted(root.rglob("TrainingMask/*.nii.gz")) + sorted(root.rglob("*_seg.nii.gz"))
        assert len(masks) == 2
        for mask in masks:
            assert set(np.unique(_load(mask)[1]).tolist()) == expected, (mask.name, shape, seed)
