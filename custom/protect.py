"""Writing the protected copy of a dataset: native-grid perturbation in source units, exact bound,
byte-identical labels and outside-ROI voxels, atomic files, resumable runs and a manifest."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from custom.bundle_utils import TRAINING_RECORD
from custom.data import Case, DatasetSpec, load_case, normalise
from custom.metrics import PSNR_DESCRIPTION, SSIM_DESCRIPTION, psnr, ssim_3d
from custom.nifti_io import (
    VoxShieldInputError,
    copy_atomic,
    load_nifti,
    read_stored,
    sha256,
    slope_inter,
    write_atomic,
    write_stored_like,
)
from custom.protectors import Protector
from custom.provenance import software_versions

MANIFEST_NAME = "voxshield_manifest.json"
PROGRESS_DIR = ".voxshield_progress"


def fitted_record(record: dict) -> dict | None:
    """The "fitted" entry of a manifest, or of a results file's protection block (a copy of it): the
    checkpoint and its training record; None for a training-free method. Files written before the
    key was renamed call it "generator"."""
    return record.get("fitted") or record.get("generator")


def bounded_stored_values(stored: np.ndarray, delta: np.ndarray, slope: float, bound: float) -> np.ndarray:
    """
    Add a perturbation given in source units to values stored as ``stored * slope + inter`` and
    return new stored values, in the stored dtype, whose source-unit change never exceeds ``bound``:
    integers round towards the source value, floats step one ulp back towards it where the cast
    rounded outwards, and integer results saturate at the dtype's range.

    Args:
        stored: on-disk values, any NIfTI dtype.
        delta: same shape, change in source units (already within ``bound``).
        slope: the file's scl_slope (1 when unset).
        bound: the largest allowed |change| in source units.
    """
    step = delta / slope
    if np.issubdtype(stored.dtype, np.integer):
        limits = np.iinfo(stored.dtype)
        moved = np.clip(stored.astype(np.float64) + np.trunc(step), limits.min, limits.max)
        return moved.astype(stored.dtype)
    moved = (stored.astype(np.float64) + step).astype(stored.dtype)
    while True:
        outside = np.abs((moved.astype(np.float64) - stored.astype(np.float64)) * slope) > bound
        if not outside.any():
            return moved
        moved[outside] = np.nextafter(moved[outside], stored[outside])


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DatasetProtector:
    """
    Publishes a protected copy of a dataset with any protection method (custom.protectors).

    Each labelled case is loaded on its native voxel grid and normalised as in training; the
    protector turns it into its bounded perturbation, which is mapped back to the source's units
    with that case's normalisation scale and added to the values as stored on disk. Labels,
    dataset.json and every other file are copied byte for byte. Cases are sharded across ranks
    when torch.distributed is initialised.

    Args:
        dataset: the source dataset (see custom.data.open_dataset).
        output_dir: where the copy goes; must not be inside the dataset (nor hold it).
        protector: the method, e.g. custom.protectors.VoxShield.
        checkpoint: what fitting wrote (CKPT/generator.pt for VoxShield, CKPT/surrogate.pt for the
            surrogate-based baselines); ignored for training-free methods.
        device: where the protector runs.
        overwrite: replace an existing VoxShield output at ``output_dir``.
        copy_empty_labels: copy cases with an empty label unchanged instead of failing.
    """

    def __init__(
        self,
        dataset: DatasetSpec,
        output_dir: str | Path,
        protector: Protector,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        overwrite: bool = False,
        copy_empty_labels: bool = False,
    ) -> None:
        self.dataset = dataset
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.protector = protector
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.device = torch.device(device)
        self.overwrite = overwrite
        self.copy_empty_labels = copy_empty_labels

    # ---- checks, before anything is written -------------------------------------------------
    def _check_output_location(self) -> None:
        source, output = self.dataset.root, self.output_dir
        if output == source or source in output.parents:
            raise VoxShieldInputError(f"{output}: output folder is inside the input dataset {source}.")
        if output in source.parents:
            raise VoxShieldInputError(f"{output}: output folder contains the input dataset {source}.")

    def _prepare_output(self, run_info: dict) -> None:
        """Create the output folder, resume an interrupted run into it, or refuse to clobber it."""
        output = self.output_dir
        progress = output / PROGRESS_DIR
        if output.exists() and any(output.iterdir()):
            if progress.is_dir() and not self.overwrite:
                previous = json.loads((progress / "run.json").read_text())
                if previous != run_info:
                    raise VoxShieldInputError(
                        f"{output}: holds an interrupted run with other settings; pass --overwrite true."
                    )
                return
            if not self.overwrite:
                raise VoxShieldInputError(f"{output}: output folder exists; pass --overwrite true to replace it.")
            if not ((output / MANIFEST_NAME).is_file() or progress.is_dir()):
                raise VoxShieldInputError(f"{output}: not a VoxShield output, refusing to overwrite it.")
            shutil.rmtree(output)
        progress.mkdir(parents=True, exist_ok=True)
        write_atomic(progress / "run.json", json.dumps(run_info).encode())

    # ---- one case ------------------------------------------------------------------------------
    def _perturbation_for(self, normalised: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = torch.as_tensor(normalised[None], device=self.device)
        label_tensor = torch.as_tensor(label[None, None], device=self.device)
        delta = self.protector.perturb(image, label_tensor).detach()
        support = self.protector.support(label_tensor)[0].cpu().numpy().astype(bool)
        return delta[0].double().cpu().numpy() * support, support[0]

    def _protect_case(self, case: Case) -> dict:
        root, output = self.dataset.root, self.output_dir
        loaded = load_case(self.dataset, case, allow_empty_label=self.copy_empty_labels)
        files = {}
        if not (loaded.label > 0).any():
            for name in case.images + [case.label]:
                copy_atomic(root / name, output / name)
                files[name] = sha256(output / name)
            return {
                "case_id": case.case_id, "images": case.images, "label": case.label,
                "protected": False, "reason": "empty label", "files": files,
            }

        clean = normalise(loaded.image, loaded.offsets, loaded.scales)
        delta = self._perturbation_for(clean, loaded.label)
        delta_source, roi = delta[0] * loaded.scales.reshape(-1, 1, 1, 1), delta[1]
        bounds = self.protector.perturbation.eps * loaded.scales
        protected_source = np.empty_like(loaded.image)
        channel = 0
        for name in case.images:
            image = load_nifti(root / name)
            stored = read_stored(image, root / name)
            slope, inter = slope_inter(image)
            count = 1 if stored.ndim == 3 else stored.shape[3]
            change = np.moveaxis(delta_source[channel : channel + count], 0, -1).reshape(stored.shape)
            new = np.empty_like(stored)
            for index in range(count):  # each channel has its own bound
                part = (slice(None),) * 3 + ((index,) if stored.ndim == 4 else ())
                new[part] = bounded_stored_values(stored[part], change[part], slope, bounds[channel + index])
            write_stored_like(root / name, image, new, output / name)
            files[name] = sha256(output / name)
            values = np.moveaxis((new.astype(np.float64) * slope + inter).reshape(stored.shape[:3] + (-1,)), -1, 0)
            protected_source[channel : channel + count] = values
            channel += count
        copy_atomic(root / case.label, output / case.label)
        files[case.label] = sha256(output / case.label)

        change_source = np.abs(protected_source - loaded.image)
        protected = normalise(protected_source, loaded.offsets, loaded.scales)
        return {
            "case_id": case.case_id,
            "images": case.images,
            "label": case.label,
            "protected": True,
            "max_abs_delta_normalised": float((change_source / loaded.scales.reshape(-1, 1, 1, 1)).max()),
            "max_abs_delta_source_units": change_source.reshape(len(loaded.scales), -1).max(axis=1).tolist(),
            "bound_source_units": bounds.tolist(),
            "normalisation_offset": loaded.offsets.tolist(),
            "normalisation_scale": loaded.scales.tolist(),
            "fraction_voxels_changed": float((change_source > 0).mean()),
            "roi_fraction": float(roi.mean()),
            "psnr_db_volume": psnr(clean, protected),
            "psnr_db_roi": psnr(clean, protected, roi),
            "ssim_3d_volume": ssim_3d(clean, protected),
            "ssim_3d_roi": ssim_3d(clean, protected, roi),
            "files": files,
        }

    def _case_done(self, case: Case) -> bool:
        record_path = self.output_dir / PROGRESS_DIR / f"{case.case_id}.json"
        if not record_path.is_file():
            return False
        record = json.loads(record_path.read_text())
        return all(
            (self.output_dir / name).is_file() and sha256(self.output_dir / name) == digest
            for name, digest in record["files"].items()
        )

    def _training_record(self) -> dict | None:
        """How the method was fitted, from the training_config.json that training writes beside its checkpoint."""
        record = self.checkpoint.with_name(TRAINING_RECORD)
        return json.loads(record.read_text()) if record.is_file() else None

    def _check_fitted_perturbation(self, training: dict) -> None:
        """The noise was fitted for one bound and support: protecting with others would publish noise
        that was never optimised for them. Settings missing from an older record are not checked."""
        differing = [
            f"{name} {training[name]!r} at training, {value!r} here"
            for name, value in self.protector.perturbation.settings().items()
            if name in training and training[name] != value
        ]
        if differing:
            raise VoxShieldInputError(
                f"{self.checkpoint}: fitted with other perturbation settings ({'; '.join(differing)}); "
                "pass the same values to training and protect."
            )

    def _load_checkpoint(self) -> dict | None:
        """Load what fitting learned; the manifest's record of it (None for a training-free method)."""
        if not self.protector.trainable:
            return None
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise VoxShieldInputError(f"{self.checkpoint}: {self.protector.name} checkpoint not found; run training first.")
        training = self._training_record()
        fitted_method = (training or {}).get("method", "voxshield")
        if fitted_method != self.protector.name:
            raise VoxShieldInputError(
                f"{self.checkpoint}: fitted for method {fitted_method!r}, not {self.protector.name!r}; "
                "pass the same --method to training and protect."
            )
        self._check_fitted_perturbation(training or {})
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
            self.protector.checkpoint_module.load_state_dict(state)
        except Exception as error:
            raise VoxShieldInputError(
                f"{self.checkpoint}: does not fit this bundle's {self.protector.name} network ({str(error).splitlines()[0]})"
            ) from error
        return {"checkpoint": self.checkpoint.name, "sha256": sha256(self.checkpoint), "training": training}

    # ---- the whole dataset ---------------------------------------------------------------------
    def _copy_other_files(self) -> dict:
        """Copy every file that is not a case's image or label (dataset.json, README, unlabelled
        images): the output stays a complete dataset of the same format."""
        case_files = {name for case in self.dataset.cases for name in case.images + [case.label]}
        copied = {}
        for path in sorted(self.dataset.root.rglob("*")):
            name = path.relative_to(self.dataset.root).as_posix()
            if path.is_file() and name not in case_files and not name.startswith("."):
                copy_atomic(path, self.output_dir / name)
                copied[name] = sha256(self.output_dir / name)
        return copied

    def run(self) -> dict | None:
        """Protect every case; returns the manifest on rank 0 (None on other ranks)."""
        rank, world_size = _distributed()
        self._check_output_location()
        for case in self.dataset.cases:  # every check before the first write
            load_case(self.dataset, case, allow_empty_label=self.copy_empty_labels)
        self.protector.to(self.device)
        fitted = self._load_checkpoint()
        parameters = {**self.protector.perturbation.settings(), **self.protector.settings()}
        run_info = {"method": self.protector.name, "checkpoint_sha256": fitted and fitted["sha256"], **parameters}
        if rank == 0:
            self._prepare_output(run_info)
        if world_size > 1:
            dist.barrier()

        progress = self.output_dir / PROGRESS_DIR
        shard = self.dataset.cases[rank::world_size]
        for case in tqdm(shard, desc=f"protect (rank {rank})", disable=rank > 0):
            if self._case_done(case):
                continue
            record = self._protect_case(case)
            write_atomic(progress / f"{case.case_id}.json", json.dumps(record).encode())
        if world_size > 1:
            dist.barrier()
        if rank != 0:
            return None

        records = [json.loads((progress / f"{case.case_id}.json").read_text()) for case in self.dataset.cases]
        manifest = {
            "format": "voxshield-manifest/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": self.protector.name,
            "parameters": parameters,
            "eps_normalised": self.protector.perturbation.eps,
            "fitted": fitted,
            "software": software_versions(),
            "dataset": {
                "source": str(self.dataset.root),
                "layout": self.dataset.layout,
                "channels": self.dataset.channel_names,
                "normalisation": self.dataset.normalisation,
                "ct_window_hu": list(self.dataset.ct_window),
                "mri_percentiles": list(self.dataset.mri_percentiles),
            },
            "metric_definitions": {
                "psnr_db_volume": PSNR_DESCRIPTION + "; all voxels",
                "psnr_db_roi": PSNR_DESCRIPTION + "; ROI voxels only",
                "ssim_3d_volume": SSIM_DESCRIPTION + "; whole volume",
                "ssim_3d_roi": SSIM_DESCRIPTION + "; ROI voxels only",
                "max_abs_delta_normalised": "largest |protected - source| / normalisation scale; <= eps",
            },
            "cases": records,
            "copied_files": self._copy_other_files(),
        }
        write_atomic(self.output_dir / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        shutil.rmtree(progress)
        return manifest
