"""`voxshield regrid` (custom/regrid.py) and the normalisation "none" it feeds: a known cube lands where
the resize puts it, intensities are float32 in [0, 1], bad input is refused without output, and a
regridded copy goes through protect, verify and evaluate."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from monai.inferers import SlidingWindowInferer

from conftest import EPS, generator_net, run_bundle
from custom.data import load_case, open_dataset
from custom.demo import make_demo_dataset
from custom.nifti_io import VoxShieldInputError, sha256
from custom.perturbation import ROIBoundedPerturbation
from custom.protect import DatasetProtector
from custom.regrid import regrid_dataset
from custom.voxshield import VoxShield
from test_cli import run_cli, single_thread  # noqa: F401 - the fixture

SHAPE = (40, 24, 12)
SPACING = (1.0, 1.5, 2.5)
ORIGIN = (-20.0, 7.0, 3.0)
CUBE = ((10, 20), (6, 18), (3, 9))  # [start, stop) voxels of the label cube per axis
GRID = 20


def cube_dataset(root, test_entries=None):
    """An MSD dataset of two MRI cases: a bright labelled cube (CUBE) in noisy background, SPACING, ORIGIN."""
    rng = np.random.default_rng(0)
    affine = np.diag(SPACING + (1.0,))
    affine[:3, 3] = ORIGIN
    entries = []
    for case_id in ("a", "b"):
        image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
        label = np.zeros(SHAPE, np.uint8)
        cube = tuple(slice(*bounds) for bounds in CUBE)
        image[cube] += 300
        label[cube] = 1
        for folder, volume in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume, affine), root / folder / f"{case_id}.nii.gz")
        entries.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    meta = {"name": "cubes", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "cube"},
            "training": entries[:1], "test": test_entries if test_entries is not None else entries[1:]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def digests(root):
    return {path: sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


def test_cube_lands_where_the_resize_puts_it(tmp_path):
    source = cube_dataset(tmp_path / "cubes")
    before = digests(source)
    output = regrid_dataset(source, tmp_path / "grid", GRID)
    assert digests(source) == before  # the source is only read

    meta = json.loads((output / "dataset.json").read_text())
    assert meta["training"] == [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}]
    assert meta["test"] == [{"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}]
    record = meta["voxshield_regrid"]
    assert record["grid"] == [GRID] * 3 and record["normalisation"] == ["zscore"]
    assert record["source"] == str(source.resolve())
    assert record["cases"]["a"]["source_shape"] == list(SHAPE)
    assert record["cases"]["a"]["source_spacing_mm"] == pytest.approx(SPACING)

    scale = np.array(SHAPE) / GRID  # source voxels per new voxel: 2, 1.2, 0.6
    extent_spacing = np.array(SHAPE) * SPACING / GRID
    for case_id in ("a", "b"):
        image = nib.load(output / "imagesTr" / f"{case_id}.nii.gz")
        label = nib.load(output / "labelsTr" / f"{case_id}.nii.gz")
        values = np.asanyarray(image.dataobj)
        assert image.get_data_dtype() == np.float32 and values.shape == (GRID,) * 3
        assert values.min() >= 0 and values.max() <= 1
        assert np.array_equal(image.affine, label.affine)
        assert np.allclose(image.header.get_zooms()[:3], extent_spacing)
        # the first voxel's outer corner stays where the source's was
        corner = image.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
        assert np.allclose(corner[:3], np.array(ORIGIN) - 0.5 * np.array(SPACING))

        foreground = np.argwhere(np.asanyarray(label.dataobj) == 1)
        for axis, (start, stop) in enumerate(CUBE):
            # the cube spans [start, stop) source voxels = [start / scale, stop / scale) new voxels
            assert abs(foreground[:, axis].min() - start / scale[axis]) <= 1
            assert abs(foreground[:, axis].max() + 1 - stop / scale[axis]) <= 1
        # and its centre stays at the same place in millimetres, within one new voxel
        source_centre = np.diag(SPACING) @ (np.mean(CUBE, axis=1) - 0.5) + ORIGIN
        centre = label.affine[:3, :3] @ foreground.mean(axis=0) + label.affine[:3, 3]
        assert np.all(np.abs(centre - source_centre) <= extent_spacing)
        # the bright cube is the bright part of the image
        assert values[np.asanyarray(label.dataobj) == 1].mean() > values[np.asanyarray(label.dataobj) == 0].mean() + 0.1


def test_regrid_refuses_bad_requests_without_output(tmp_path, capsys):
    source = cube_dataset(tmp_path / "cubes")
    before = digests(source)
    with pytest.raises(VoxShieldInputError, match="output folder is inside the input dataset"):
        regrid_dataset(source, source / "grid", GRID)
    (tmp_path / "taken").mkdir()
    with pytest.raises(VoxShieldInputError, match="taken: output folder exists"):
        regrid_dataset(source, tmp_path / "taken", GRID)
    with pytest.raises(VoxShieldInputError, match=r"grid must be one positive size or 3 of them, got \[20, 20\]"):
        regrid_dataset(source, tmp_path / "grid", [20, 20])
    with pytest.raises(VoxShieldInputError, match=r"grid must be one positive size or 3 of them, got 'big'"):
        regrid_dataset(source, tmp_path / "grid", "big")

    assert digests(source) == before

    # a damaged second case (the first is written by then): one line naming it, exit 1, and neither
    # the output nor a temporary folder left
    damaged = source.resolve() / "imagesTr" / "b.nii.gz"
    damaged.write_bytes(b"not a nifti")
    status = run_cli("regrid", "--source", str(source), "--output", str(tmp_path / "grid"), "--grid", str(GRID))
    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1
    assert error.startswith(f"voxshield: error: {damaged}: corrupt NIfTI")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cubes", "taken"]


def test_unlabelled_images_are_left_out_and_recorded(tmp_path, capsys):
    source = cube_dataset(tmp_path / "cubes", test_entries=["./imagesTr/b.nii.gz"])
    assert run_cli("regrid", "--source", str(source), "--output", str(tmp_path / "grid"), "--grid", "16") == 0
    assert capsys.readouterr().out.strip().endswith("left out 1 unlabelled image(s)")
    meta = json.loads((tmp_path / "grid" / "dataset.json").read_text())
    assert "test" not in meta and meta["voxshield_regrid"]["unlabelled_images_left_out"] == ["imagesTr/b.nii.gz"]
    assert sorted(path.name for path in (tmp_path / "grid" / "imagesTr").iterdir()) == ["a.nii.gz"]


def test_normalisation_none_takes_unit_values_and_refuses_others(tmp_path):
    source = cube_dataset(tmp_path / "cubes")
    spec = open_dataset(source, normalisation="none")
    with pytest.raises(VoxShieldInputError, match=r"imagesTr/a.nii.gz: intensities span \[.*\], not \[0, 1\]"):
        load_case(spec, spec.cases[0])
    grid = open_dataset(regrid_dataset(source, tmp_path / "grid", GRID))
    assert grid.normalisation == ["none"]  # "auto" reads a regridded copy as it is
    again = open_dataset(regrid_dataset(grid.root, tmp_path / "again", 12, normalisation="none"))  # e.g. a coarser grid
    assert nib.load(again.root / again.cases[0].images[0]).shape == (12, 12, 12)
    loaded = load_case(grid, grid.cases[0])
    stored = nib.load(grid.root / grid.cases[0].images[0]).get_fdata()
    assert np.array_equal(loaded.image[0], stored) and loaded.offsets.tolist() == [0.0] and loaded.scales.tolist() == [1.0]


@pytest.mark.parametrize("normalisation", ["zscore", "none"])
def test_verify_follows_each_normalisation(normalisation, tmp_path, random_checkpoints, single_thread):  # noqa: F811
    """protect's bound is eps x the normalisation scale, which verify recomputes from the source."""
    data = make_demo_dataset(tmp_path / "flare", "flare", num_cases=2, shape=(32, 32, 16))
    if normalisation == "none":
        data = regrid_dataset(data, tmp_path / "grid", 24)
    spec = open_dataset(data, normalisation=normalisation)
    DatasetProtector(
        spec, tmp_path / "out",
        VoxShield(ROIBoundedPerturbation(eps=EPS), generator_net(1), SlidingWindowInferer(roi_size=(24, 24, 16))),
        checkpoint=random_checkpoints[1],
    ).run()
    assert run_cli("verify", "--source", str(data), "--protected", str(tmp_path / "out")) == 0
    if normalisation == "none":  # the bound is eps on the stored float32 values themselves
        for case in spec.cases:
            before = nib.load(data / case.images[0]).get_fdata()
            after = np.asanyarray(nib.load(tmp_path / "out" / case.images[0]).dataobj)
            assert after.dtype == np.float32 and after.min() >= 0 and after.max() <= 1
            assert 0 < np.abs(after - before).max() <= EPS


