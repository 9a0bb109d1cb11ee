"""protect's guarantees, checked on the files it writes: bound in the written dtype, untouched labels,
outside-ROI voxels and headers, manifest, atomic and resumable output, refusal to clobber."""

import collections
import filecmp
import json
from pathlib import Path
import math
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.inferers import SlidingWindowInferer
from nibabel.arrayproxy import ArrayProxy

import custom.data
from checks import assert_protected_copy
from conftest import EPS, generator_net
from custom.data import LoadCased, load_case, normalise, open_dataset
from custom.nifti_io import VoxShieldInputError
from custom.perturbation import ROIBoundedPerturbation
from custom.protect import DatasetProtector, bounded_stored_values, previous_copy
from custom.verify import verify_copy
from custom.voxshield import VoxShield


def protector(dataset_dir, output_dir, checkpoint, channels, **options):
    return DatasetProtector(
        dataset=open_dataset(dataset_dir),
        output_dir=output_dir,
        protector=VoxShield(ROIBoundedPerturbation(eps=EPS), generator_net(channels),
                            SlidingWindowInferer(roi_size=(32, 32, 16), overlap=0.25)),
        checkpoint=checkpoint,
        **options,
    )


def test_checkpoint_of_another_network_is_refused(flare_data, tmp_path, random_checkpoints):
    with pytest.raises(VoxShieldInputError, match="generator_4.pt: does not fit this bundle's voxshield network"):
        protector(flare_data, tmp_path / "out", random_checkpoints[4], 1).run()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_bounded_stored_values_never_exceed_bound(dtype, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    slope = data.draw(st.sampled_from([1.0, 0.5, 2.5, 1e-3]))
    bound = data.draw(st.floats(1e-3, 50.0))
    info = np.iinfo(dtype) if dtype.startswith(("int", "uint")) else None
    low, high = (info.min, info.max) if info else (-1e4, 1e4)
    stored = rng.uniform(low, high, size=200).astype(dtype)
    stored[:3] = [low, high, 0] if info else stored[:3]
    delta = rng.uniform(-bound, bound, size=200)
    delta[10:20] = 0.0
    new = bounded_stored_values(stored, delta, slope, bound)
    assert new.dtype == stored.dtype
    change = (new.astype(np.float64) - stored.astype(np.float64)) * slope
    assert (np.abs(change) <= bound).all()
    assert np.array_equal(new[10:20], stored[10:20])
    if info:  # rounding goes towards the source value, never past the requested change
        assert (np.abs(change) <= np.abs(delta) + 1e-9).all()
        assert (np.sign(change) * np.sign(delta) >= 0).all()


def test_float_rounding_outwards_is_pulled_back():
    stored = np.array([1.0, 1000.0, 3.3], dtype=np.float32)
    bound = 4 / 255 * 0.7
    new = bounded_stored_values(stored, np.full(3, bound), 1.0, bound)
    assert (np.abs(new.astype(np.float64) - stored.astype(np.float64)) <= bound).all()
    assert (new > stored).all()


def test_protect_flare_int16_ct(flare_data, tmp_path, random_checkpoints):
    output = tmp_path / "out"
    source_bytes = {p: p.read_bytes() for p in flare_data.rglob("*") if p.is_file()}
    manifest = protector(flare_data, output, random_checkpoints[1], 1).run()
    assert_protected_copy(flare_data, output, EPS, ct=True)
    assert {p: p.read_bytes() for p in flare_data.rglob("*") if p.is_file()} == source_bytes  # source untouched
    assert manifest["eps_normalised"] == EPS and manifest["method"] == "voxshield"
    assert manifest["fitted"]["sha256"] == __import__("hashlib").sha256(random_checkpoints[1].read_bytes()).hexdigest()
    assert {"torch", "monai", "numpy", "nibabel", "python"} <= set(manifest["software"])
    assert nib.load(output / "TrainingImg/train_000_0000.nii.gz").get_data_dtype() == np.int16
    # PSNR recomputed from the files with the documented definition (CT window, data range 1).
    record = manifest["cases"][0]
    clean = nib.load(flare_data / record["images"][0]).get_fdata()
    protected = nib.load(output / record["images"][0]).get_fdata()
    normalise = lambda hu: np.clip((hu + 175.0) / 425.0, 0, 1)  # noqa: E731
    mse = ((normalise(clean) - normalise(protected)) ** 2).mean()
    assert record["psnr_db_volume"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    roi = np.asanyarray(nib.load(flare_data / record["label"]).dataobj) > 0
    mse_roi = ((normalise(clean) - normalise(protected))[roi] ** 2).mean()
    assert record["psnr_db_roi"] == pytest.approx(10 * math.log10(1 / mse_roi), rel=1e-6)
    assert record["roi_fraction"] == pytest.approx(roi.mean())
    assert 0.9 < record["ssim_3d_volume"] < 1.0


def test_protect_decodes_each_case_file_once(flare_data, tmp_path, random_checkpoints, monkeypatch):
    """Before the first write protect loads the header of every case file; protecting a case then reads
    each of its files once, the only decoding of its voxel data, a read that gives the normalisation,
    the label, the stored values, the header bytes and the label's copy."""
    source = flare_data.resolve()
    headers, reads, decodes = collections.Counter(), collections.Counter(), []
    real_decode = ArrayProxy._get_unscaled

    def counting(counter, load):
        def counted(path):
            counter[Path(path).relative_to(source).as_posix()] += 1
            return load(path)
        return counted

    def counting_decode(proxy, slicer):  # nibabel reads voxel data through here only
        decodes.append(proxy)
        return real_decode(proxy, slicer)

    monkeypatch.setattr(custom.data, "load_nifti", counting(headers, custom.data.load_nifti))
    monkeypatch.setattr(custom.data, "read_nifti", counting(reads, custom.data.read_nifti))
    monkeypatch.setattr(ArrayProxy, "_get_unscaled", counting_decode)
    protector(flare_data, tmp_path / "out", random_checkpoints[1], 1).run()
    monkeypatch.undo()
    cases = [f"train_00{index}" for index in range(3)]
    files = [f"TrainingImg/{case}_0000.nii.gz" for case in cases] + [f"TrainingMask/{case}.nii.gz" for case in cases]
    assert headers == reads == dict.fromkeys(files, 1)
    assert len(decodes) == len(files)  # one per read: loading a header decodes nothing
    assert_protected_copy(flare_data, tmp_path / "out", EPS, ct=True)


def test_writes_overlap_the_next_case_and_never_queue_up(flare_data, tmp_path, random_checkpoints, monkeypatch):
    """Each case is written on the writer thread while the next one is perturbed, and no case is perturbed
    before the write of the case two before it has finished (at most one waits: memory flat in N); a
    failed write stops the run with its own error."""
    events = []
    perturb, write = DatasetProtector._perturb_case, DatasetProtector._write_case

    def perturbing(self, case):
        events.append(("perturb", case.case_id, threading.current_thread().name))
        return perturb(self, case)

    def writing(self, write_case, case_id):
        record = write(self, write_case, case_id)
        events.append(("written", case_id, threading.current_thread().name))
        return record

    monkeypatch.setattr(DatasetProtector, "_perturb_case", perturbing)
    monkeypatch.setattr(DatasetProtector, "_write_case", writing)
    protector(flare_data, tmp_path / "out", random_checkpoints[1], 1).run()
    cases = [f"train_00{index}" for index in range(3)]
    assert [event[1] for event in events if event[0] == "perturb"] == cases
    assert [event[1] for event in events if event[0] == "written"] == cases
    assert {event[2] for event in events if event[0] == "perturb"} == {threading.current_thread().name}
    assert all(event[2].startswith("voxshield-write") for event in events if event[0] == "written")
    order = {event[:2]: index for index, event in enumerate(events)}
    for later in range(2, len(cases)):
        assert order[("written", cases[later - 2])] < order[("perturb", cases[later])]
    assert_protected_copy(flare_data, tmp_path / "out", EPS, ct=True)

    def failing(self, write_case, case_id):
        if case_id == "train_001":
            raise OSError(f"No space left on device: {case_id}")
        return write(self, write_case, case_id)

    monkeypatch.setattr(DatasetProtector, "_write_case", failing)
    with pytest.raises(OSError, match="No space left on device: train_001"):
        protector(flare_data, tmp_path / "failed", random_checkpoints[1], 1).run()
    assert not (tmp_path / "failed" / "voxshield_manifest.json").exists()


def test_protect_brats_float32_mri(brats_data, tmp_path, random_checkpoints):
    output = tmp_path / "out"
    protector(brats_data, output, random_checkpoints[4], 4).run()
    manifest = assert_protected_copy(brats_data, output, EPS, ct=False)
    assert len(manifest["cases"]) == 2 and all(len(case["images"]) == 4 for case in manifest["cases"])
    assert nib.load(output / manifest["cases"][0]["images"][0]).get_data_dtype() == np.float32


def test_training_loader_gives_class_indices_and_protect_intensities(brats_data):
    spec = open_dataset(brats_data)
    case = spec.cases[0]
    item = LoadCased(spec)({"case_id": case.case_id})
    label = np.asanyarray(nib.load(brats_data / case.label).dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 4}
    # BraTS values 0, 1, 2, 4 become the class indices 0, 1, 2, 3
    expected = np.select([label == 1, label == 2, label == 4], [1, 2, 3], 0)
    assert item["label"].shape == (1, *label.shape) and item["label"].dtype == np.float32
    np.testing.assert_array_equal(item["label"][0], expected)
    loaded = load_case(spec, case)
    np.testing.assert_array_equal(item["image"], normalise(loaded.image, loaded.offsets, loaded.scales))


def msd_4d_scaled(root: Path) -> Path:
    """An MSD dataset with one 4D two-channel int16 image stored with scl_slope/inter (MRI normalisation)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((32, 32, 16), np.uint8)
    label[8:20, 10:24, 4:12] = 1
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    image = nib.Nifti1Image((rng.normal(size=(32, 32, 16, 2)) * 300 + 1000).astype(np.int16), affine)
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, root / "imagesTr/case_a.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr/case_a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": "./imagesTr/case_a.nii.gz", "label": "./labelsTr/case_a.nii.gz"}], "test": [],
    }))
    return root


def test_scaled_and_4d_msd_dataset(tmp_path, random_checkpoints):
    """An MSD dataset with a 4D two-channel float image stored as int16 with scl_slope/inter."""
    root = msd_4d_scaled(tmp_path / "msd")
    output = tmp_path / "out"
    with torch.no_grad():
        net = generator_net(2)
    torch.save(net.state_dict(), tmp_path / "g2.pt")
    protector(root, output, tmp_path / "g2.pt", 2).run()
    manifest = assert_protected_copy(root, output, EPS, ct=False)
    written = nib.load(output / "imagesTr/case_a.nii.gz")
    assert written.dataobj.slope == 0.5 and written.dataobj.inter == 10.0
    assert manifest["cases"][0]["images"] == ["imagesTr/case_a.nii.gz"]


def test_refuses_existing_output_and_output_inside_input(flare_data, tmp_path, random_checkpoints):
    output = tmp_path / "out"
    protector(flare_data, output, random_checkpoints[1], 1).run()
    with pytest.raises(VoxShieldInputError, match=r"out: output folder exists; pass --overwrite true"):
        protector(flare_data, output, random_checkpoints[1], 1).run()
    first = (output / "voxshield_manifest.json").stat().st_mtime_ns
    protector(flare_data, output, random_checkpoints[1], 1, overwrite=True).run()
    assert (output / "voxshield_manifest.json").stat().st_mtime_ns != first
    assert_protected_copy(flare_data, output, EPS, ct=True)
    assert not previous_copy(output).exists()  # the replaced copy goes once the new one is complete

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(VoxShieldInputError, match="not a VoxShield output"):
        protector(flare_data, foreign, random_checkpoints[1], 1, overwrite=True).run()
    assert (foreign / "notes.txt").read_text() == "keep me"

    for inside in (flare_data / "protected", flare_data):
        with pytest.raises(VoxShieldInputError, match="inside the input dataset"):
            protector(flare_data, inside, random_checkpoints[1], 1).run()
    assert not (flare_data / "protected").exists()
    with pytest.raises(VoxShieldInputError, match="contains the input dataset"):
        protector(flare_data, tmp_path, random_checkpoints[1], 1, overwrite=True).run()


def test_interrupted_run_resumes(flare_data, tmp_path, random_checkpoints, monkeypatch):
    output = tmp_path / "out"
    run = protector(flare_data, output, random_checkpoints[1], 1)
    original = DatasetProtector._perturb_case
    calls = []

    def crash_on_second_case(self, case):
        calls.append(case.case_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return original(self, case)

    monkeypatch.setattr(DatasetProtector, "_perturb_case", crash_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    monkeypatch.setattr(DatasetProtector, "_perturb_case", original)
    assert not (output / "voxshield_manifest.json").exists()
    assert not list(output.rglob("*.tmp"))
    done = output / "TrainingImg/train_000_0000.nii.gz"
    before = done.stat().st_mtime_ns
    # A rerun with other settings must not mix two generators into one dataset.
    other = tmp_path / "other_generator.pt"
    torch.save(generator_net(1).state_dict(), other)
    with pytest.raises(VoxShieldInputError, match="interrupted run with other settings"):
        protector(flare_data, output, other, 1).run()
    protector(flare_data, output, random_checkpoints[1], 1).run()
    assert done.stat().st_mtime_ns == before  # finished case kept, not redone
    assert_protected_copy(flare_data, output, EPS, ct=True)


def test_empty_label_fails_or_is_copied_on_request(flare_data, tmp_path, random_checkpoints):
    label_path = flare_data / "TrainingMask/train_001.nii.gz"
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), label_path)
    output = tmp_path / "out"
    with pytest.raises(VoxShieldInputError, match=r"train_001.nii.gz: label is empty"):
        protector(flare_data, output, random_checkpoints[1], 1).run()
    assert not output.exists()
    manifest = protector(flare_data, output, random_checkpoints[1], 1, copy_empty_labels=True).run()
    record = {case["case_id"]: case for case in manifest["cases"]}["train_001"]
    assert record["protected"] is False
    image = "TrainingImg/train_001_0000.nii.gz"
    assert filecmp.cmp(output / image, flare_data / image, shallow=False)
    assert_protected_copy(flare_data, output, EPS, ct=True)


def test_nnunet_v2_layout_with_unlabelled_test_images(tmp_path):
    """nnU-Net v2 raw: per-channel files, labels by name, imagesTs copied unchanged."""
    root = tmp_path / "Dataset001_Demo"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for case in ("demo_001", "demo_002"):
        label = np.zeros((32, 32, 16), np.uint8)
        label[6:20, 8:22, 3:12] = 1
        label[20:26, 8:14, 5:9] = 2
        nib.save(nib.Nifti1Image(label, affine), root / f"labelsTr/{case}.nii.gz")
        ct = rng.normal(40, 30, size=label.shape).astype(np.int16)
        mri = rng.gamma(2.0, 100.0, size=label.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(ct, affine), root / f"imagesTr/{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(mri, affine), root / f"imagesTr/{case}_0001.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), affine), root / "imagesTs/demo_009_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "T2"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 2, "file_ending": ".nii.gz",
    }))
    spec = open_dataset(root)
    assert spec.layout == "nnunetv2" and spec.normalisation == ["ct", "mri"]
    assert spec.label_values == [0, 1, 2] and spec.unlabelled_images == ["imagesTs/demo_009_0000.nii.gz"]
    assert spec.cases[0].images == ["imagesTr/demo_001_0000.nii.gz", "imagesTr/demo_001_0001.nii.gz"]
    torch.manual_seed(3)
    torch.save(generator_net(2).state_dict(), tmp_path / "g2.pt")
    output = tmp_path / "out"
    manifest = protector(root, output, tmp_path / "g2.pt", 2).run()
    assert "imagesTs/demo_009_0000.nii.gz" in manifest["copied_files"]
    # verify recomputes each channel's bound: eps * the HU window width (CT), eps * the percentile range (MRI)
    assert verify_copy(root, output) == ([], len(manifest["cases"]))
    for record in manifest["cases"]:
        assert record["bound_source_units"][0] == pytest.approx(EPS * 425.0)
        for name in record["images"]:
            before = nib.load(root / name).get_fdata()
            after = nib.load(output / name).get_fdata()
            assert np.abs(after - before).max() > 0
    assert nib.load(output / "imagesTr/demo_001_0000.nii.gz").get_data_dtype() == np.int16


def test_msd_lists_select_cases(tmp_path, flare_data):
    """Only the chosen dataset.json lists are cases; the rest are copied untouched by protect."""
    root = tmp_path / "msd"
    entries = []
    for index, case in enumerate(("train_000", "train_001", "train_002")):
        for kind, folder, suffix in (("image", "imagesTr", "_0000"), ("label", "labelsTr", "")):
            source = flare_data / ("TrainingImg" if kind == "image" else "TrainingMask") / f"{case}{suffix}.nii.gz"
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{case}.nii.gz").write_bytes(source.read_bytes())
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "pancreas"},
        "training": entries[:2], "test": entries[2:],
    }))
    assert [case.case_id for case in open_dataset(root).cases] == ["train_000", "train_001", "train_002"]
    assert [case.case_id for case in open_dataset(root, lists=["training"]).cases] == ["train_000", "train_001"]


def test_zscore_normalisation_bound(brats_data, tmp_path, random_checkpoints):
    """normalisation zscore: eps is relative to 10 standard deviations of the non-zero voxels."""
    output = tmp_path / "out"
    run = protector(brats_data, output, random_checkpoints[4], 4)
    run.dataset = open_dataset(brats_data, normalisation="zscore")
    manifest = run.run()
    for record in manifest["cases"]:
        scales = []
        for name in record["images"]:
            values = nib.load(brats_data / name).get_fdata()
            foreground = values[values != 0]
            scales.append(10 * foreground.std())
        np.testing.assert_allclose(record["bound_source_units"], EPS * np.array(scales), rtol=1e-9)
        for name, scale in zip(record["images"], scales):
            change = np.abs(nib.load(output / name).get_fdata() - nib.load(brats_data / name).get_fdata())
            assert change.max() <= EPS * scale and change.max() > 0
    assert manifest["dataset"]["normalisation"] == ["zscore"] * 4
