"""Small helpers the bundle configs call: where the bundle lives, the demo data, CLI flags."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from custom.demo import make_demo_dataset
from custom.nifti_io import VoxShieldInputError, write_atomic

TRAINING_RECORD = "training_config.json"


def bundle_root(name: str) -> str:
    """
    The bundle's folder, whatever the working directory: in an exported model-zoo bundle custom/
    sits inside the bundle itself; in this repository the bundle is bundles/<name>; an installed
    package (pip install .) keeps it as package data in custom/bundles/<name>.
    """
    package = Path(__file__).resolve().parent
    if (package.parent / "configs" / "metadata.json").is_file():
        return str(package.parent)
    installed = package / "bundles" / name
    if not (package.parent / "bundles" / name).is_dir() and installed.is_dir():
        return str(installed)
    return str(package.parent / "bundles" / name)


def demo_dataset(root: str, layout: str) -> str:
    """The bundle's built-in demo dataset (generated on first use into <bundle>/demo_data)."""
    return str(make_demo_dataset(Path(root) / "demo_data", layout))


def as_bool(value: bool | str | int, name: str) -> bool:
    """A CLI flag as a bool: fire passes `--flag true` as the string "true", which is truthy as is."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no", ""):
            return False
        raise ValueError(f"--{name} must be true or false, got {value!r}.")
    return bool(value)


def brief_input_errors() -> None:
    """
    Make a bad-input failure print one line naming the file (and exit non-zero) instead of a
    traceback through MONAI's config resolver; every other exception keeps its full traceback.
    Called from the configs' ``initialize``.
    """
    default_hook = sys.excepthook

    def hook(kind, error, traceback):
        cause = error
        while cause is not None and not isinstance(cause, VoxShieldInputError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            default_hook(kind, error, traceback)
        else:
            print(f"voxshield: error: {cause}", file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            # Exit now: a data-loading thread pool (MONAI's CacheDataset) may still be inside C++ code,
            # and unwinding it at interpreter shutdown aborts with "terminate called ..." after our line.
            os._exit(1)

    sys.excepthook = hook


def record_training(ckpt_dir: str, settings: dict) -> None:
    """Write CKPT/training_config.json beside the checkpoints, so protect's manifest (and the reports
    built from it) can say how the generator was trained (e.g. which ablation). Under torch.distributed only rank 0 writes it."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
        return
    write_atomic(Path(ckpt_dir) / TRAINING_RECORD, json.dumps(settings, indent=1, default=str).encode())
