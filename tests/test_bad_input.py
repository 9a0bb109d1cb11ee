"""Every kind of bad input stops protect with one line naming the file and leaves no output: what the
headers show before anything is written, what only the data shows on the read that protects the case,
after which what the run wrote is removed."""

import gzip
import hashlib
import json
import multiprocessing
import re

import nibabel as nib
import numpy as np
import pytest
import torch.distributed as dist

from checks import assert_protected_copy
from conftest import EPS, run_bundle
from custom.data import open_dataset
from custom.nifti_io import VoxShieldInputError
from custom.protect import DatasetProtector, previous_copy
from test_protect import protector

IMAGE = "TrainingImg/train_001_0000.nii.gz"
LABEL = "TrainingMask/train_001.nii.gz"
LAST_IMAGE = "TrainingImg/train_002_0000.nii.gz"  # the image of the last of flare_data's three cases


def rewrite(path, array, affine=None):
    original = nib.load(path)
    nib.save(nib.Nifti1Image(array, original.affine if affine is None else affine), path)


def missing_image(root):
    (root / IMAGE).unlink()
    return IMAGE, "file not found"


def corrupt_nifti(root):
    (root / IMAGE).write_bytes(b"this is not a nifti file")
    return IMAGE, "corrupt NIfTI"


def truncated_gzip(root):
    data = gzip.decompress((root / IMAGE).read_bytes())
    (root / IMAGE).write_bytes(gzip.compress(data[: len(data) // 2]))
    return IMAGE, "corrupt NIfTI"


def shape_mismatch(root, name=IMAGE):
    rewrite(root / name, np.zeros((32, 30, 16), np.int16))
    return name, "differs from label shape"


def affine_mismatch(root):
    image = nib.load(root / IMAGE)
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    rewrite(root / IMAGE, np.asanyarray(image.dataobj), shifted)
    return IMAGE, "affine differs from the label's affine"


def nan_values(root, name=IMAGE):
    data = nib.load(root / name).get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    rewrite(root / name, data)
    return name, "contains NaN or Inf"


def inf_values(root):
    data = nib.load(root / IMAGE).get_fdata().astype(np.float32)
    data[4, 4, 4] = np.inf
    rewrite(root / IMAGE, data)
    return IMAGE, "contains NaN or Inf"


def two_channels(root):
    data = np.asanyarray(nib.load(root / IMAGE).dataobj)
    rewrite(root / IMAGE, np.stack([data, data], axis=-1))
    return IMAGE, "does not hold 1 channel"


def image_2d(root):
    rewrite(root / IMAGE, np.zeros((32, 32), np.int16))
    return IMAGE, "2D image"


def label_4d(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj)
    rewrite(root / LABEL, data[..., None].repeat(2, -1))
    return LABEL, "label must be a 3D volume"


def non_integer_label(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5
    rewrite(root / LABEL, data)
    return LABEL, "non-integer values"


def unknown_label_value(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj).copy()
    data[0, 0, 0] = 9
    rewrite(root / LABEL, data)
    return LABEL, r"label values \[9\] are not in the dataset's labels"


def empty_label(root):
    data = np.asanyarray(nib.load(root / LABEL).dataobj)
    rewrite(root / LABEL, np.zeros_like(data))
    return LABEL, "label is empty"


BREAKAGES = [
    missing_image, corrupt_nifti, truncated_gzip, shape_mismatch, affine_mismatch, nan_values, inf_values,
    two_channels, image_2d, label_4d, non_integer_label, unknown_label_value, empty_label,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_bad_case_stops_before_any_write(breakage, flare_data, tmp_path, random_checkpoints):
    name, message = breakage(flare_data)
    output = tmp_path / "out"
    with pytest.raises(VoxShieldInputError, match=message) as raised:
        protector(flare_data, output, random_checkpoints[1], 1).run()
    text = str(raised.value)
    assert text.startswith(str(flare_data / name)) and "\n" not in text
    assert not output.exists()


def test_dataset_level_errors(tmp_path, flare_data, random_checkpoints):
    with pytest.raises(VoxShieldInputError, match="dataset folder not found"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VoxShieldInputError, match="cannot tell the dataset layout"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text("{not json")
    with pytest.raises(VoxShieldInputError, match=r"empty/dataset.json: unreadable dataset.json"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text(json.dumps({"training": []}))
    with pytest.raises(VoxShieldInputError, match="not a valid msd dataset.json"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(VoxShieldInputError, match="missing.pt: voxshield checkpoint not found"):
        protector(flare_data, tmp_path / "out", tmp_path / "missing.pt", 1).run()
    assert not (tmp_path / "out").exists()


def protect_command(dataset_dir, output, checkpoint, *options):
    """protect run as a user runs it, in a fresh process; ``options``: more `--key value` arguments."""
    return run_bundle("protect", "--dataset_dir", str(dataset_dir), "--checkpoint", str(checkpoint),
                      "--output_dir", str(output), *options)


def reported_error(result):
    """The last line a failed command wrote to stderr; its exit status must be non-zero."""
    assert result.returncode != 0
    return result.stderr.strip().splitlines()[-1]


def test_cli_reports_one_line_and_fails(flare_data, tmp_path, random_checkpoints):
    nan_values(flare_data)
    output = tmp_path / "out"
    result = protect_command(flare_data, output, random_checkpoints[1])
    assert reported_error(result) == f"voxshield: error: {flare_data / IMAGE}: contains NaN or Inf values."
    assert "Traceback" not in result.stderr
    assert not output.exists()
    result = run_bundle(
        "training", "--dataset_dir", str(flare_data), "--ckpt_dir", str(tmp_path / "ckpt"), "--epochs", "1",
    )
    assert reported_error(result) == f"voxshield: error: {flare_data / IMAGE}: contains NaN or Inf values."
    assert not (tmp_path / "ckpt" / "generator.pt").exists()


def recorded_cases(monkeypatch):
    """The ids of the cases DatasetProtector protects from now on, in order (kept in the returned list)."""
    protected, original = [], DatasetProtector._perturb_case

    def recording(self, case):
        write = original(self, case)
        protected.append(case.case_id)
        return write

    monkeypatch.setattr(DatasetProtector, "_perturb_case", recording)
    return protected


def files_under(folder):
    """Every file below ``folder``: relative path -> sha256 of its bytes."""
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in folder.rglob("*") if path.is_file()}


def interrupt_after_first_case(monkeypatch, run):
    """Run the DatasetProtector ``run`` as if the user pressed Ctrl-C once it has protected train_000."""
    original = DatasetProtector._perturb_case

    def interrupting(self, case):
        if case.case_id != "train_000":
            raise KeyboardInterrupt
        return original(self, case)

    with monkeypatch.context() as patch:
        patch.setattr(DatasetProtector, "_perturb_case", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run.run()


@pytest.mark.parametrize(
    "breakage, written_first", [(shape_mismatch, []), (nan_values, ["train_000", "train_001"])],
    ids=["header_shape", "data_nan"],
)
def test_bad_last_case_leaves_no_output(breakage, written_first, flare_data, tmp_path, random_checkpoints,
                                        monkeypatch):
    """A header problem in the last case stops protect before it writes anything; bad data, which only the
    read that protects the case shows, once the first two cases are written: they are then removed with
    the output folder."""
    name, message = breakage(flare_data, LAST_IMAGE)
    output = tmp_path / "out"
    protected = recorded_cases(monkeypatch)
    with pytest.raises(VoxShieldInputError, match=message) as raised:
        protector(flare_data, output, random_checkpoints[1], 1).run()
    assert str(raised.value).startswith(str(flare_data / name))
    assert protected == written_first and not output.exists()


def test_bad_data_in_the_last_case_from_the_command_line(flare_data, tmp_path, random_checkpoints):
    """One line naming the file, a non-zero exit and no output folder; a folder that was there before
    the run stays, emptied."""
    name, message = nan_values(flare_data, LAST_IMAGE)
    output = tmp_path / "out"
    result = protect_command(flare_data, output, random_checkpoints[1])
    assert reported_error(result) == f"voxshield: error: {flare_data / name}: contains NaN or Inf values."
    assert not output.exists()
    output.mkdir()
    with pytest.raises(VoxShieldInputError, match=message):
        protector(flare_data, output, random_checkpoints[1], 1).run()
    assert output.is_dir() and not any(output.iterdir())


def test_bad_data_when_resuming_leaves_the_interrupted_run_as_it_was(flare_data, tmp_path, random_checkpoints,
                                                                     monkeypatch):
    """A resumed run that meets bad data removes the cases it added: the interrupted run is left as it
    was, and resumes once the data is fixed."""
    output = tmp_path / "out"
    interrupt_after_first_case(monkeypatch, protector(flare_data, output, random_checkpoints[1], 1))
    interrupted = files_under(output)
    clean = (flare_data / LAST_IMAGE).read_bytes()
    name, message = nan_values(flare_data, LAST_IMAGE)
    protected = recorded_cases(monkeypatch)
    with pytest.raises(VoxShieldInputError, match=message):
        protector(flare_data, output, random_checkpoints[1], 1).run()
    assert protected == ["train_001"] and files_under(output) == interrupted  # train_001 written, then removed

    (flare_data / name).write_bytes(clean)  # fixed: the interrupted run still resumes
    protector(flare_data, output, random_checkpoints[1], 1).run()
    assert protected == ["train_001", "train_001", "train_002"]
    assert_protected_copy(flare_data, output, EPS, ct=True)


def test_bad_data_in_an_overwrite_run_puts_back_the_copy_it_replaces(flare_data, tmp_path, random_checkpoints):
    """--overwrite true keeps the finished copy aside until the new one is complete: bad data in the last
    case, met once two cases of the new copy are written, puts it back byte for byte."""
    output = tmp_path / "out"
    protector(flare_data, output, random_checkpoints[1], 1).run()
    finished = files_under(output)
    name, _ = nan_values(flare_data, LAST_IMAGE)
    result = protect_command(flare_data, output, random_checkpoints[1], "--overwrite", "true")
    assert reported_error(result) == f"voxshield: error: {flare_data / name}: contains NaN or Inf values."
    assert files_under(output) == finished and not previous_copy(output).exists()


def test_interrupted_overwrite_run(flare_data, tmp_path, random_checkpoints, monkeypatch):
    """An interrupted --overwrite run leaves its new copy resumable and the copy it replaces in
    OUT.voxshield-previous. Starting over with --overwrite true discards the new copy and keeps the old
    one aside (bad data puts it back); resuming keeps both as they were on bad data and deletes the old
    one on success. The old copy alone, with no run to resume, is refused by name."""
    output, previous = tmp_path / "out", previous_copy(tmp_path / "out")
    protector(flare_data, output, random_checkpoints[1], 1).run()
    finished = files_under(output)
    clean = (flare_data / LAST_IMAGE).read_bytes()
    interrupt_after_first_case(monkeypatch, protector(flare_data, output, random_checkpoints[1], 1, overwrite=True))
    assert files_under(previous) == finished and (output / ".voxshield_progress").is_dir()

    name, message = nan_values(flare_data, LAST_IMAGE)
    with pytest.raises(VoxShieldInputError, match=message):
        protector(flare_data, output, random_checkpoints[1], 1, overwrite=True).run()
    assert files_under(output) == finished and not previous.exists()

    (flare_data / name).write_bytes(clean)
    interrupt_after_first_case(monkeypatch, protector(flare_data, output, random_checkpoints[1], 1, overwrite=True))
    interrupted = files_under(output)
    nan_values(flare_data, LAST_IMAGE)
    with pytest.raises(VoxShieldInputError, match=message):
        protector(flare_data, output, random_checkpoints[1], 1).run()
    assert files_under(output) == interrupted and files_under(previous) == finished
    (flare_data / name).write_bytes(clean)
    protected = recorded_cases(monkeypatch)
    protector(flare_data, output, random_checkpoints[1], 1).run()
    assert protected == ["train_001", "train_002"] and not previous.exists()
    assert_protected_copy(flare_data, output, EPS, ct=True)

    output.rename(previous)  # as a run stopped between moving the old copy aside and starting the new one
    for overwrite in (False, True):
        with pytest.raises(VoxShieldInputError, match=re.escape(f"{previous}: the copy an interrupted --overwrite run")):
            protector(flare_data, output, random_checkpoints[1], 1, overwrite=overwrite).run()
    assert not output.exists() and files_under(previous)


def _protect_on_rank(rank, store, dataset_dir, output, checkpoint, errors, overwrite):
    """Rank ``rank`` of two gloo processes running protect; writes the VoxShieldInputError it raises to errors/RANK."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        protector(dataset_dir, output, checkpoint, 1, overwrite=overwrite).run()
    except VoxShieldInputError as error:
        (errors / str(rank)).write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_bad_data_on_one_rank_stops_every_rank(overwrite, flare_data, tmp_path, random_checkpoints):
    """train_001 is rank 1's only case: its NaN stops rank 0 too once that has protected its two cases;
    both report the file and the output is removed, or, replacing a finished copy, put back as it was."""
    output, errors = tmp_path / "out", tmp_path / "errors"
    if overwrite:
        protector(flare_data, output, random_checkpoints[1], 1).run()
    before = files_under(output)  # none without the finished copy
    name, _ = nan_values(flare_data)
    errors.mkdir()
    spawn = multiprocessing.get_context("spawn")
    ranks = [
        spawn.Process(target=_protect_on_rank,
                      args=(rank, tmp_path / "store", flare_data, output, random_checkpoints[1], errors, overwrite))
        for rank in range(2)
    ]
    for process in ranks:
        process.start()
    try:
        for process in ranks:
            process.join(timeout=300)
        assert [process.exitcode for process in ranks] == [0, 0]
    finally:
        for process in ranks:
            process.kill()
    reported = [(errors / str(rank)).read_text() for rank in range(2)]
    assert reported == [f"{flare_data / name}: contains NaN or Inf values."] * 2
    assert output.exists() == overwrite and files_under(output) == before
    assert not previous_copy(output).exists()
