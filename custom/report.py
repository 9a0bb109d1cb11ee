"""The paper's tables from victim evaluations (results.json), and the report workflow that writes them
with the figures of custom.figures."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom.evaluate import RESULTS_NAME
from custom.figures import comparison_figure, frontier_figure, perturbation_figure
from custom.manifest import fitted_record
from custom.markdown import markdown_table
from custom.victims import SLICE_VICTIMS
from custom.nifti_io import VoxShieldInputError, write_atomic
from custom.bundle_utils import shared_defaults

RESULTS_FORMAT = "voxshield-evaluation/1"
REPORT_FORMAT = "voxshield-report/1"
TABLES_NAME = "tables.md"
REPORT_NAME = "report.json"
PERTURBATION_FIGURE = "perturbation.png"
COMPARISON_FIGURE = "comparison.png"
FRONTIER_FIGURE = "frontier.png"
MAIN_VICTIM = "unet"
ABLATED_METHOD = "voxshield"
CLEAN = "clean"
FULL = "full"
ABLATIONS = (FULL, "w/o L_SPD", "w/o L_ISC", "w/o L_SPD and L_ISC")
CLEAN_REFERENCE = "clean (reference)"
FLOOR_METHOD = "random"  # uniform noise in the ROI: what the support and the bound alone do
FRONTIER_TITLE = "Frontier: victim DSC against the visibility of the perturbation"
COUNTERMEASURE_TITLE = "Countermeasures: victim DSC (% of clean) after an exploiter's step"
AUTHORS_PROTOCOL_TITLE = "The authors' protocol: whole-volume victims, best checkpoint on protected validation"
(SLICE_VICTIM,) = SLICE_VICTIMS
# What shapes the noise: a result fitted with other values than configs/train.json's stays out of
# Tables 1-3 (they compare methods as published) and is listed in Table 4
SETTINGS = ("eps", "roi_dilation", "squash", "mask_roi", "surrogate_steps", "generator_steps",
            "surrogate_batches_per_epoch")
NETWORKS = {"generator": "generator_def", "surrogate": "surrogate_def"}  # training record key -> config key
# key in report.json -> (Markdown header, decimals)
METRICS = {
    "dsc_percent": ("DSC (%)", 2),
    "hd95_mm": ("HD95 (mm)", 2),
    "psnr_db_volume": ("PSNR (dB)", 2),
    "ssim_3d_volume": ("SSIM", 4),
}


# ---- results ------------------------------------------------------------------------------------
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
    other = _other_settings(settings)
    if other and "epochs" in settings:  # Table 4 compares fits of any length: keep them apart
        other.append(f"{settings['epochs']} epochs")
    return Variant(ablation, tuple(other))


def _training(result: dict) -> dict | None:
    """The training record of the checkpoint a protected copy was made with, if any."""
    return (fitted_record(result.get("protection") or {}) or {}).get("training")


@functools.cache
def _defaults() -> dict:
    """configs/train.json's values of SETTINGS and NETWORKS (read once)."""
    return shared_defaults(SETTINGS, tuple(NETWORKS.values()))


def _other_settings(settings: dict) -> list[str]:
    """The settings of a training record (or a training-free method's parameters) that differ from
    configs/train.json's, as "name value" (a setting missing from a record counts as the default),
    then each network argument that differs, as "generator channels [8, 16, 32, 64]"."""
    defaults = _defaults()
    other = []
    for name in SETTINGS:
        default = defaults[name]
        value = settings.get(name, default)
        same = math.isclose(value, default) if isinstance(default, float) else value == default
        if not same:
            other.append(_setting_text(name, value))
    for record_key, config_key in NETWORKS.items():
        built = settings.get(record_key) or {}  # records written before networks were recorded: the default
        other += [f"{record_key} {argument} {built[argument]}" for argument, default in defaults[config_key].items()
                  if argument in built and built[argument] != default]
    return other


