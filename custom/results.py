"""Victim evaluations (results.json) collected and summarised: one summary per result, with the fields
and the row names that the paper's tables (custom.report) and the views across results
(custom.protection_views) share."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom.bundle_utils import shared_defaults
from custom.evaluate import RESULTS_NAME
from custom.manifest import fitted_record
from custom.nifti_io import VoxShieldInputError
from custom.victims import SLICE_VICTIMS

RESULTS_FORMAT = "voxshield-evaluation/1"
MAIN_VICTIM = "unet"
ABLATED_METHOD = "voxshield"
CLEAN = "clean"
FULL = "full"
ABLATIONS = (FULL, "w/o L_SPD", "w/o L_ISC", "w/o L_SPD and L_ISC")
CLEAN_REFERENCE = "clean (reference)"
(SLICE_VICTIM,) = SLICE_VICTIMS
# What shapes the noise: a result fitted with other values than configs/train.json's stays out of
# Tables 1-3 (they compare methods as published) and is listed in Table 4
SETTINGS = ("eps", "roi_dilation", "squash", "mask_roi", "surrogate_steps", "generator_steps",
            "surrogate_batches_per_epoch", "surrogate_restart_every", "fit_augmentation")
NETWORKS = {"generator": "generator_def", "surrogate": "surrogate_def"}  # training record key -> config key
# A method's own hyperparameters that make a different copy (its defaults: its entry under "protectors" in
# train.json); a copy made with other values is a variant of the method, named with them
METHOD_SETTINGS = {"carrier": ("period", "axes", "orientation", "coding", "outside_amplitude", "polarity"),
                   "convolution": ("kernel_size", "blur")}


# ---- collecting ---------------------------------------------------------------------------------
def _results_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob(RESULTS_NAME))
            if not found:
                raise VoxShieldInputError(f"{path}: no {RESULTS_NAME} found in this folder.")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise VoxShieldInputError(f"{path}: results file or folder not found.")
    return list(dict.fromkeys(file.resolve() for file in files))  # a file named twice counts once


def collect_results(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """
    Read victim evaluations written by custom.evaluate.

    Args:
        paths: results.json files, or folders searched recursively for results.json.

    Returns:
        one dict per file (each file once), as written, with ``"source"`` set to the file's path.

    Raises:
        VoxShieldInputError: naming the file, for a missing path, unreadable JSON, another
            ``format`` or a file without the run and metrics sections.
    """
    results = []
    for path in _results_files(paths):
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise VoxShieldInputError(f"{path}: unreadable results file ({error}).") from error
        found = content.get("format") if isinstance(content, dict) else None
        if found != RESULTS_FORMAT:
            raise VoxShieldInputError(f"{path}: format {found!r} is not {RESULTS_FORMAT!r}.")
        try:
            content["run"]["method"], content["run"]["victim"], content["metrics"]["aggregate"]["mean_dice"]
        except (KeyError, TypeError) as error:
            raise VoxShieldInputError(f"{path}: incomplete results file (missing {error}).") from error
        results.append({**content, "source": str(path)})
    return results


# ---- summarising -------------------------------------------------------------------------------
def _enabled(weight) -> bool:
    """A loss weight missing from the training record counts as on: only an explicit 0 ablates it."""
    return weight is None or float(weight) > 0


@dataclasses.dataclass(frozen=True)
class Variant:
    """
    How the training data of a result was protected, as far as the tables tell results apart.

    Args:
        ablation: CLEAN for clean data, else one of ABLATIONS: which generator losses were on.
        settings: the settings that differ from configs/train.json's, each as "name value", then the
            fitting epochs when there are such settings; empty for the paper's settings.
    """

    ablation: str
    settings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The variant's row name: the ablation, then its other settings after a semicolon."""
        return f"{self.ablation}; {', '.join(self.settings)}" if self.settings else self.ablation


def _variant(result: dict) -> Variant:
    """The variant of a result: clean, or which losses its generator was trained with and how its
    settings differ from the defaults."""
    if result["run"]["method"] == CLEAN:
        return Variant(CLEAN)
    protection = result.get("protection") or {}
    # a training-free method has no training record: its perturbation parameters say how it was made
    settings = _training(result) or protection.get("parameters")
    if not settings:
        return Variant(FULL)
    spd, isc = _enabled(settings.get("lambda_spd")), _enabled(settings.get("lambda_isc"))
    ablation = ABLATIONS[(not spd) + 2 * (not isc)]  # ABLATIONS lists full, w/o SPD, w/o ISC, w/o both
    other = _other_settings(settings) + _method_settings(result["run"]["method"], settings)
    if other and "epochs" in settings:  # Table 4 compares fits of any length: keep them apart
        other.append(f"{settings['epochs']} epochs")
    return Variant(ablation, tuple(other))


