"""Figures of a protected case beside its clean source: its perturbation on consecutive axial slices
with their spectra (Fig. 3 of the paper), and clean, protected and amplified difference side by side."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from custom.data import Case, load_case, normalise, open_dataset
from custom.manifest import read_manifest
from custom.nifti_io import VoxShieldInputError


@dataclasses.dataclass
class CasePair:
    """A case and its protected twin, both normalised with the clean case's normalisation (C, H, W, D),
    and the label (H, W, D)."""

    case_id: str
    clean: np.ndarray
    protected: np.ndarray
    label: np.ndarray


def load_pair(clean_dir: str | os.PathLike, protected_dir: str | os.PathLike, case_id: str | None = None) -> CasePair:
    """
    Load a case of a protected dataset and of its clean source (the same relative paths).

    Args:
        clean_dir: the source dataset.
        protected_dir: its protected copy, holding voxshield_manifest.json.
        case_id: a case of the manifest; None takes the first.

    Raises:
        VoxShieldInputError: for a missing or unreadable manifest, or a case id it does not list.
    """
    protected_root = Path(protected_dir).expanduser().resolve()
    manifest = read_manifest(protected_root)
    entries = {str(entry["case_id"]): entry for entry in manifest["cases"]}
    case_id = next(iter(entries)) if case_id is None else str(case_id)  # the CLI may pass a number
    if case_id not in entries:
        raise VoxShieldInputError(f"{protected_root}: no case {case_id!r} in the protected dataset.")
    entry = entries[case_id]
    case = Case(case_id, list(entry["images"]), entry["label"])
    spec = open_dataset(clean_dir)
    recorded = manifest.get("dataset") or {}
    if recorded:  # normalise as protect did, even if it was given non-default settings
        spec = dataclasses.replace(
            spec,
            normalisation=list(recorded.get("normalisation", spec.normalisation)),
            ct_window=tuple(recorded.get("ct_window_hu", spec.ct_window)),
            mri_percentiles=tuple(recorded.get("mri_percentiles", spec.mri_percentiles)),
        )
    clean = load_case(spec, case, allow_empty_label=True)
    protected = load_case(dataclasses.replace(spec, root=protected_root), case, allow_empty_label=True)
    if protected.image.shape != clean.image.shape:
        raise VoxShieldInputError(f"{protected_root}: case {case_id!r} has another shape than in {spec.root}.")
    return CasePair(
        case_id,
        normalise(clean.image, clean.offsets, clean.scales),
        normalise(protected.image, clean.offsets, clean.scales),
        clean.label,
    )


def roi_slices(label: np.ndarray, num_slices: int) -> list[int]:
    """``num_slices`` consecutive axial (last axis) indices centred on the ROI's centre of mass
    (the volume's centre for an empty label), kept inside the volume."""
    depth = label.shape[-1]
    if not 1 <= num_slices <= depth:
        raise ValueError(f"num_slices must be between 1 and the volume depth {depth}, got {num_slices}.")
    foreground = np.nonzero(label > 0)[-1]
    centre = int(round(foreground.mean())) if foreground.size else depth // 2
    first = min(max(centre - num_slices // 2, 0), depth - num_slices)
    return list(range(first, first + num_slices))


def _channel_delta(pair: CasePair, channel: int) -> np.ndarray:
    """(H, W, D) protected - clean of one channel, normalised units."""
    if not 0 <= channel < pair.clean.shape[0]:
        raise ValueError(f"channel {channel} out of range: case {pair.case_id} has {pair.clean.shape[0]} channel(s).")
    return pair.protected[channel] - pair.clean[channel]


def _delta_slices(pair: CasePair, num_slices: int, channel: int) -> tuple[list[int], np.ndarray]:
    delta = _channel_delta(pair, channel)
    indices = roi_slices(pair.label, num_slices)
    return indices, np.moveaxis(delta[..., indices], -1, 0)


def strongest_slice(delta: np.ndarray, label: np.ndarray) -> int:
    """
    The axial (last axis) index whose ROI holds the largest sum of |delta|, so that a perturbation
    that is zero on some slices (an alternating noise) is shown where it is; roi_slices's centre
    slice when delta is zero on the whole ROI.

    Args:
        delta: (H, W, D) perturbation.
        label: (H, W, D) label map; the ROI is label > 0.
    """
    per_slice = (np.abs(delta) * (label > 0)).sum(axis=(0, 1))
    return int(per_slice.argmax()) if per_slice.any() else roi_slices(label, 1)[0]


def perturbation_slices(
    clean_dir: str | os.PathLike, protected_dir: str | os.PathLike, case_id: str | None = None,
    num_slices: int = 4, channel: int = 0,
) -> tuple[list[int], np.ndarray]:
    """
    The perturbation (protected - clean, normalised units) on the axial slices that
    perturbation_figure shows.

    Returns:
        (slice indices, array (num_slices, H, W)).
    """
    return _delta_slices(load_pair(clean_dir, protected_dir, case_id), num_slices, channel)


def _show(axis, image: np.ndarray, **style):
    """Axial slice (H, W) with the first array axis horizontal, as viewers display RAS volumes."""
    axis.set_xticks([])
    axis.set_yticks([])
    return axis.imshow(image.T, origin="lower", interpolation="nearest", **style)


def _save(figure: Figure, output_png: str | os.PathLike) -> Path:
    path = Path(output_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)  # explicit Agg canvas: no display, no pyplot global state
    figure.savefig(path, dpi=100)
    return path


def perturbation_figure(
    clean_dir: str | os.PathLike, protected_dir: str | os.PathLike, case_id: str | None, output_png: str | os.PathLike,
    num_slices: int = 4, channel: int = 0,
) -> Path:
    """
    Fig. 3-style PNG of one case's perturbation on ``num_slices`` consecutive axial slices through
    the ROI centre: top row the perturbation (protected - clean, normalised with the clean case's
    normalisation) on a symmetric colour map at +-max|delta| of the shown slices; bottom row each
    slice's 2D amplitude spectrum (log10, fftshifted) on one shared scale, so flicker between
    slices shows as changing spectra.

    Args:
        clean_dir, protected_dir, case_id: see load_pair.
        output_png: the PNG to write.
        num_slices: consecutive slices shown.
        channel: image channel shown.

    Returns:
        the PNG's path.
    """
    pair = load_pair(clean_dir, protected_dir, case_id)
    indices, deltas = _delta_slices(pair, num_slices, channel)
    limit = float(np.abs(deltas).max()) or 1.0  # an unchanged case still gets a valid colour scale
    amplitudes = np.abs(np.fft.fftshift(np.fft.fft2(deltas, axes=(1, 2)), axes=(1, 2)))
    floor = float(amplitudes.max()) * 1e-6 or 1e-12  # log of an exact zero has no colour
    spectra = np.log10(np.maximum(amplitudes, floor))

    figure = Figure(figsize=(3 * num_slices + 1.5, 6.5), layout="constrained")
    axes = figure.subplots(2, num_slices, squeeze=False)
    for column, index in enumerate(indices):
        delta_image = _show(axes[0, column], deltas[column], cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[0, column].set_title(f"perturbation, slice {index}")
        spectrum_image = _show(axes[1, column], spectra[column], cmap="viridis", vmin=spectra.min(), vmax=spectra.max())
        axes[1, column].set_title(f"amplitude spectrum, slice {index}")
    figure.colorbar(delta_image, ax=axes[0, :], label="protected - clean (normalised)")
    figure.colorbar(spectrum_image, ax=axes[1, :], label="log10 |FFT|")
    figure.suptitle(f"Case {pair.case_id}, channel {channel}: perturbation and its spectrum on axial slices")
    return _save(figure, output_png)


def comparison_figure(
    clean_dir: str | os.PathLike, protected_dir: str | os.PathLike, case_id: str | None, output_png: str | os.PathLike,
    channel: int = 0, amplification: float = 20,
) -> Path:
    """
    PNG of the axial slice where the perturbation is largest inside the ROI (strongest_slice): clean,
    protected (same grey scale, [0, 1] normalised) and the difference (protected - clean) multiplied
    by ``amplification`` on a symmetric colour map over the same +-1 range, so it reads against the
    image's intensity scale.

    Args:
        clean_dir, protected_dir, case_id: see load_pair.
        output_png: the PNG to write.
        channel: image channel shown.
        amplification: factor applied to the difference (given in its title).

    Returns:
        the PNG's path.
    """
    pair = load_pair(clean_dir, protected_dir, case_id)
    delta = _channel_delta(pair, channel)
    index = strongest_slice(delta, pair.label)
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.subplots(1, 3)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    image = _show(axes[0], pair.clean[channel][..., index], **grey)
    axes[0].set_title(f"clean, slice {index}")
    _show(axes[1], pair.protected[channel][..., index], **grey)
    axes[1].set_title(f"protected, slice {index}")
    figure.colorbar(image, ax=axes[:2], label="normalised intensity")
    difference = _show(axes[2], amplification * delta[..., index], cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    axes[2].set_title(f"difference x{amplification:g} (protected - clean)")
    figure.colorbar(difference, ax=axes[2], label=f"{amplification:g} x (protected - clean)")
    figure.suptitle(f"Case {pair.case_id}, channel {channel}")
    return _save(figure, output_png)


def frontier_figure(rows: list[dict], output_png: str | os.PathLike) -> Path:
    """
    PNG of the price of protection: the victim's DSC as % of the clean victim's against the
    whole-volume PSNR of its training copy, one line per method and support through its budgets
    (solid: ROI, dotted: whole volume, one colour per method), error bars from the lowest to the
    highest seed; the floor (random noise in the ROI) in black dashes, 100% (clean) in grey.
    Points without a PSNR are left out.

    Args:
        rows: as returned by custom.protection_views.frontier_rows: ``method``, ``support`` ("ROI" or
            "whole volume"), ``eps``, ``floor``, ``psnr_db_volume`` and ``dsc_percent_of_clean``
            (``mean``, ``min``, ``max``).
        output_png: the PNG to write.

    Returns:
        the PNG's path.
    """
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["psnr_db_volume"] is not None:
            lines.setdefault((row["method"], row["support"]), []).append(row)
    methods = list(dict.fromkeys(method for method, _ in lines))
    # tab20's 10 strong colours, then their 10 light twins: a frontier has more methods than the default 10
    palette = matplotlib.colormaps["tab20"].colors[0::2] + matplotlib.colormaps["tab20"].colors[1::2]
    colours = [palette[index % len(palette)] for index in range(len(methods))]
    figure = Figure(figsize=(8, 5.5), layout="constrained")
    axis = figure.subplots()
    axis.axhline(100, color="grey", linewidth=1, label="clean victim (100%)")
    for (method, support), points in lines.items():
        points = sorted(points, key=lambda row: row["psnr_db_volume"])
        dsc = [row["dsc_percent_of_clean"] for row in points]
        mean = [value["mean"] for value in dsc]
        spread = [[value["mean"] - value["min"] for value in dsc], [value["max"] - value["mean"] for value in dsc]]
        if points[0]["floor"]:
            style = {"color": "black", "linestyle": "--", "linewidth": 2.5, "marker": "x"}
            label = f"{method} in the ROI (floor)"
        else:
            style = {"color": colours[methods.index(method)], "linestyle": "-" if support == "ROI" else ":",
                     "marker": "o" if support == "ROI" else "s"}
            label = f"{method}, {support}"
        axis.errorbar([row["psnr_db_volume"] for row in points], mean, yerr=spread, capsize=3, label=label, **style)
        for row, value in zip(points, mean):
            axis.annotate(f"{row['eps'] * 255:.3g}", (row["psnr_db_volume"], value), textcoords="offset points",
                          xytext=(4, 4), fontsize=7, color=style["color"])
    axis.set_xlabel("PSNR of the protected copy, whole volume (dB)")
    axis.set_ylabel("victim DSC (% of the clean victim's)")
    axis.set_title("Price of protection (labels: eps x 255)")
    axis.legend(fontsize=8, loc="best")
    return _save(figure, output_png)
