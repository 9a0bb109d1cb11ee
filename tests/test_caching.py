"""The cache_rate that training and evaluate default to (custom.caching): the share of the cases whose
decoded images and labels fit in the memory the cache may use, said in one log line; and caching saves
reading only: a training epoch gives the same losses with the cache off as with it on."""

import logging

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_in_process
from custom import caching
from custom.data import open_dataset
from custom.nifti_io import VoxShieldInputError

# The conftest demo cases are 32 x 32 x 16 voxels; the cache holds each image channel (FLARE: 1 CT
# channel, BraTS: 4 MRI channels) and the label as float32, 4 bytes a voxel.
FLARE_CASE_BYTES = 32 * 32 * 16 * (1 + 1) * 4
BRATS_CASE_BYTES = 32 * 32 * 16 * (4 + 1) * 4
NARROW_SURROGATE = ["--surrogate_def#channels", "[8,16,16,32,32]"]


# flare_data has 3 cases; the cache may use half the available memory
@pytest.mark.parametrize("available, rate, line_rate, cached", [
    (2 * (3 * FLARE_CASE_BYTES + 100), 1.0, "1", 3),
    (2 * (2 * FLARE_CASE_BYTES), 2 / 3, "0.666667", 2),  # exactly two cases' bytes: both fit
    (2 * (FLARE_CASE_BYTES - 1), 0.0, "0", 0),
])
def test_cache_rate_is_the_share_of_cases_that_fits(flare_data, monkeypatch, caplog, available, rate, line_rate,
                                                    cached):
    monkeypatch.setattr(caching, "available_memory_bytes", lambda: available)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with caplog.at_level(logging.INFO, logger="custom.caching"):
        assert caching.cache_rate_for(open_dataset(flare_data)) == rate
    assert [record.getMessage() for record in caplog.records] == [
        f"cache_rate {line_rate}: caching {cached} of 3 cases of {flare_data}; all of them need "
        f"{3 * FLARE_CASE_BYTES:,} bytes as float32 images and labels; this process's cache may use "
        f"{available // 2:,} bytes (0.5 x {available:,} bytes available / local process count 1); "
        "--cache_rate overrides this."
    ]


def test_processes_on_one_machine_share_the_cache_memory(brats_data, monkeypatch):
    """Under torchrun every local process caches its own copy: two of them get half the budget each,
    here room for one of brats_data's two 4-channel cases."""
    available = 2 * 2 * (BRATS_CASE_BYTES + 100)
    monkeypatch.setattr(caching, "available_memory_bytes", lambda: available)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert caching.cache_rate_for(open_dataset(brats_data)) == 1.0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert caching.cache_rate_for(open_dataset(brats_data)) == 0.5


def test_available_memory_is_memavailable_and_its_absence_is_reported(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000000 kB\nMemAvailable:    2500000 kB\n")
    monkeypatch.setattr(caching, "MEMINFO", meminfo)
    assert caching.available_memory_bytes() == 2500000 * 1024
    meminfo.write_text("MemTotal:       32000000 kB\n")
    with pytest.raises(VoxShieldInputError, match=f"{meminfo}: no MemAvailable, so the cache cannot be sized"):
        caching.available_memory_bytes()


def first_epoch_losses(log_dir):
    """Every loss fit_step reported, per TensorBoard tag, in iteration order."""
    (events,) = log_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_training_without_the_cache_gives_the_same_losses(flare_data, tmp_path):
    """The default (all of flare_data fits) caches every case, --cache_rate 0 none: the same crops
    reach the same networks, so the first epoch's losses are equal."""
    runs = {}
    for name, override in (("cached", []), ("uncached", ["--cache_rate", "0"])):
        run = run_in_process("training", "--dataset_dir", str(flare_data), "--ckpt_dir", str(tmp_path / name),
                             "--log_dir", str(tmp_path / name / "logs"), "--epochs", "1",
                             "--patch_size", "[32,32,16]", *NARROW_SURROGATE, *override)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = run
    assert "cache_rate 1: caching 3 of 3 cases" in runs["cached"].stdout
    assert "Loading dataset: 100%" in runs["cached"].stderr  # CacheDataset's progress bar as it caches
    assert "custom.caching" not in runs["uncached"].stdout and "Loading dataset" not in runs["uncached"].stderr
    losses = {name: first_epoch_losses(tmp_path / name / "logs") for name in runs}
    assert set(losses["cached"]) == {"loss", "surrogate_loss", "segmentation_loss", "spd_loss", "isc_loss"}
    assert len(losses["cached"]["loss"]) == 2  # 3 cases in batches of 2
    assert losses["cached"] == losses["uncached"]