def _training(result: dict) -> dict | None:
    """The training record of the checkpoint a protected copy was made with, if any."""
    return (fitted_record(result.get("protection") or {}) or {}).get("training")


@functools.cache
def train_defaults() -> dict:
    """
    configs/train.json's values of SETTINGS, METHOD_SETTINGS and NETWORKS, read once.

    Returns:
        setting or network config key (e.g. "eps", "protectors#carrier#period", "generator_def") -> its
        value in train.json.
    """
    method_keys = tuple(f"protectors#{method}#{name}" for method, names in METHOD_SETTINGS.items() for name in names)
    return shared_defaults(SETTINGS + method_keys, tuple(NETWORKS.values()))


def _differs(value, default) -> bool:
    return not math.isclose(value, default) if isinstance(default, float) else value != default


def _other_settings(settings: dict) -> list[str]:
    """The settings of a training record (or a training-free method's parameters) that differ from
    configs/train.json's, as "name value" (a setting missing from a record counts as the default),
    then each network argument that differs, as "generator channels [8, 16, 32, 64]"."""
    defaults = train_defaults()
    other = []
    for name in SETTINGS:
        value = settings.get(name, defaults[name])
        if _differs(value, defaults[name]):
            other.append(setting_text(name, value))
    for record_key, config_key in NETWORKS.items():
        built = settings.get(record_key) or {}  # records written before networks were recorded: the default
        other += [f"{record_key} {argument} {built[argument]}" for argument, default in defaults[config_key].items()
                  if argument in built and built[argument] != default]
    return other


def _method_settings(method: str, parameters: dict) -> list[str]:
    """The hyperparameters of METHOD_SETTINGS[method] in ``parameters`` (a copy's) that differ from
    train.json's, as "name value"; [] for a method without such settings."""
    defaults = train_defaults()
    return [setting_text(name, parameters[name]) for name in METHOD_SETTINGS.get(method, ())
            if name in parameters and _differs(parameters[name], defaults[f"protectors#{method}#{name}"])]


def _budget(result: dict) -> tuple[float, bool] | None:
    """
    The budget of a protected copy as the frontier compares them: (eps, mask_roi), from the copy's
    perturbation parameters (then its training record, then configs/train.json's defaults). None for
    clean data and for a copy made with other settings than train.json's besides these two (an
    ablated loss, another ROI dilation, other networks...), which the frontier leaves out; the fitting
    length and a method's own hyperparameters (METHOD_SETTINGS) are kept apart by the frontier's rows
    instead.
    """
    if result["run"]["method"] == CLEAN:
        return None
    defaults = train_defaults()
    parameters = (result.get("protection") or {}).get("parameters") or {}
    settings = _training(result) or parameters

    def recorded(name: str):
        return parameters.get(name, settings.get(name, defaults[name]))

    without_budget = {**settings, "eps": defaults["eps"], "mask_roi": defaults["mask_roi"]}
    ablated = not (_enabled(settings.get("lambda_spd")) and _enabled(settings.get("lambda_isc")))
    if ablated or _other_settings(without_budget):
        return None
    return float(recorded("eps")), bool(recorded("mask_roi"))


def _recipe_key(recipe: dict) -> str:
    """A victim recipe without its seed, as text: results with equal keys were trained alike. A
    setting recorded as null counts as not recorded, so a file written before a setting existed (e.g.
    no "countermeasure") pairs with one that records it switched off, and one without a recipe name
    with a "patch" recipe."""
    named = {"name": "patch", **recipe}  # files written before recipes had names used the patch recipe
    return json.dumps({name: value for name, value in named.items() if name != "seed" and value is not None},
                      sort_keys=True)


def setting_text(name: str, value) -> str:
    """
    A setting as the tables name it.

    Args:
        name: the setting's name, e.g. "eps".
        value: its value; a float is written to 4 significant digits.

    Returns:
        "name value", e.g. "eps 0.01569".
    """
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


def _percent(aggregate: dict | None) -> float | None:
    """An aggregate's mean Dice in %, None when there is none."""
    dice = (aggregate or {}).get("mean_dice")
    return None if dice is None else 100 * dice


