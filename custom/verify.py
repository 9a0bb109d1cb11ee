"""
``voxshield verify``: an independent check of a protected dataset against its source.

It reads the manifest and the two folders' files with numpy, scipy, nibabel and gzip, and shares no code with
protect beyond the generic sha256 helper of custom.nifti_io, so a bug in protect cannot vouch for itself. Checks:

- the manifest exists and parses; every file it lists exists in the protected copy with the recorded
  sha256, and the copy holds nothing else (no added, stray or temporary files);
- every file of the source (except hidden top-level entries, which protect skips) is in the copy;
- labels, unprotected case images and every non-case file are byte-identical to the source's;
- each protected image keeps the source's header bytes (everything before vox_offset), dtype, shape
  and affine, and its stored values outside the method's support (label == 0 dilated by the manifest's
  roi_dilation and UMed's contour_width; none when mask_roi is off) are identical;
- per channel, |protected - source| in source units is within the case's bound_source_units, that
  bound is eps x the channel's normalisation scale recomputed from the source (CT window width, the
  MRI percentile range of its non-zero voxels, 10 standard deviations of them for z-scoring, or 1 for
  data already in [0, 1]), and the recorded max |delta| is the measured one.

    voxshield verify --source DATA --protected OUT       (or: python -m custom.verify DATA OUT)

prints one line per failed check, ``voxshield: verify: FAILED <file>: <problem>``, and exits 1; or
``voxshield: verified N cases ...`` and exits 0.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import math
import sys
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
from scipy import ndimage

from custom.nifti_io import sha256

# protect's file name, restated so that verify imports none of protect's code.
MANIFEST = "voxshield_manifest.json"

MANIFEST_FORMAT = "voxshield-manifest/"


# Restates custom.nifti_io.read_nifti's header_bytes on purpose: the checker must not reuse the writer it checks.
def header_bytes(path: Path, offset: int) -> bytes:
    """The (decompressed) bytes before the voxel data: header, extensions, padding."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as stream:
        return stream.read(offset)


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file() or path.is_symlink()}


def safe_name(name: str) -> bool:
    """A manifest entry must name a file inside the folder: relative, no '..'."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


# scipy rather than custom.perturbation.dilate (torch), the code that made the ROI: the checker must not reuse it.
def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation of a boolean mask's last three axes by a cube of side ``2 * radius + 1``: the ROI rule for
    roi_dilation > 0 (outside the volume counts as background).

    Args:
        mask: boolean array, shape (..., H, W, D); leading axes are not dilated across.
        radius: half-width of the cube in voxels; 0 returns ``mask`` itself.

    Returns:
        boolean array of ``mask``'s shape.
    """
    if radius <= 0:
        return mask
    cube = np.ones((1,) * (mask.ndim - 3) + (2 * radius + 1,) * 3, dtype=bool)
    return ndimage.binary_dilation(mask, structure=cube)


def support(label: np.ndarray, parameters: dict) -> np.ndarray:
    """The voxels a protection may change, from the manifest's parameters: the label foreground dilated
    by ``roi_dilation`` and by UMed's ``contour_width`` band (cube dilations add up), or every voxel
    when ``mask_roi`` is off.

    Args:
        label: label map, shape (H, W, D); 0 is background.
        parameters: the manifest's ``parameters``.

    Returns:
        boolean array of ``label``'s shape.
    """
    if not parameters.get("mask_roi", True):
        return np.ones(label.shape, dtype=bool)
    return dilate(label != 0, int(parameters.get("roi_dilation", 0)) + int(parameters.get("contour_width", 0)))


