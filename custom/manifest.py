"""The manifest of a protected copy (voxshield_manifest.json): how protect made it, read back by
evaluate, report and the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from custom.data import DatasetSpec
from custom.metrics import PSNR_DESCRIPTION, SSIM_DESCRIPTION
from custom.nifti_io import VoxShieldInputError, write_atomic
from custom.provenance import software_versions

MANIFEST_NAME = "voxshield_manifest.json"
MANIFEST_FORMAT = "voxshield-manifest/1"


def fitted_record(record: dict) -> dict | None:
    """The "fitted" entry of a manifest, or of a results file's protection block (a copy of it): the
    checkpoint and its training record; None for a training-free method. Files written before the
    key was renamed call it "generator"."""
    return record.get("fitted") or record.get("generator")


def build_manifest(
    dataset: DatasetSpec,
    method: str,
    parameters: dict,
    eps: float,
    fitted: dict | None,
    cases: list[dict],
    copied_files: dict[str, str],
) -> dict:
    """
    The manifest of a protected copy, stamped with the current UTC time and software versions.

    Args:
        dataset: the source dataset (its root, layout, channels and normalisation are recorded).
        method: the protection method's name.
        parameters: the perturbation settings and the method's own settings.
        eps: the bound in normalised units.
        fitted: the checkpoint and its training record (see fitted_record); None for a training-free method.
        cases: one record per case, as protect writes them.
        copied_files: relative path -> sha256 of every file copied unchanged.
    """
    return {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "parameters": parameters,
        "eps_normalised": eps,
        "fitted": fitted,
        "software": software_versions(),
        "dataset": {
            "source": str(dataset.root),
            "layout": dataset.layout,
            "channels": dataset.channel_names,
            "normalisation": dataset.normalisation,
            "ct_window_hu": list(dataset.ct_window),
            "mri_percentiles": list(dataset.mri_percentiles),
        },
        "metric_definitions": {
            "psnr_db_volume": PSNR_DESCRIPTION + "; all voxels",
            "psnr_db_roi": PSNR_DESCRIPTION + "; ROI voxels only",
            "ssim_3d_volume": SSIM_DESCRIPTION + "; whole volume",
            "ssim_3d_roi": SSIM_DESCRIPTION + "; ROI voxels only",
            "max_abs_delta_normalised": "largest |protected - source| / normalisation scale; <= eps",
        },
        "cases": cases,
        "copied_files": copied_files,
    }


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest`` atomically as FOLDER/voxshield_manifest.json."""
    write_atomic(Path(folder) / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: str | os.PathLike) -> dict:
    """
    The manifest of the protected copy in ``folder``.

    Raises:
        VoxShieldInputError: naming the file, when it is missing, unreadable or lists no cases.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        case_ids = [entry["case_id"] for entry in manifest["cases"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise VoxShieldInputError(f"{path}: missing or unreadable protection manifest ({error}).") from error
    if not case_ids:
        raise VoxShieldInputError(f"{path}: the manifest lists no cases.")
    return manifest


def manifest_protection(folder: str | os.PathLike) -> dict | None:
    """What a protected copy says of its making (method, parameters, fitted: the checkpoint and its
    training record, or None for a training-free method), from its manifest; None for clean data.
    An older manifest's "generator" entry is read as "fitted" (see fitted_record)."""
    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    content = json.loads(manifest.read_text())
    return {"method": content.get("method"), "parameters": content.get("parameters"), "fitted": fitted_record(content)}
