"""Small helpers the bundle configs call: where the bundle lives, the demo data, CLI flags."""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from custom.demo import make_demo_dataset
from custom.nifti_io import VoxShieldInputError, write_atomic

TRAINING_RECORD = "training_config.json"
BUNDLE_CONFIG = "bundle.json"
# workflow -> the shared configs layered after the bundle's own bundle.json, in order; an exported
# model-zoo bundle holds the merged result under the last name (configs/protect.json ...)
WORKFLOW_CONFIGS = {
    "training": ("train.json",),
    "protect": ("train.json", "protect.json"),
    "evaluate": ("evaluate.json",),
    "report": ("report.json",),
}


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


def shared_configs() -> Path:
    """The configs both bundles share: configs/ in this repository, custom/configs in an installed package."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "configs"
    return checkout if (checkout / "train.json").is_file() else package / "configs"


def config_files(name: str, workflow: str) -> list[str]:
    """
    The config files that make up ``workflow`` (training, protect, evaluate, report) of bundle
    ``name``, in the order ``monai.bundle run --config_file`` merges them: the bundle's
    configs/bundle.json (its folder, demo data, layout and normalisation), then the shared configs. An exported model-zoo
    bundle has no bundle.json: its configs/<workflow>.json is already the merged, self-contained file.
    """
    configs = Path(bundle_root(name)) / "configs"
    layers = WORKFLOW_CONFIGS[workflow]
    if not (configs / BUNDLE_CONFIG).is_file():
        return [str(configs / layers[-1])]
    return [str(configs / BUNDLE_CONFIG)] + [str(shared_configs() / layer) for layer in layers]


def shared_defaults(settings: Sequence[str], networks: Sequence[str]) -> dict:
    """
    The project's defaults, read from the one place that sets them, the shared configs/train.json.

    Args:
        settings: top-level keys whose values are resolved (``"eps": "$4 / 255"`` -> 0.0157).
        networks: network definitions (e.g. ``generator_def``) whose literal arguments are returned
            as written, without building the network (its channel counts depend on the dataset).

    Returns:
        {key: value} for each setting, then {definition: {argument: value}} for each network.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(shared_configs() / "train.json"))
    defaults = {key: parser.get_parsed_content(key) for key in settings}
    for name in networks:
        defaults[name] = {argument: value for argument, value in parser[name].items()
                          if not argument.startswith("_") and not (isinstance(value, str) and value[:1] in "$@%")}
    return defaults


def network_record(network: torch.nn.Module) -> dict:
    """
    What a network was built with, for the training record: its class, its constructor arguments
    that the instance keeps as attributes (MONAI's UNet keeps channels, strides, num_res_units, norm,
    act ...), and its parameter count, so runs with another architecture can be told apart.
    """
    arguments = inspect.signature(type(network).__init__).parameters
    kept = {name: _json_value(getattr(network, name)) for name in arguments if name != "self" and hasattr(network, name)}
    return {
        "class": f"{type(network).__module__}.{type(network).__qualname__}",
        **kept,
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
    }


def _json_value(value):
    """A constructor argument as JSON: scalars as they are, sequences as lists, anything else as its repr."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    return repr(value)


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
