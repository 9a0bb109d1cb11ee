"""Writing the protected copy of a dataset: native-grid perturbation in source units, exact bound,
byte-identical labels and outside-ROI voxels, atomic files, resumable runs and a manifest."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from custom.bundle_utils import TRAINING_RECORD
from custom.data import Case, DatasetSpec, LoadedCase, check_case_headers, load_case, normalise
from custom.manifest import MANIFEST_NAME, build_manifest, write_manifest
from custom.metrics import imperceptibility
from custom.nifti_io import VoxShieldInputError, sha256, slope_inter, write_atomic, write_stored_like
from custom.protector_base import Protector

PROGRESS_DIR = ".voxshield_progress"


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


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---- the output folder ---------------------------------------------------------------------------
def check_output_location(source: Path, output: Path) -> None:
    """Refuse an output folder inside the source dataset or holding it (both resolved paths)."""
    if output == source or source in output.parents:
        raise VoxShieldInputError(f"{output}: output folder is inside the input dataset {source}.")
    if output in source.parents:
        raise VoxShieldInputError(f"{output}: output folder contains the input dataset {source}.")


def previous_copy(output: Path) -> Path:
    """Where ``--overwrite true`` keeps the output it replaces until the new copy is complete: the
    sibling ``<output>.voxshield-previous`` (a rename on the same filesystem, so atomic)."""
    return output.with_name(output.name + ".voxshield-previous")


def _is_voxshield_output(folder: Path) -> bool:
    """Whether ``folder`` is a finished VoxShield output (manifest) or an interrupted run (progress folder)."""
    return (folder / MANIFEST_NAME).is_file() or (folder / PROGRESS_DIR).is_dir()


def _prepare_output(output: Path, run_info: dict, overwrite: bool) -> bool:
    """
    Create the output folder with its progress folder, resume an interrupted run into it, or refuse
    to clobber it. ``overwrite`` moves the output it replaces to previous_copy(output), which run()
    deletes once the new copy is complete and moves back when bad data stops the run. A previous
    copy left by an interrupted ``overwrite`` run stays where it is: resuming that run, or starting
    it over with ``overwrite``, replaces it in the same way; with no interrupted run in ``output``,
    which copy to keep is the user's call, so the run is refused.

    Args:
        output: the protected copy's folder.
        run_info: what makes a run (method, checkpoint digest, settings); an interrupted run resumes
            only when it recorded the same.
        overwrite: replace an existing VoxShield output (a finished copy or an interrupted run).

    Returns:
        whether this run resumes an interrupted one (False: it starts in a new or empty folder).
    """
    progress, previous = output / PROGRESS_DIR, previous_copy(output)
    if previous.exists():
        if not _is_voxshield_output(previous):
            raise VoxShieldInputError(f"{previous}: not a VoxShield output, refusing to replace or delete it.")
        if not progress.is_dir():
            raise VoxShieldInputError(
                f"{previous}: the copy an interrupted --overwrite run was replacing, and {output} holds no "
                f"interrupted run to resume; move that copy back to {output.name} or delete it."
            )
    if output.exists() and any(output.iterdir()):
        if progress.is_dir() and not overwrite:
            recorded = json.loads((progress / "run.json").read_text())
            if recorded != run_info:
                raise VoxShieldInputError(
                    f"{output}: holds an interrupted run with other settings; pass --overwrite true."
                )
            return True
        if not overwrite:
            raise VoxShieldInputError(f"{output}: output folder exists; pass --overwrite true to replace it.")
        if not _is_voxshield_output(output):
            raise VoxShieldInputError(f"{output}: not a VoxShield output, refusing to overwrite it.")
        if previous.exists():  # an interrupted run that was replacing it: start that run over
            shutil.rmtree(output)
        else:
            output.rename(previous)
    progress.mkdir(parents=True, exist_ok=True)
    write_atomic(progress / "run.json", json.dumps(run_info).encode())
    return False


def _case_done(output: Path, case_id: str) -> bool:
    """Whether an earlier (interrupted) run finished case ``case_id``: its progress record exists and
    every file it lists is in ``output`` with the recorded sha256."""
    record_path = output / PROGRESS_DIR / f"{case_id}.json"
    if not record_path.is_file():
        return False
    record = json.loads(record_path.read_text())
    return all(
        (output / name).is_file() and sha256(output / name) == digest for name, digest in record["files"].items()
    )


def _remove_cases(output: Path, records: list[dict]) -> None:
    """Remove the written files and progress records of the cases in ``records``."""
    for record in records:
        for name in record["files"]:
            (output / name).unlink(missing_ok=True)
        (output / PROGRESS_DIR / f"{record['case_id']}.json").unlink()


def _clear_new_output(output: Path, was_empty: bool) -> None:
    """Remove all that a new run wrote to ``output`` (the folder, or its contents when it was there,
    empty, before the run) and move back the copy it was replacing, if any."""
    if not was_empty:
        shutil.rmtree(output)
    else:
        for path in output.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    if previous_copy(output).exists():
        previous_copy(output).rename(output)


def _write_copies(output: Path, copies: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """Write each (relative name, file bytes) to ``output``, one at a time; name -> sha256 of each copy."""
    written = {}
    for name, data in copies:
        write_atomic(output / name, data)
        written[name] = sha256(output / name)
    return written


# ---- the fitted checkpoint -----------------------------------------------------------------------
def _training_record(checkpoint: Path) -> dict | None:
    """How the method was fitted, from the training_config.json that training writes beside its checkpoint."""
    record = checkpoint.with_name(TRAINING_RECORD)
    return json.loads(record.read_text()) if record.is_file() else None


def _check_fitted_perturbation(protector: Protector, checkpoint: Path, training: dict) -> None:
    """The noise was fitted for one bound and support: protecting with others would publish noise
    that was never optimised for them. Settings missing from an older record are not checked."""
    differing = [
        f"{name} {training[name]!r} at training, {value!r} here"
        for name, value in protector.perturbation.settings().items()
        if name in training and training[name] != value
    ]
    if differing:
        raise VoxShieldInputError(
            f"{checkpoint}: fitted with other perturbation settings ({'; '.join(differing)}); "
            "pass the same values to training and protect."
        )


def _load_fitted(protector: Protector, checkpoint: Path | None, device: torch.device) -> dict | None:
    """
    Load what fitting learned into ``protector`` after checking that it was fitted for this method
    and these perturbation settings.

    Args:
        protector: the method; a training-free one loads nothing.
        checkpoint: the file fitting wrote, with its training record beside it.
        device: where the weights go.

    Returns:
        the manifest's record of the checkpoint (name, sha256, training record); None for a
        training-free method.

    Raises:
        VoxShieldInputError: for a missing checkpoint, one fitted for another method or other
            perturbation settings, or one that does not fit the protector's network.
    """
    if not protector.trainable:
        return None
    if checkpoint is None or not checkpoint.is_file():
        raise VoxShieldInputError(f"{checkpoint}: {protector.name} checkpoint not found; run training first.")
    training = _training_record(checkpoint)
    fitted_method = (training or {}).get("method", "voxshield")
    if fitted_method != protector.name:
        raise VoxShieldInputError(
            f"{checkpoint}: fitted for method {fitted_method!r}, not {protector.name!r}; "
            "pass the same --method to training and protect."
        )
    _check_fitted_perturbation(protector, checkpoint, training or {})
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        protector.checkpoint_module.load_state_dict(state)
    except Exception as error:
        raise VoxShieldInputError(
            f"{checkpoint}: does not fit this bundle's {protector.name} network ({str(error).splitlines()[0]})"
        ) from error
    return {"checkpoint": checkpoint.name, "sha256": sha256(checkpoint), "training": training}


# ---- stored values -------------------------------------------------------------------------------
def _write_protected_images(
    loaded: LoadedCase, output: Path, names: list[str], delta_source: np.ndarray, bounds: np.ndarray
) -> tuple[dict[str, str], np.ndarray]:
    """
    Add a perturbation to the values stored in a case's image files and write them to ``output``
    with their headers (see bounded_stored_values).

    Args:
        loaded: the case as read, its files among them.
        output: the protected copy.
        names: the case's image files (relative paths), 3D or 4D, in channel order.
        delta_source: (C, H, W, D) change in each channel's source units.
        bounds: (C,) largest allowed |change| per channel, in source units.

    Returns:
        (name -> sha256 of each written file, (C, H, W, D) the protected values in source units).
    """
    files = {}
    protected_source = np.empty(delta_source.shape, dtype=np.float64)
    channel = 0
    for name in names:
        source = loaded.files[name]
        stored = source.stored
        slope, inter = slope_inter(source.image)
        count = 1 if stored.ndim == 3 else stored.shape[3]
        change = np.moveaxis(delta_source[channel : channel + count], 0, -1).reshape(stored.shape)
        new = np.empty_like(stored)
        for index in range(count):  # each channel has its own bound
            part = (slice(None),) * 3 + ((index,) if stored.ndim == 4 else ())
            new[part] = bounded_stored_values(stored[part], change[part], slope, bounds[channel + index])
        write_stored_like(source, new, output / name)
        files[name] = sha256(output / name)
        values = np.moveaxis((new.astype(np.float64) * slope + inter).reshape(stored.shape[:3] + (-1,)), -1, 0)
        protected_source[channel : channel + count] = values
        channel += count
    return files, protected_source


class DatasetProtector:
    """
    Publishes a protected copy of a dataset with any protection method (custom.voxshield, custom.protectors).

    Each labelled case is loaded on its native voxel grid and normalised as in training; the
    protector turns it into its bounded perturbation, which is mapped back to the source's units
    with that case's normalisation scale and added to the values as stored on disk. Labels,
    dataset.json and every other file are copied byte for byte. Cases are sharded across ranks
    when torch.distributed is initialised.

    Args:
        dataset: the source dataset (see custom.data.open_dataset).
        output_dir: where the copy goes; must not be inside the dataset (nor hold it).
        protector: the method, e.g. custom.voxshield.VoxShield.
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

    def _perturbation_for(self, normalised: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(C, H, W, D) normalised case and (H, W, D) label -> the protector's delta (C, H, W, D),
        zero outside its support, and that support (H, W, D) as booleans."""
        image = torch.as_tensor(normalised[None], device=self.device)
        label_tensor = torch.as_tensor(label[None, None], device=self.device)
        delta = self.protector.perturb(image, label_tensor).detach()
        support = self.protector.support(label_tensor)[0].cpu().numpy().astype(bool)
        return delta[0].double().cpu().numpy() * support, support[0]

    def _perturb_case(self, case: Case) -> Callable[[], dict]:
        """
        Read one case and compute its perturbation; what is left to do is returned as a function
        that writes the case's protected images and copied label, all made from that one read, and
        returns its manifest record (the write runs beside the next case's perturbation, see
        _protect_shard). Bad data raises VoxShieldInputError (load_case) here, before any write.
        """
        output = self.output_dir
        loaded = load_case(self.dataset, case, allow_empty_label=self.copy_empty_labels)
        if not (loaded.label > 0).any():
            def copy_unchanged() -> dict:
                files = _write_copies(output, ((name, loaded.files[name].raw) for name in case.images + [case.label]))
                return {
                    "case_id": case.case_id, "images": case.images, "label": case.label,
                    "protected": False, "reason": "empty label", "files": files,
                }
            return copy_unchanged

        clean = normalise(loaded.image, loaded.offsets, loaded.scales)
        delta, roi = self._perturbation_for(clean, loaded.label)

        def write_protected() -> dict:
            bounds = self.protector.perturbation.eps * loaded.scales
            files, protected_source = _write_protected_images(
                loaded, output, case.images, delta * loaded.scales.reshape(-1, 1, 1, 1), bounds
            )
            files.update(_write_copies(output, [(case.label, loaded.files[case.label].raw)]))
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
                **imperceptibility(clean, protected, roi),
                "files": files,
            }
        return write_protected

    def _write_case(self, write: Callable[[], dict], case_id: str) -> dict:
        """Run a case's write (see _perturb_case), then mark the case done for a resumed run."""
        record = write()
        write_atomic(self.output_dir / PROGRESS_DIR / f"{case_id}.json", json.dumps(record).encode())
        return record

    def _protect_shard(self, shard: list[Case], rank: int) -> tuple[list[dict], VoxShieldInputError | None]:
        """
        Protect the cases of ``shard`` that no earlier run finished, stopping at the first with bad data.

        One case is written (gzip, SSIM: numpy and zlib, which release the GIL) on a second thread
        while the next is read and perturbed (torch), so that on a CPU protect costs little more than
        its reads and writes. At most one case waits to be written, so memory stays flat in the
        number of cases; a case that fails or is interrupted leaves the ones before it complete.

        Args:
            shard: this rank's cases.
            rank: this process's rank (only rank 0 shows progress).

        Returns:
            (the records of the cases written here, the bad case's error or None).
        """
        written, error, pending = [], None, None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxshield-write") as writer:
            for case in tqdm(shard, desc=f"protect (rank {rank})", disable=rank > 0):
                if _case_done(self.output_dir, case.case_id):
                    continue
                try:
                    write = self._perturb_case(case)
                except VoxShieldInputError as bad_case:  # from load_case, before the case wrote anything
                    error = bad_case
                    break
                if pending is not None:
                    written.append(pending.result())
                pending = writer.submit(self._write_case, write, case.case_id)
            if pending is not None:  # the last case written, or the one before the bad case
                written.append(pending.result())
        return written, error

    def _copy_other_files(self) -> dict:
        """Copy every file that is not a case's image or label (dataset.json, README, unlabelled
        images): the output stays a complete dataset of the same format."""
        root = self.dataset.root
        case_files = {name for case in self.dataset.cases for name in case.images + [case.label]}
        names = [path.relative_to(root).as_posix() for path in sorted(root.rglob("*")) if path.is_file()]
        others = [name for name in names if name not in case_files and not name.startswith(".")]
        return _write_copies(self.output_dir, ((name, (root / name).read_bytes()) for name in others))

    def run(self) -> dict | None:
        """
        Protect every case (sharded across ranks); returns the manifest on rank 0 (None on other ranks).

        Each case's data is read once, to protect it. What the headers tell (files exist and open as
        NIfTI, shapes, affines, channel counts) is checked for every case, by every rank, before the
        first write; what only the data tells (NaN or Inf, label values, corrupt data) is checked on
        that one read. Data found bad there stops every rank, which then removes what this run wrote:
        all of a new run's output, putting back the copy that ``overwrite`` moved aside, or the cases
        it added to the interrupted run it resumed. Rank 0 moves the folders (see _prepare_output) and
        deletes the replaced copy once the new one is complete.

        Raises:
            VoxShieldInputError: for bad input, naming the file (on every rank).
        """
        rank, world_size = _rank_and_world_size()
        check_output_location(self.dataset.root, self.output_dir)
        for case in self.dataset.cases:
            check_case_headers(self.dataset, case)
        self.protector.to(self.device)
        fitted = _load_fitted(self.protector, self.checkpoint, self.device)
        parameters = {**self.protector.perturbation.settings(), **self.protector.settings()}
        run_info = {"method": self.protector.name, "checkpoint_sha256": fitted and fitted["sha256"], **parameters}
        was_empty = resumed = True  # what rank 0, the one that prepares the output, finds
        if rank == 0:
            was_empty = self.output_dir.is_dir() and not any(self.output_dir.iterdir())
            resumed = _prepare_output(self.output_dir, run_info, self.overwrite)
        if world_size > 1:
            dist.barrier()

        written, error = self._protect_shard(self.dataset.cases[rank::world_size], rank)
        failures = [str(error)] if error else []
        if world_size > 1:  # once every rank has finished its shard or stopped at bad data
            gathered = [None] * world_size
            dist.all_gather_object(gathered, failures)
            failures = sum(gathered, [])
        if failures:  # remove what this run wrote: each rank its cases, then rank 0 a new run's folder
            _remove_cases(self.output_dir, written)
            if world_size > 1:
                dist.barrier()
            if rank == 0 and not resumed:
                _clear_new_output(self.output_dir, was_empty)
            raise error or VoxShieldInputError(failures[0])
        if rank != 0:
            return None

        progress = self.output_dir / PROGRESS_DIR
        records = [json.loads((progress / f"{case.case_id}.json").read_text()) for case in self.dataset.cases]
        manifest = build_manifest(
            self.dataset, self.protector.name, parameters, self.protector.perturbation.eps, fitted, records,
            self._copy_other_files(),
        )
        write_manifest(self.output_dir, manifest)
        # the replaced copy goes before the progress folder: a run stopped in between still resumes
        if previous_copy(self.output_dir).exists():
            shutil.rmtree(previous_copy(self.output_dir))
        shutil.rmtree(progress)
        return manifest
