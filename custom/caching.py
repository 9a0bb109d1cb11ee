"""How much of a dataset training and evaluate keep decoded in RAM (CacheDataset's cache_rate), chosen
from the dataset's size against the memory available."""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path

from custom.data import Case, DatasetSpec
from custom.nifti_io import VoxShieldInputError, load_nifti

# The cache may take half the available memory: the networks, their activations, the data loader and
# the rest of the machine need the other half.
CACHE_MEMORY_FRACTION = 0.5
FLOAT32_BYTES = 4
MEMINFO = Path("/proc/meminfo")

logger = logging.getLogger(__name__)


def available_memory_bytes() -> int:
    """The kernel's estimate of the memory new allocations can take without swapping (MemAvailable)."""
    if MEMINFO.is_file():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # given in kB
    raise VoxShieldInputError(f"{MEMINFO}: no MemAvailable, so the cache cannot be sized; pass --cache_rate.")


def cached_case_bytes(spec: DatasetSpec, case: Case) -> int:
    """What the cache holds of a case, as custom.data.LoadCased gives it: the image channels and the
    label, float32, on the grid that the label's header gives (the voxels are not read)."""
    voxels = math.prod(load_nifti(spec.root / case.label).shape)
    return voxels * (spec.num_channels + 1) * FLOAT32_BYTES


def cache_rate_for(spec: DatasetSpec) -> float:
    """
    The cache_rate for CacheDataset over ``spec``'s cases: 1.0 when all of them fit in
    CACHE_MEMORY_FRACTION of the available memory (split between the processes that torchrun started
    on this machine: each caches its own copy), else the fraction of them (taken in order, as
    CacheDataset caches them) that fits, possibly 0.0. Logs the choice, what caching everything
    needs and what is available.
    """
    sizes = [cached_case_bytes(spec, case) for case in spec.cases]
    available = available_memory_bytes()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine each cache
    budget = int(available * CACHE_MEMORY_FRACTION / processes)
    fitting = sum(1 for total in itertools.accumulate(sizes) if total <= budget)
    rate = fitting / len(sizes)
    logger.info(
        f"cache_rate {rate:g}: caching {int(len(sizes) * rate)} of {len(sizes)} cases "  # CacheDataset's count
        f"of {spec.root}; all of them need {sum(sizes):,} bytes as float32 images and labels; this process's "
        f"cache may use {budget:,} bytes ({CACHE_MEMORY_FRACTION:g} x {available:,} bytes available / local "
        f"process count {processes}); --cache_rate overrides this."
    )
    return rate