class Verifier:
    """Runs every check of a protected copy ``protected`` against ``source``; collects failures."""

    def __init__(self, source: Path, protected: Path) -> None:
        self.source = Path(source)
        self.protected = Path(protected)
        self.failures: list[str] = []
        self.cases = 0

    def fail(self, path: Path | str, problem: str) -> None:
        self.failures.append(f"{path}: {problem}")

    # ---- the manifest and the file lists --------------------------------------------------------
    def _manifest(self) -> dict | None:
        path = self.protected / MANIFEST
        if not self.source.is_dir():
            self.fail(self.source, "source dataset folder not found")
            return None
        if not self.protected.is_dir():
            self.fail(self.protected, "protected dataset folder not found")
            return None
        if not path.is_file():
            self.fail(path, "manifest missing: not a VoxShield protected copy")
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            self.fail(path, f"manifest unreadable ({error})")
            return None
        if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(MANIFEST_FORMAT):
            self.fail(path, f"not a VoxShield manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
            return None
        if not isinstance(manifest.get("cases"), list) or not isinstance(manifest.get("copied_files"), dict):
            self.fail(path, "manifest lacks its 'cases' list or 'copied_files' table")
            return None
        return manifest

    def _listed_files(self, manifest: dict) -> dict[str, str]:
        """Every file the manifest vouches for, with its sha256."""
        listed: dict[str, str] = {}
        for record in manifest["cases"]:
            files = record.get("files", {})
            for name in list(record.get("images", [])) + [record.get("label")]:
                if name not in files:
                    self.fail(self.protected / str(name), f"case {record.get('case_id')!r}: file has no sha256 in the manifest")
            listed.update(files)
        listed.update(manifest["copied_files"])
        return listed

    def _check_file_sets(self, listed: dict[str, str]) -> set[str]:
        """Missing, added and tampered files; returns the names that are safe to open."""
        usable = set()
        present = files_under(self.protected)
        source_files = {name for name in files_under(self.source) if not name.startswith(".")}
        for name in sorted(listed):
            if not safe_name(name):
                self.fail(self.protected / name, "manifest entry points outside the dataset folder")
                continue
            if name not in present:
                self.fail(self.protected / name, "missing from the protected copy (listed in the manifest)")
                continue
            if name not in source_files:
                self.fail(self.protected / name, "listed in the manifest but absent from the source")
                continue
            if sha256(self.protected / name) != listed[name]:
                self.fail(self.protected / name, "sha256 differs from the manifest's")
            usable.add(name)
        for name in sorted(present - set(listed) - {MANIFEST}):
            self.fail(self.protected / name, "added: not in the manifest (nor a copy of a source file)")
        for name in sorted(source_files - set(listed)):
            self.fail(self.source / name, "missing: in the source but not in the protected copy")
        return usable

    def _check_identical(self, name: str, what: str) -> None:
        if not filecmp.cmp(self.protected / name, self.source / name, shallow=False):
            self.fail(self.protected / name, f"{what} differs from the source (must be a byte-identical copy)")

    # ---- one protected case ---------------------------------------------------------------------
    def _expected_scale(self, values: np.ndarray, kind: str, dataset: dict) -> float | None:
        if kind == "ct":
            low, high = dataset.get("ct_window_hu", (None, None))
        elif kind in ("mri", "zscore"):
            foreground = values[values != 0]
            foreground = foreground if foreground.size else values
            if kind == "mri":
                low, high = np.percentile(foreground, dataset.get("mri_percentiles"))
            else:  # mean +- 5 standard deviations of the non-zero voxels
                low, high = foreground.mean() - 5 * foreground.std(), foreground.mean() + 5 * foreground.std()
        elif kind == "none":  # already in [0, 1]
            low, high = 0.0, 1.0
        else:
            return None
        return max(float(high) - float(low), 1e-6)

    def _check_case(self, record: dict, manifest: dict) -> None:
        case_id = record.get("case_id")
        label_path = self.source / record["label"]
        label_image = nib.load(label_path)
        label = np.asanyarray(label_image.dataobj)  # scaled as stored; background is 0 either way
        roi = support(label, manifest.get("parameters", {}))
        eps = manifest.get("eps_normalised", manifest.get("parameters", {}).get("eps"))
        bounds = np.asarray(record.get("bound_source_units", []), dtype=np.float64)
        recorded_max = np.asarray(record.get("max_abs_delta_source_units", []), dtype=np.float64)
        kinds = list(manifest.get("dataset", {}).get("normalisation", []))

        changes, sources, names, skipped = [], [], [], False
        for name in record["images"]:
            source_path, output_path = self.source / name, self.protected / name
            original, protected = nib.load(source_path), nib.load(output_path)
            offset = int(original.dataobj.offset)
            if int(protected.dataobj.offset) != offset or header_bytes(output_path, offset) != header_bytes(source_path, offset):
                self.fail(output_path, "header bytes (before vox_offset) differ from the source's")
            if protected.get_data_dtype() != original.get_data_dtype():
                self.fail(output_path, f"dtype {protected.get_data_dtype()} differs from the source's {original.get_data_dtype()}")
                skipped = True
                continue
            if protected.shape != original.shape:
                self.fail(output_path, f"shape {protected.shape} differs from the source's {original.shape}")
                skipped = True
                continue
            if not np.array_equal(protected.affine, original.affine):
                self.fail(output_path, "affine differs from the source's")
            before = np.asanyarray(original.dataobj.get_unscaled())
            after = np.asanyarray(protected.dataobj.get_unscaled())
            if before.shape[:3] != label.shape:
                self.fail(output_path, f"shape {before.shape} does not match the label's {label.shape}")
                skipped = True
                continue
            region = roi if before.ndim == 3 else np.broadcast_to(roi.reshape(roi.shape + (1,) * (before.ndim - 3)), before.shape)
            if not np.array_equal(after[~region], before[~region]):
                count = int((after[~region] != before[~region]).sum())
                self.fail(output_path, f"{count} stored voxel(s) outside the ROI (label == 0) changed")
            slope = float(original.dataobj.slope)
            inter = float(original.dataobj.inter)
            change = np.abs((after.astype(np.float64) - before.astype(np.float64)) * slope)
            channels = change.reshape(label.shape + (-1,))
            values = (before.astype(np.float64) * slope + inter).reshape(label.shape + (-1,))
            for index in range(channels.shape[-1]):
                changes.append(channels[..., index])
                sources.append(values[..., index])
                names.append(output_path if channels.shape[-1] == 1 else f"{output_path} (channel {index})")

        if skipped:
            return  # the bound needs every channel
        if len(changes) != len(bounds):
            self.fail(self.protected / MANIFEST, f"case {case_id!r}: {len(bounds)} bound(s) recorded for {len(changes)} channel(s)")
            return
        for channel, (change, values, name) in enumerate(zip(changes, sources, names)):
            largest = float(change.max())
            if largest > bounds[channel]:
                over = int((change > bounds[channel]).sum())
                self.fail(name, f"|protected - source| reaches {largest:.6g}, over the bound {bounds[channel]:.6g} "
                                f"(source units) at {over} voxel(s)")
            if channel < len(recorded_max) and not math.isclose(recorded_max[channel], largest, rel_tol=1e-9, abs_tol=1e-12):
                self.fail(name, f"manifest records max |delta| {recorded_max[channel]:.6g}, measured {largest:.6g}")
            scale = self._expected_scale(values, kinds[channel], manifest.get("dataset", {})) if channel < len(kinds) else None
            if scale is None or eps is None:
                self.fail(name, "manifest does not say how this channel was normalised (dataset.normalisation, eps)")
            elif not math.isclose(bounds[channel], float(eps) * scale, rel_tol=1e-9):
                self.fail(name, f"manifest bound {bounds[channel]:.6g} is not eps x the channel's normalisation scale "
                                f"({float(eps):.6g} x {scale:.6g} = {float(eps) * scale:.6g})")

    # ---- everything --------------------------------------------------------------------------
    def run(self) -> list[str]:
        manifest = self._manifest()
        if manifest is None:
            return self.failures
        listed = self._listed_files(manifest)
        usable = self._check_file_sets(listed)
        for name in sorted(manifest["copied_files"]):
            if name in usable:
                self._check_identical(name, "non-case file")
        for record in manifest["cases"]:
            self.cases += 1
            names = list(record.get("images", [])) + [record.get("label")]
            if not all(name in usable for name in names):
                continue  # already reported
            self._check_identical(record["label"], "label")
            if not record.get("protected", False):
                for name in record["images"]:
                    self._check_identical(name, "unprotected case image")
                continue
            try:
                self._check_case(record, manifest)
            except Exception as error:  # noqa: BLE001 - a damaged file or record: report it, check the rest
                self.fail(self.protected / record["images"][0], f"case {record.get('case_id')!r} unreadable ({error})")
        return self.failures


def verify_copy(source: Path, protected: Path) -> tuple[list[str], int]:
    """All failed checks (one line each, naming the file) and the number of cases in the manifest."""
    verifier = Verifier(source, protected)
    failures = verifier.run()
    return failures, verifier.cases


def print_verdict(failures: list[str], cases: int, source: Path, protected: Path) -> int:
    """Print the verdict; returns the exit status (0 verified, 1 failed)."""
    if failures:
        for line in failures:
            print(f"voxshield: verify: FAILED {line}", file=sys.stderr)
        print(f"voxshield: verify: {len(failures)} check(s) failed for {protected} against {source}", file=sys.stderr)
        return 1
    print(f"voxshield: verified {cases} cases: {protected} is a faithful protected copy of {source}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxshield verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the original dataset")
    parser.add_argument("protected", help="the protected copy (with voxshield_manifest.json)")
    args = parser.parse_args(argv)
    failures, cases = verify_copy(Path(args.source), Path(args.protected))
    return print_verdict(failures, cases, Path(args.source), Path(args.protected))


if __name__ == "__main__":
    sys.exit(main())