def _budget(result: dict) -> tuple[float, bool] | None:
    """
    The budget of a protected copy as the frontier compares them: (eps, mask_roi), from the copy's
    perturbation parameters (then its training record, then configs/train.json's defaults). None for
    clean data and for a copy made with other settings than train.json's besides these two (an
    ablated loss, another ROI dilation, other networks...), which the frontier leaves out; the fitting
    length is kept apart by the frontier's rows instead.
    """
    if result["run"]["method"] == CLEAN:
        return None
    defaults = _defaults()
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


def _setting_text(name: str, value) -> str:
    return f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"


def _percent(aggregate: dict | None) -> float | None:
    """An aggregate's mean Dice in %, None when there is none."""
    dice = (aggregate or {}).get("mean_dice")
    return None if dice is None else 100 * dice


def _summary(result: dict) -> dict:
    """The fields the tables use, from one results.json."""
    run, overall = result["run"], result["metrics"]["aggregate"]
    seen = (result.get("imperceptibility") or {}).get("aggregate") or {}
    recipe = result.get("recipe") or {}
    test_cases = run.get("test_cases")
    return {
        "source": result.get("source"),
        "dataset": str(run.get("dataset_name") or Path(str(run.get("test_data"))).name),
        "method": run["method"],
        "victim": str(run["victim"]),
        "variant": _variant(result),
        "fit_epochs": (_training(result) or {}).get("epochs"),
        "test_cases": len(test_cases) if isinstance(test_cases, list) else test_cases,
        "recipe": (recipe.get("epochs"), recipe.get("iterations"), recipe.get("augmentation")),
        "recipe_key": _recipe_key(recipe),
        "countermeasure": recipe.get("countermeasure"),
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


# ---- tables -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Table:
    """Rows x column groups (a dataset, or a dataset and a method) x metrics; each cell holds the
    summaries of every result that falls in it."""

    key: str
    title: str
    row_name: str
    group_names: tuple[str, ...]
    metrics: list[str]
    rows: list[str]
    groups: list[tuple[str, ...]]
    cells: dict[tuple[str, tuple[str, ...]], list[dict]]
    scope: str

    @property
    def used(self) -> list[dict]:
        return [summary for cell in self.cells.values() for summary in cell]


def _build(key, title, row_name, group_names, metrics, entries, row_order, scope, method_order=()) -> _Table:
    """``entries``: (row, group, summary) triples; column groups by dataset, then (for groups that
    name a method) in ``method_order``."""
    cells: dict = {}
    for row, group, summary in entries:
        cells.setdefault((row, group), []).append(summary)
    rows = [row for row in row_order if any(cell_row == row for cell_row, _ in cells)]
    groups = sorted({group for _, group in cells},
                    key=lambda group: (group[0], [method_order.index(m) for m in group[1:]]))
    return _Table(key, title, row_name, group_names, metrics, rows, groups, cells, scope)


def _by_fit_length(summaries: list[dict], name, order) -> tuple[dict[int, str], list[str]]:
    """Row names and their order: id(summary) -> ``name(summary)``, rows sorted by ``order(name)``.
    Where one name covers fits of several lengths (training epochs), each length gets a row of its
    own, "name, N epochs", shortest first, so they are not averaged together (a result without a
    training record, e.g. an older file, keeps the plain name)."""
    lengths: dict[str, set] = {}
    for s in summaries:
        lengths.setdefault(name(s), set()).add(s["fit_epochs"])
    split = {row for row, found in lengths.items() if len(found - {None}) > 1}
    rows = {id(s): f"{name(s)}, {s['fit_epochs']} epochs" if name(s) in split and s["fit_epochs"] is not None
            else name(s) for s in summaries}
    ordered = sorted({(order(name(s)), s["fit_epochs"] or 0, rows[id(s)]) for s in summaries})
    return rows, list(dict.fromkeys(row for *_, row in ordered))


def _paper_tables(summaries: list[dict]) -> list[_Table]:
    # the patch recipe without an exploiter's step; the others have their own sections
    summaries = [s for s in summaries if s["countermeasure"] is None and s["recipe_name"] == "patch"]
    main = [s for s in summaries if s["variant"] in (Variant(CLEAN), Variant(FULL))]
    method, method_order = _by_fit_length(main, lambda s: s["method"], lambda name: (name != CLEAN, name))
    table1 = _build(
        "table1", "Table 1: protection methods against a 3D UNet victim", "method", ("dataset",),
        list(METRICS), [(method[id(s)], (s["dataset"],), s) for s in main if s["victim"] == MAIN_VICTIM],
        method_order,
        f"victim {MAIN_VICTIM}; protected data from fully trained generators (no ablations)",
    )
    victims = sorted({s["victim"] for s in main}, key=lambda victim: (victim != MAIN_VICTIM, victim))
    table2 = _build(
        "table2", "Table 2: victim architectures", "victim", ("dataset", "method"),
        ["dsc_percent", "hd95_mm"], [(s["victim"], (s["dataset"], method[id(s)]), s) for s in main], victims,
        "protected data from fully trained generators (no ablations)", method_order,
    )
    ablated = [s for s in summaries if s["victim"] == MAIN_VICTIM and s["method"] in (CLEAN, ABLATED_METHOD)
               and not s["variant"].settings]
    variant, variant_order = _by_fit_length(
        ablated, lambda s: CLEAN_REFERENCE if s["method"] == CLEAN else s["variant"].ablation,
        (CLEAN_REFERENCE, *ABLATIONS).index)
    ablation = [(variant[id(s)], (s["dataset"],), s) for s in ablated]
    has_ablation = any(row != CLEAN_REFERENCE for row, _, _ in ablation)
    table3 = _build(
        "table3", f"Table 3: ablation of the {ABLATED_METHOD} generator losses", "variant", ("dataset",),
        list(METRICS), ablation if has_ablation else [], variant_order,
        f"victim {MAIN_VICTIM}; variant from protection.generator.training (lambda_spd, lambda_isc)",
    )
    other = [(_other_row(s), (s["dataset"],), s) for s in summaries
             if s["victim"] == MAIN_VICTIM and (s["variant"].settings or s["method"] == CLEAN)]
    other_rows = sorted({row for row, _, _ in other} - {CLEAN_REFERENCE})
    table4 = _build(
        "table4", "Table 4: settings other than train.json's defaults", "method: variant", ("dataset",),
        list(METRICS), other if other_rows else [], [CLEAN_REFERENCE, *other_rows],
        f"victim {MAIN_VICTIM}; defaults: " + ", ".join(_setting_text(name, _defaults()[name]) for name in SETTINGS),
    )
    return [table for table in (table1, table2, table3, table4) if table.rows]


def _other_row(summary: dict) -> str:
    """Table 4's row name: the method and its settings (the loss ablation only where it applies)."""
    method, variant = summary["method"], summary["variant"]
    if method == CLEAN:
        return CLEAN_REFERENCE
    if method != ABLATED_METHOD and variant.ablation == FULL:  # the other methods have no losses to ablate
        return f"{method}: {', '.join(variant.settings)}"
    return f"{method}: {variant.name}"


def _cell(summaries: list[dict], metric: str) -> dict:
    values = [s["values"][metric] for s in summaries if s["values"][metric] is not None]
    return {"mean": float(np.mean(values)) if values else None, "n": len(values), "results": len(summaries)}


def _format(cell: dict, digits: int) -> str:
    if cell["mean"] is None:
        return "n/a"
    text = f"{cell['mean']:.{digits}f}"
    return f"{text} (n={cell['n']})" if cell["results"] > 1 else text


def _recipe_text(recipe: tuple) -> str:
    epochs, iterations, augmentation = ("?" if value is None else value for value in recipe)
    switch = {True: "on", False: "off"}.get(augmentation, augmentation)
    return f"{epochs} epochs ({iterations} iterations), augmentation {switch}"


def _note(table: _Table) -> str:
    """Where the numbers come from: files, test cases per dataset, victim recipes."""
    used = table.used
    tests = {}
    for s in used:
        tests.setdefault(s["dataset"], set()).add(s["test_cases"])
    recipes = {}
    for s in used:
        recipes.setdefault(s["victim"], set()).add(_recipe_text(s["recipe"]))
    test_text = "; ".join(
        f"{dataset}: {' or '.join(str(count) for count in sorted(counts, key=str))} clean held-out cases"
        for dataset, counts in sorted(tests.items())
    )
    recipe_text = "; ".join(f"{victim}: {' / '.join(sorted(texts))}" for victim, texts in sorted(recipes.items()))
    seen = (
        " PSNR and SSIM: protected training copy vs its clean twin over the whole volume (n/a: not measured, "
        "e.g. clean data)." if "psnr_db_volume" in table.metrics else ""
    )
    return (
        f"From {len(used)} results.json file(s); {table.scope}. Test sets: {test_text}. Victim recipes: "
        f"{recipe_text}. DSC: mean over regions and test cases; HD95 in mm.{seen} "
        "A cell with several results (e.g. seeds) shows their mean and n; -: no result."
    )


def _markdown(table: _Table) -> str:
    """A table's Markdown: its title, the table and its note."""
    headers = [table.row_name] + [
        f"{' '.join(group)} {METRICS[metric][0]}" for group in table.groups for metric in table.metrics
    ]
    rows = [
        [row] + [
            _format(_cell(table.cells[(row, group)], metric), METRICS[metric][1])
            if (row, group) in table.cells else "-"
            for group in table.groups
            for metric in table.metrics
        ]
        for row in table.rows
    ]
    return "\n".join([f"## {table.title}", "", markdown_table(headers, rows), "", _note(table), ""])


def _json_rows(table: _Table) -> list[dict]:
    rows = []
    for row in table.rows:
        for group in table.groups:
            if (row, group) not in table.cells:
                continue
            summaries = table.cells[(row, group)]
            rows.append({
                table.row_name: row,
                **dict(zip(table.group_names, group)),
                "results": len(summaries),
                "sources": [s["source"] for s in summaries],
                **{metric: _cell(summaries, metric) for metric in table.metrics},
            })
    return rows


def _render(built: list[_Table], frontier: list[dict], matrix: dict, authors: list[dict]) -> str:
    """The paper's tables, then the frontier, the countermeasure matrix and the authors' protocol
    when they have rows."""
    return "\n".join([*(_markdown(table) for table in built), *([_frontier_markdown(frontier)] if frontier else []),
                      *([_countermeasure_markdown(matrix)] if matrix["rows"] else []),
                      *([_authors_protocol_markdown(authors)] if authors else [])])


# ---- the frontier -------------------------------------------------------------------------------
def _recipe_labels(keys: set[str]) -> dict[str, str]:
    """Recipe key -> what tells it from the others (" (epochs 50)"); "" for each when there is one."""
    recipes = {key: json.loads(key) for key in keys}
    names = {name for recipe in recipes.values() for name in recipe}
    differing = sorted(name for name in names if len({json.dumps(r.get(name)) for r in recipes.values()}) > 1)
    return {key: f" ({', '.join(f'{name} {recipe.get(name)}' for name in differing)})" if differing else ""
            for key, recipe in recipes.items()}


def _clean_dsc_by_recipe(victims: list[dict]) -> dict[str, list[float]]:
    """The clean victims' DSC (%) per victim recipe (recipe_key): the references of "% of clean"."""
    clean: dict[str, list[float]] = {}
    for s in victims:
        if s["method"] == CLEAN:
            clean.setdefault(s["recipe_key"], []).append(s["values"]["dsc_percent"])
    return clean


def _frontier(summaries: list[dict]) -> list[dict]:
    """
    The frontier's rows: the UNet victims trained on copies made with train.json's settings but for
    eps and mask_roi (see _budget), grouped by (method, support, eps) and victim recipe, a method's
    fits of several lengths kept apart as in Table 1 ("voxshield, 100 epochs"). Each victim's DSC is
    taken as a percentage of the mean DSC of the clean UNet victims trained with the same recipe (any
    seed); a group without such a clean victim is left out.

    Returns:
        per group: method (with the recipe where several are present), support ("ROI" or "whole
        volume"), eps, floor (random noise in the ROI), the mean whole-volume PSNR and SSIM, the mean,
        lowest and highest DSC as % of clean, the victims' seeds, the clean reference DSC (%) with its
        number of results, and the source files; ordered by method (the floor first), ROI before
        whole volume, then eps.
    """
    # no exploiter's step: what a step does is the countermeasure matrix's
    victims = [s for s in summaries if s["victim"] == MAIN_VICTIM and s["values"]["dsc_percent"] is not None
               and s["countermeasure"] is None]
    clean = _clean_dsc_by_recipe(victims)
    protected = [s for s in victims if s["budget"] is not None and s["recipe_key"] in clean]
    row_name, name_order = _by_fit_length(protected, lambda s: s["method"], lambda name: (name != FLOOR_METHOD, name))
    recipe_labels = _recipe_labels({s["recipe_key"] for s in protected})
    groups: dict[tuple, list[dict]] = {}
    for s in protected:
        eps, mask_roi = s["budget"]
        groups.setdefault((name_order.index(row_name[id(s)]), not mask_roi, eps, s["recipe_key"]), []).append(s)
    rows = []
    for (order, whole_volume, eps, recipe), members in sorted(groups.items()):
        reference = float(np.mean(clean[recipe]))
        percents = [100 * s["values"]["dsc_percent"] / reference for s in members]
        rows.append({
            "method": name_order[order] + recipe_labels[recipe],
            "support": "whole volume" if whole_volume else "ROI",
            "eps": eps,
            "floor": name_order[order] == FLOOR_METHOD and not whole_volume,
            "psnr_db_volume": _cell(members, "psnr_db_volume")["mean"],
            "ssim_3d_volume": _cell(members, "ssim_3d_volume")["mean"],
            "dsc_percent_of_clean": {"mean": float(np.mean(percents)), "min": min(percents), "max": max(percents)},
            "seeds": [s["seed"] for s in members],
            "clean_dsc_percent": {"mean": reference, "results": len(clean[recipe])},
            "sources": [s["source"] for s in members],
        })
    return rows


# ---- the authors' protocol -----------------------------------------------------------------------
def _authors_protocol(summaries: list[dict]) -> list[dict]:
    """
    The victims trained with the authors' recipe (evaluate's ``--recipe_name paper``: whole volumes,
    the checkpoint best on a protected validation split), per method as in Table 1 and dataset, with
    the clean victim of the same recipe as reference.

    Returns:
        rows {"method", "dataset", "last", "best", "last_percent_of_clean", "best_percent_of_clean",
        "seeds"}: mean DSC (%) of the last and of the best-on-protected-validation checkpoint, and
        each as % of the clean victims' mean (None without a clean victim).
    """
    paper = [s for s in summaries if s["recipe_name"] == "paper" and s["countermeasure"] is None
             and s["variant"] in (Variant(CLEAN), Variant(FULL)) and s["values"]["dsc_percent"] is not None]
    names, order = _by_fit_length(paper, lambda s: s["method"], lambda name: (name != CLEAN, name))
    groups: dict[tuple, list[dict]] = {}
    for s in paper:
        groups.setdefault((order.index(names[id(s)]), s["dataset"], s["recipe_key"]), []).append(s)
    clean = {(dataset, key): members for (index, dataset, key), members in groups.items() if order[index] == CLEAN}
    rows = []
    for (index, dataset, key), members in sorted(groups.items()):
        last = float(np.mean([s["values"]["dsc_percent"] for s in members]))
        bests = [s["best_dsc_percent"] for s in members if s["best_dsc_percent"] is not None]
        best = float(np.mean(bests)) if bests else None
        reference = clean.get((dataset, key))
        clean_last = float(np.mean([s["values"]["dsc_percent"] for s in reference])) if reference else None
        clean_bests = [s["best_dsc_percent"] for s in reference or [] if s["best_dsc_percent"] is not None]
        clean_best = float(np.mean(clean_bests)) if clean_bests else None
        rows.append({
            "method": order[index], "dataset": dataset, "last": last, "best": best,
            "last_percent_of_clean": None if not clean_last else 100 * last / clean_last,
            "best_percent_of_clean": None if best is None or not clean_best else 100 * best / clean_best,
            "seeds": [s["seed"] for s in members],
        })
    return rows


def _authors_protocol_markdown(rows: list[dict]) -> str:
    """The authors' protocol section of tables.md."""
    def number(value):
        return "n/a" if value is None else f"{value:.2f}"

    cells = [[row["method"], row["dataset"], number(row["last"]), number(row["last_percent_of_clean"]),
              number(row["best"]), number(row["best_percent_of_clean"]),
              ", ".join("?" if seed is None else str(seed) for seed in row["seeds"])] for row in rows]
    headers = ["method", "dataset", "DSC last (%)", "last, % of clean", "DSC best on protected validation (%)",
               "best, % of clean", "seeds"]
    note = ("Victims trained with the authors' recipe (evaluate --recipe_name paper: whole volumes, batch 8, "
            "Adam 5e-4, the checkpoint best on a validation split of the victim's own, protected, training data); "
            "scored on the clean test cases; % of clean: over the clean victim of the same recipe.")
    return "\n".join([f"## {AUTHORS_PROTOCOL_TITLE}", "", markdown_table(headers, cells), "", note, ""])


# ---- countermeasures ------------------------------------------------------------------------------
def _countermeasure_matrix(summaries: list[dict]) -> dict:
    """
    What an exploiter's step does to each method's protection: for every protected copy (named as in
    Table 1, or as in Table 4 when made with other settings, e.g. another eps; loss ablations left
    out) and every victim recipe of a 3D UNet (or the slice-wise 2D victim) with a clean victim of
    the same recipe, each victim's DSC as a percentage of that clean
    victim's mean DSC, so a countermeasure that also costs the clean victim accuracy is not counted
    as lifting the protection.

    Returns:
        {"columns": [column names], "rows": [{"method", "cells": {column: {"mean", "min", "max",
        "results", "clean_dsc_percent"}}}]}; columns are "none", the countermeasures, "slice2d victim"
        (with " + countermeasure" when both), each with the recipe's other differences in brackets.
        Only copies with at least one countermeasure (or 2D victim) result get a row; empty rows and
        columns when no result has a countermeasure or the 2D victim.
    """
    victims = [s for s in summaries if s["victim"] in (MAIN_VICTIM, SLICE_VICTIM)
               and s["values"]["dsc_percent"] is not None and s["variant"].ablation in (CLEAN, FULL)]
    if not any(s["countermeasure"] is not None or s["victim"] == SLICE_VICTIM for s in victims):
        return {"columns": [], "rows": []}
    clean = _clean_dsc_by_recipe(victims)
    protected = [s for s in victims if s["method"] != CLEAN and s["recipe_key"] in clean]
    # Table 1's names for copies made with train.json's settings, Table 4's for the others (another eps ...)
    method, _ = _by_fit_length([s for s in protected if not s["variant"].settings], lambda s: s["method"], str)
    method.update({id(s): _other_row(s) for s in protected if s["variant"].settings})
    method_order = sorted(set(method.values()))
    differences = _recipe_labels({s["recipe_key"] for s in protected})

    def column(s: dict) -> str:
        step = [f"{SLICE_VICTIM} victim"] if s["victim"] == SLICE_VICTIM else []
        step += [s["countermeasure"]] if s["countermeasure"] is not None else []
        # the victim and the countermeasure are the column's name already
        extra = [part for part in differences[s["recipe_key"]].strip(" ()").split(", ")
                 if part and not part.startswith(("victim ", "countermeasure "))]
        return " + ".join(step or ["none"]) + (f" ({', '.join(extra)})" if extra else "")

    cells: dict[tuple[str, str], list[dict]] = {}
    for s in protected:
        cells.setdefault((method[id(s)], column(s)), []).append(s)
    columns = sorted({name for _, name in cells}, key=lambda name: (name != "none", name))
    rows = []
    for row in method_order:
        row_cells = {}
        for name in columns:
            members = cells.get((row, name), [])
            if members:
                reference = float(np.mean(clean[members[0]["recipe_key"]]))
                percents = [100 * s["values"]["dsc_percent"] / reference for s in members]
                row_cells[name] = {"mean": float(np.mean(percents)), "min": min(percents), "max": max(percents),
                                   "results": len(members), "clean_dsc_percent": reference}
        if any(name != "none" for name in row_cells):  # a copy no countermeasure was tried on says nothing here
            rows.append({"method": row, "cells": row_cells})
    return {"columns": columns, "rows": rows}


def _countermeasure_markdown(matrix: dict) -> str:
    """The countermeasure matrix (see _countermeasure_matrix) as a Markdown section."""
    lines = [[row["method"], *(f"{row['cells'][name]['mean']:.2f}" if name in row["cells"] else "-"
                               for name in matrix["columns"])] for row in matrix["rows"]]
    clean = [f"{name}: " + " / ".join(sorted({f"{row['cells'][name]['clean_dsc_percent']:.2f}%"
                                              for row in matrix["rows"] if name in row["cells"]}))
             for name in matrix["columns"]]
    note = (
        "Victim DSC as % of the clean victim's DSC under the same countermeasure and recipe (mean over seeds; "
        f"victim {MAIN_VICTIM} unless the column names the slice-wise 2D victim); methods named as in Tables 1 and 4. "
        f"Clean victims' DSC: {'; '.join(clean)}. Below 100: the copy still costs the victim accuracy after the "
        "exploiter's step; about 100: the step removed the protection (or there was none)."
    )
    return "\n".join([f"## {COUNTERMEASURE_TITLE}", "", markdown_table(["method", *matrix["columns"]], lines), "",
                      note, ""])


def _eps_text(eps: float) -> str:
    """eps as N/255 (the budgets are chosen in 255ths), to 3 significant digits."""
    return f"{eps * 255:.3g}/255"


def _frontier_markdown(rows: list[dict]) -> str:
    """The frontier's table (one row per group of _frontier) with its note."""
    cells = []
    for row in rows:
        dsc = row["dsc_percent_of_clean"]
        spread = f" ({dsc['min']:.2f}-{dsc['max']:.2f})" if len(row["seeds"]) > 1 else ""
        cells.append([
            row["method"] + (" (floor)" if row["floor"] else ""), row["support"], _eps_text(row["eps"]),
            "n/a" if row["psnr_db_volume"] is None else f"{row['psnr_db_volume']:.2f}",
            "n/a" if row["ssim_3d_volume"] is None else f"{row['ssim_3d_volume']:.4f}",
            f"{dsc['mean']:.2f}{spread}", ", ".join("?" if seed is None else str(seed) for seed in row["seeds"]),
        ])
    headers = ["method", "support", "eps", "PSNR (dB)", "SSIM", "DSC (% of clean)", "seeds"]
    clean = sorted({f"{row['clean_dsc_percent']['mean']:.2f}% (n={row['clean_dsc_percent']['results']})"
                    for row in rows})
    note = (
        f"From {sum(len(row['sources']) for row in rows)} results.json file(s); victim {MAIN_VICTIM}; copies made "
        "with train.json's settings but for eps and the support (mask_roi: ROI, or the whole volume), ablations "
        "and other settings left out. DSC (% of clean): each victim's mean DSC over the mean DSC of the clean "
        f"victims trained with the same recipe ({' or '.join(clean)}), averaged over the victims' seeds, with the "
        "lowest and highest seed in brackets. PSNR and SSIM: protected training copy vs its clean twin over the "
        f"whole volume, as evaluate measures them on the written files. {FLOOR_METHOD} in the ROI (floor): uniform "
        "noise of the same bound on the label; a method protects beyond what its support and bound alone do only "
        "where it lies below that line. Figure: frontier.png."
    )
    return "\n".join([f"## {FRONTIER_TITLE}", "", markdown_table(headers, cells), "", note, ""])


def tables(results: list[dict]) -> str:
    """
    The paper's tables as Markdown, each only when it has rows:

    - Table 1, method x dataset: DSC (%), HD95 (mm), PSNR (dB) and SSIM over the whole volume, for
      the 3D UNet victim and fully trained generators (both loss weights > 0, or no training record).
    - Table 2, victim x (dataset, method): DSC and HD95, fully trained generators.
    - Table 3, ablation of the voxshield generator's losses (from protection.generator.training):
      full, w/o L_SPD (lambda_spd 0), w/o L_ISC (lambda_isc 0), with the clean reference row; UNet victim;
      only when there is a voxshield result.
    - Table 4, results fitted with settings other than configs/train.json's (SETTINGS: eps, ROI
      dilation, squash, ROI masking, surrogate and generator steps, surrogate batches per epoch; and
      the arguments of both networks, where the training record names them),
      one row per method and variant, with the clean reference row; UNet victim. Tables 1-3 leave
      these results out. A training-free method's settings are read from its perturbation parameters.

    Where Tables 1-3 hold fits of one method or variant for several lengths (training epochs), each
    length gets its own row (column group in Table 2), "name, N epochs", rather than being averaged.

    A cell with several results (e.g. seeds) shows their mean and ``(n=...)``, n counting the
    results that have that metric; "-" marks no result, "n/a" a metric that none of them has.
    A note under each table gives the test sets and victim recipes the numbers come from.

    Then, when such results exist, the frontier (see _frontier): per method, support (ROI or whole
    volume) and eps, the whole-volume PSNR and SSIM and the UNet victim's DSC as % of the clean
    victim's with the same recipe (mean over seeds, lowest and highest seed), random noise in the ROI
    marked as the floor.

    Args:
        results: as returned by collect_results.
    """
    summaries = [_summary(result) for result in results]
    return _render(_paper_tables(summaries), _frontier(summaries), _countermeasure_matrix(summaries),
                   _authors_protocol(summaries))


def write_report(paths: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict:
    """
    Write OUTPUT/tables.md (see tables) and OUTPUT/report.json, the same numbers as rows: one per
    table row and column group, with each metric's ``{"mean", "n", "results"}``; and, when there
    are frontier rows, report.json's "frontier" (the rows of _frontier) and OUTPUT/frontier.png
    (custom.figures.frontier_figure).

    Args:
        paths: results.json files or folders holding them (see collect_results).
        output_dir: created if missing.

    Returns:
        the report.json content.
    """
    results = collect_results(paths)
    summaries = [_summary(result) for result in results]
    built, frontier, matrix = _paper_tables(summaries), _frontier(summaries), _countermeasure_matrix(summaries)
    authors = _authors_protocol(summaries)
    report = {
        "format": REPORT_FORMAT,
        "sources": [result["source"] for result in results],
        "metrics": {metric: header for metric, (header, _) in METRICS.items()},
        "tables": {
            table.key: {"title": table.title, "note": _note(table), "rows": _json_rows(table)} for table in built
        },
    }
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    if matrix["rows"]:
        report["countermeasures"] = {"title": COUNTERMEASURE_TITLE, **matrix}
    if authors:
        report["authors_protocol"] = {"title": AUTHORS_PROTOCOL_TITLE, "rows": authors}
    if frontier:
        report["frontier"] = {"title": FRONTIER_TITLE, "rows": frontier}
        frontier_figure(frontier, output / FRONTIER_FIGURE)
    write_atomic(output / TABLES_NAME, _render(built, frontier, matrix, authors).encode())
    write_atomic(output / REPORT_NAME, json.dumps(report, indent=1).encode())
    return report


# ---- figures ------------------------------------------------------------------------------------
def write_figures(
    clean_dir: str | os.PathLike | None, protected_dir: str | os.PathLike | None, output_dir: str | os.PathLike,
    case_id: str | None = None, num_slices: int = 4, channel: int = 0, amplification: float = 20,
) -> list[Path]:
    """
    The report bundle's figures (see custom.figures): OUTPUT/perturbation.png and OUTPUT/comparison.png,
    or nothing when neither dataset is given.

    Raises:
        VoxShieldInputError: when only one of ``clean_dir`` and ``protected_dir`` is given.
    """
    if clean_dir is None and protected_dir is None:
        return []
    if clean_dir is None or protected_dir is None:
        raise VoxShieldInputError(f"{clean_dir or protected_dir}: figures need both --clean_dir and --protected_dir.")
    output = Path(output_dir)
    return [
        perturbation_figure(clean_dir, protected_dir, case_id, output / PERTURBATION_FIGURE, num_slices, channel),
        comparison_figure(clean_dir, protected_dir, case_id, output / COMPARISON_FIGURE, channel, amplification),
    ]