def test_regrid_protect_verify_evaluate(tmp_path, random_checkpoints, single_thread):  # noqa: F811
    """The README's commands on a tiny demo: regrid 32x32x16 -> 24^3, protect with normalisation none,
    verify, and a victim trained for 1 epoch on the protected copy, scored on a clean regridded case."""
    data = make_demo_dataset(tmp_path / "flare", "flare", num_cases=3, shape=(32, 32, 16))
    grid = tmp_path / "grid"
    assert run_cli("regrid", "--source", str(data), "--output", str(grid), "--grid", "24") == 0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(random_checkpoints[1], ckpt / "generator.pt")
    protected = tmp_path / "protected"
    result = run_bundle("protect", "--dataset_dir", str(grid), "--ckpt_dir", str(ckpt), "--output_dir",
                        str(protected), "--normalisation", "none", "--window_size", "[24,24,24]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli("verify", "--source", str(grid), "--protected", str(protected)) == 0
    records = json.loads((protected / "voxshield_manifest.json").read_text())["cases"]
    assert [record["bound_source_units"] for record in records] == [[EPS]] * 3

    result = run_bundle("evaluate", "--train_dir", str(protected), "--test_dir", str(grid), "--test_list",
                        "['train_002']", "--epochs", "1", "--patch_size", "[32,16,16]", "--normalisation", "none",
                        "--output_dir", str(tmp_path / "results"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert results["run"]["method"] == "voxshield" and results["run"]["train_cases"] == 2
    assert results["recipe"]["name"] == "patch" and results["recipe"]["normalisation"] == ["none"]
    assert 0 <= results["metrics"]["aggregate"]["mean_dice"] <= 1
    assert {record["case_id"] for record in results["imperceptibility"]["cases"]} == {"train_000", "train_001"}