def summarise(result: dict) -> dict:
    """
    The fields the tables and the views use, from one results.json.

    Args:
        result: one of collect_results's dicts.

    Returns:
        {"source", "dataset", "method", "method_settings" (its own hyperparameters that differ from
        train.json's, as "name value"), "victim", "variant" (a Variant), "fit_epochs" (the training
        record's epochs, None without one), "test_cases", "recipe" ((epochs, iterations,
        augmentation)), "recipe_key" (the recipe without its seed, as text), "countermeasure",
        "countermeasure_settings" (as evaluate recorded them, e.g. pgd_at's eps; None without),
        "recipe_name", "best_dsc_percent" (the checkpoint best on protected validation, None without
        one), "seed", "budget" ((eps, mask_roi), None where the frontier leaves the result out) and
        "values" ({"dsc_percent", "hd95_mm", "psnr_db_volume", "ssim_3d_volume"}, each None when not
        measured)}.
    """
    run, overall = result["run"], result["metrics"]["aggregate"]
    seen = (result.get("imperceptibility") or {}).get("aggregate") or {}
    recipe = result.get("recipe") or {}
    test_cases = run.get("test_cases")
    return {
        "source": result.get("source"),
        "dataset": str(run.get("dataset_name") or Path(str(run.get("test_data"))).name),
        "method": run["method"],
        "method_settings": tuple(_method_settings(run["method"], (result.get("protection") or {}).get("parameters") or {})),
        "victim": str(run["victim"]),
        "variant": _variant(result),
        "fit_epochs": (_training(result) or {}).get("epochs"),
        "test_cases": len(test_cases) if isinstance(test_cases, list) else test_cases,
        "recipe": (recipe.get("epochs"), recipe.get("iterations"), recipe.get("augmentation")),
        "recipe_key": _recipe_key(recipe),
        "countermeasure": recipe.get("countermeasure"),
        "countermeasure_settings": recipe.get("countermeasure_settings"),
        "recipe_name": recipe.get("name", "patch"),
        "best_dsc_percent": _percent((result.get("metrics_best_on_protected_validation") or {}).get("aggregate")),
        "seed": recipe.get("seed"),
        "budget": _budget(result),
        "values": {
            "dsc_percent": _percent(overall),
            "hd95_mm": overall.get("mean_hd95_mm"),
            "psnr_db_volume": seen.get("psnr_db_volume"),
            "ssim_3d_volume": seen.get("ssim_3d_volume"),
        },
    }


# ---- shared by the tables and the views ---------------------------------------------------------
def by_fit_length(summaries: list[dict], name, order) -> tuple[dict[int, str], list[str]]:
    """
    Row names and their order. Where one name covers fits of several lengths (training epochs), each
    length gets a row of its own, "name, N epochs", shortest first, so they are not averaged together
    (a result without a training record, e.g. an older file, keeps the plain name).

    Args:
        summaries: as returned by summarise.
        name: summary -> its row name before the split by fit length.
        order: row name -> its sort key.

    Returns:
        (id(summary) -> row name, the row names in order: by ``order(name)``, then fit length).
    """
    lengths: dict[str, set] = {}
    for s in summaries:
        lengths.setdefault(name(s), set()).add(s["fit_epochs"])
    split = {row for row, found in lengths.items() if len(found - {None}) > 1}
    rows = {id(s): f"{name(s)}, {s['fit_epochs']} epochs" if name(s) in split and s["fit_epochs"] is not None
            else name(s) for s in summaries}
    ordered = sorted({(order(name(s)), s["fit_epochs"] or 0, rows[id(s)]) for s in summaries})
    return rows, list(dict.fromkeys(row for *_, row in ordered))


def metric_cell(summaries: list[dict], metric: str) -> dict:
    """
    One metric over several results, e.g. the seeds of a table cell.

    Args:
        summaries: as returned by summarise.
        metric: a key of their "values", e.g. "dsc_percent".

    Returns:
        {"mean": the mean over the results that have the metric (None when none has it), "n": how
        many have it, "results": how many there are}.
    """
    values = [s["values"][metric] for s in summaries if s["values"][metric] is not None]
    return {"mean": float(np.mean(values)) if values else None, "n": len(values), "results": len(summaries)}


def table4_row(summary: dict) -> str:
    """
    Table 4's row name, which also names a copy made with other settings in the countermeasure matrix.

    Args:
        summary: as returned by summarise.

    Returns:
        CLEAN_REFERENCE for clean data, else "method: settings", with the loss ablation only where it
        applies (the voxshield generator's), e.g. "random: eps 0.1255", "voxshield: full; eps 0.06275,
        50 epochs".
    """
    method, variant = summary["method"], summary["variant"]
    if method == CLEAN:
        return CLEAN_REFERENCE
    if method != ABLATED_METHOD and variant.ablation == FULL:  # the other methods have no losses to ablate
        return f"{method}: {', '.join(variant.settings)}"
    return f"{method}: {variant.name}"
