"""What a budget buys, what survives an exploiter's step, and the authors' protocol, each a view across
victim results: the frontier, the countermeasure matrix and the authors' protocol section that
custom.report adds to the paper's tables, from custom.results's summaries."""

from __future__ import annotations

import json

import numpy as np

from custom.markdown import markdown_table
from custom.results import CLEAN, FULL, MAIN_VICTIM, SLICE_VICTIM, Variant, by_fit_length, metric_cell, table4_row

FLOOR_METHOD = "random"  # uniform noise in the ROI: what the support and the bound alone do
FRONTIER_TITLE = "Frontier: victim DSC against the visibility of the perturbation"
COUNTERMEASURE_TITLE = "Countermeasures: victim DSC (% of clean) after an exploiter's step"
AUTHORS_PROTOCOL_TITLE = "The authors' protocol: whole-volume victims, best checkpoint on protected validation"


# ---- shared by the views -------------------------------------------------------------------------
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


def _recipe_without(key: str, fields: tuple[str, ...]) -> str:
    """A recipe key (custom.results's "recipe_key") without the settings ``fields``, as text."""
    return json.dumps({name: value for name, value in json.loads(key).items() if name not in fields}, sort_keys=True)


def _copy_names(summaries: list[dict]) -> tuple[dict[int, str], list[str]]:
    """
    What the countermeasure matrix and the authors' protocol call each result's training data: Table 1's
    name (the method, "clean" for clean data, a fit length apart where one method has fits of several,
    see by_fit_length) for data made with train.json's settings, Table 4's (custom.results.table4_row,
    e.g. "voxshield: full; fit_augmentation True, 10 epochs") for the rest: other settings (eps,
    fit_augmentation ...), other networks, an ablated loss.

    Args:
        summaries: as returned by custom.results.summarise.

    Returns:
        (id(summary) -> name, the names in order: clean, then Table 1's names by method and fit length,
        then Table 4's by name).
    """
    paper = [s for s in summaries if s["variant"] in (Variant(CLEAN), Variant(FULL))]
    names, order = by_fit_length(paper, lambda s: s["method"], lambda name: (name != CLEAN, name))
    other = {id(s): table4_row(s) for s in summaries if id(s) not in names}
    return {**names, **other}, order + sorted(set(other.values()))


def _seeds_text(seeds: list) -> str:
    """The seeds of a row's victims, "?" for one not recorded."""
    return ", ".join("?" if seed is None else str(seed) for seed in seeds)


# ---- the frontier -------------------------------------------------------------------------------
def _method_line(summary: dict) -> str:
    """A frontier line's name: the method, with its own hyperparameters where they are not train.json's,
    e.g. "carrier (period 4, orientation random)"."""
    settings = summary["method_settings"]
    return f"{summary['method']} ({', '.join(settings)})" if settings else summary["method"]


def frontier_rows(summaries: list[dict]) -> list[dict]:
    """
    What a budget buys: the UNet victims trained on copies made with train.json's settings but for
    eps, mask_roi and the method's own hyperparameters (a summary's "budget"), grouped by (method with
    those hyperparameters, support, eps) and victim recipe, a
    method's fits of several lengths kept apart as in Table 1 ("voxshield, 100 epochs"). Each victim's
    DSC is taken as a percentage of the mean DSC of the clean UNet victims trained with the same
    recipe (any seed); a group without such a clean victim is left out, and so is every victim of an
    exploiter's step (see countermeasure_matrix).

    Args:
        summaries: as returned by custom.results.summarise, one per results.json.

    Returns:
        one row per group, {"method" (with the recipe where several are present), "support" ("ROI" or
        "whole volume"), "eps", "floor" (random noise in the ROI), "psnr_db_volume" and
        "ssim_3d_volume" (the means, None when not measured), "dsc_percent_of_clean" ({"mean", "min",
        "max"} over the victims), "seeds", "clean_dsc_percent" ({"mean", "results"}: the clean
        reference) and "sources" (the results.json files)}; ordered by method (the floor first), ROI
        before whole volume, then eps. Empty when no protected victim has a clean twin.
    """
    # no exploiter's step: what a step does is the countermeasure matrix's
    victims = [s for s in summaries if s["victim"] == MAIN_VICTIM and s["values"]["dsc_percent"] is not None
               and s["countermeasure"] is None]
    clean = _clean_dsc_by_recipe(victims)
    protected = [s for s in victims if s["budget"] is not None and s["recipe_key"] in clean]
    row_name, name_order = by_fit_length(protected, _method_line, lambda name: (name != FLOOR_METHOD, name))
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
            "psnr_db_volume": metric_cell(members, "psnr_db_volume")["mean"],
            "ssim_3d_volume": metric_cell(members, "ssim_3d_volume")["mean"],
            "dsc_percent_of_clean": {"mean": float(np.mean(percents)), "min": min(percents), "max": max(percents)},
            "seeds": [s["seed"] for s in members],
            "clean_dsc_percent": {"mean": reference, "results": len(clean[recipe])},
            "sources": [s["source"] for s in members],
        })
    return rows


def _eps_text(eps: float) -> str:
    """eps as N/255 (the budgets are chosen in 255ths), to 3 significant digits."""
    return f"{eps * 255:.3g}/255"


def frontier_markdown(rows: list[dict]) -> str:
    """
    The frontier as a section of tables.md.

    Args:
        rows: as returned by frontier_rows, at least one.

    Returns:
        Markdown: the title, a table with a line per row (method, support, eps as N/255, PSNR, SSIM,
        DSC as % of clean with the seeds' range, seeds) and a note on where the numbers come from,
        ending in a newline.
    """
    cells = []
    for row in rows:
        dsc = row["dsc_percent_of_clean"]
        spread = f" ({dsc['min']:.2f}-{dsc['max']:.2f})" if len(row["seeds"]) > 1 else ""
        cells.append([
            row["method"] + (" (floor)" if row["floor"] else ""), row["support"], _eps_text(row["eps"]),
            "n/a" if row["psnr_db_volume"] is None else f"{row['psnr_db_volume']:.2f}",
            "n/a" if row["ssim_3d_volume"] is None else f"{row['ssim_3d_volume']:.4f}",
            f"{dsc['mean']:.2f}{spread}", _seeds_text(row["seeds"]),
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


# ---- countermeasures ------------------------------------------------------------------------------
def _step_text(summary: dict) -> str:
    """A result's countermeasure as a column names it, with the bound it attacks at where its settings
    have one (pgd_at: "pgd_at eps 16/255"), so victims attacked at different bounds stay apart."""
    eps = (summary["countermeasure_settings"] or {}).get("eps")
    return summary["countermeasure"] + ("" if eps is None else f" eps {_eps_text(eps)}")


def countermeasure_matrix(summaries: list[dict]) -> dict:
    """
    What survives an exploiter's step: for every protected copy (named as in Table 1, or as in Table 4
    when made with other settings, e.g. another eps; loss ablations left out) and every victim recipe
    of a 3D UNet (or the slice-wise 2D victim) with a clean victim of the same recipe, each victim's
    DSC as a percentage of that clean victim's mean DSC, so a countermeasure that also costs the clean
    victim accuracy is not counted as lifting the protection. The recipe includes the countermeasure's
    settings as results.json records them (recipe.countermeasure_settings), so a copy attacked by
    pgd_at at its own bound is compared with the clean victim attacked at that same bound; a result
    whose step (with its settings) no clean victim of its recipe went through gets a cell without a ratio.

    Args:
        summaries: as returned by custom.results.summarise, one per results.json.

    Returns:
        {"columns": [column names], "rows": [{"method", "cells": {column: {"mean", "min", "max",
        "results", "clean_dsc_percent"}}}]}; columns are "none", the countermeasures (with their bound,
        see _step_text), "slice2d victim" (with " + countermeasure" when both), each with the recipe's
        other differences in brackets. A cell's numbers come from its results with a clean reference;
        they are None, and "results" counts the others, where none has one. Only copies with at least
        one countermeasure (or 2D victim) result get a row; empty rows and columns when no result has a
        countermeasure or the 2D victim.
    """
    victims = [s for s in summaries if s["victim"] in (MAIN_VICTIM, SLICE_VICTIM)
               and s["values"]["dsc_percent"] is not None and s["variant"].ablation in (CLEAN, FULL)]
    if not any(s["countermeasure"] is not None or s["victim"] == SLICE_VICTIM for s in victims):
        return {"columns": [], "rows": []}
    clean = _clean_dsc_by_recipe(victims)
    # a copy is kept when a clean victim shares its recipe but for the step (e.g. none went through pgd_at
    # at the copy's bound): its cell then says that the reference is missing, instead of the copy vanishing
    step = ("countermeasure", "countermeasure_settings")
    recipes = {_recipe_without(key, step) for key in clean}
    protected = [s for s in victims if s["method"] != CLEAN and _recipe_without(s["recipe_key"], step) in recipes]
    method, _ = _copy_names(protected)
    method_order = sorted(set(method.values()))
    # the victim and the countermeasure (with its settings) name the column already; other recipe
    # differences (e.g. the epochs) are added in brackets
    rest = {key: _recipe_without(key, ("victim", *step)) for key in {s["recipe_key"] for s in protected}}
    differences = _recipe_labels(set(rest.values()))

    def column(s: dict) -> str:
        step = [f"{SLICE_VICTIM} victim"] if s["victim"] == SLICE_VICTIM else []
        step += [_step_text(s)] if s["countermeasure"] is not None else []
        return " + ".join(step or ["none"]) + differences[rest[s["recipe_key"]]]

    cells: dict[tuple[str, str], list[dict]] = {}
    for s in protected:
        cells.setdefault((method[id(s)], column(s)), []).append(s)
    columns = sorted({name for _, name in cells}, key=lambda name: (name != "none", name))
    rows = []
    for row in method_order:
        row_cells = {}
        for name in columns:
            members = cells.get((row, name), [])
            paired = [s for s in members if s["recipe_key"] in clean]
            if paired:
                references = [float(np.mean(clean[s["recipe_key"]])) for s in paired]
                percents = [100 * s["values"]["dsc_percent"] / reference for s, reference in zip(paired, references)]
                row_cells[name] = {"mean": float(np.mean(percents)), "min": min(percents), "max": max(percents),
                                   "results": len(paired), "clean_dsc_percent": float(np.mean(references))}
            elif members:
                row_cells[name] = {"mean": None, "min": None, "max": None, "results": len(members),
                                   "clean_dsc_percent": None}
        if any(name != "none" for name in row_cells):  # a copy no countermeasure was tried on says nothing here
            rows.append({"method": row, "cells": row_cells})
    return {"columns": columns, "rows": rows}


def countermeasure_markdown(matrix: dict) -> str:
    """
    The countermeasure matrix as a section of tables.md.

    Args:
        matrix: as returned by countermeasure_matrix, with at least one row.

    Returns:
        Markdown: the title, a table with a line per method and a column per countermeasure (each
        cell the mean % of clean, "no clean reference" where no clean victim went through the same
        step, "-" where there is no result) and a note naming the clean victims' DSC per column,
        ending in a newline.
    """
    def cell(cells: dict, name: str) -> str:
        if name not in cells:
            return "-"
        return "no clean reference" if cells[name]["mean"] is None else f"{cells[name]['mean']:.2f}"

    lines = [[row["method"], *(cell(row["cells"], name) for name in matrix["columns"])] for row in matrix["rows"]]
    references = {name: sorted({f"{row['cells'][name]['clean_dsc_percent']:.2f}%" for row in matrix["rows"]
                                if row["cells"].get(name, {}).get("clean_dsc_percent") is not None})
                  for name in matrix["columns"]}
    clean = [f"{name}: {' / '.join(found)}" for name, found in references.items() if found]
    note = (
        "Victim DSC as % of the clean victim's DSC under the same countermeasure and recipe (mean over seeds; "
        f"victim {MAIN_VICTIM} unless the column names the slice-wise 2D victim); methods named as in Tables 1 and 4. "
        "A countermeasure with a bound (pgd_at) names it: a copy is compared with the clean victim attacked at "
        "that same bound, as results.json's recipe.countermeasure_settings record it (no clean reference: none "
        f"was). Clean victims' DSC: {'; '.join(clean)}. Below 100: the copy still costs the victim accuracy after "
        "the exploiter's step; about 100: the step removed the protection (or there was none)."
    )
    return "\n".join([f"## {COUNTERMEASURE_TITLE}", "", markdown_table(["method", *matrix["columns"]], lines), "",
                      note, ""])


# ---- the authors' protocol -----------------------------------------------------------------------
def authors_protocol_rows(summaries: list[dict]) -> list[dict]:
    """
    The authors' protocol: every victim trained with the authors' recipe (evaluate's ``--recipe_name
    paper``: whole volumes, the checkpoint best on a protected validation split), one row per training
    data (named as in the countermeasure matrix, see _copy_names, with the recipe's other differences in
    brackets where several recipes are present), exploiter's step (countermeasure) and dataset, with the
    clean victims of the same recipe, step and dataset as reference.

    Args:
        summaries: as returned by custom.results.summarise, one per results.json.

    Returns:
        rows {"method", "countermeasure" ("none" without a step; with its bound where it has one, e.g.
        "pgd_at eps 16/255"), "dataset", "last", "best", "last_percent_of_clean",
        "best_percent_of_clean", "seeds"}: mean DSC (%) over the seeds of the last and of the
        best-on-protected-validation checkpoint (None where no victim recorded one), and each as % of the
        clean victims' mean (None without a clean victim); ordered by countermeasure ("none" first), then
        method (clean first), then dataset. Empty without such victims.
    """
    paper = [s for s in summaries if s["recipe_name"] == "paper" and s["values"]["dsc_percent"] is not None]
    names, order = _copy_names(paper)
    step = ("countermeasure", "countermeasure_settings")
    differences = _recipe_labels({_recipe_without(s["recipe_key"], step) for s in paper})
    groups: dict[tuple, list[dict]] = {}
    for s in paper:
        countermeasure = "none" if s["countermeasure"] is None else _step_text(s)
        groups.setdefault((countermeasure != "none", countermeasure, order.index(names[id(s)]), s["dataset"],
                           s["recipe_key"]), []).append(s)
    clean = {(dataset, key): members for (*_, index, dataset, key), members in groups.items() if order[index] == CLEAN}
    rows = []
    for (_, countermeasure, index, dataset, key), members in sorted(groups.items()):
        last, best = _last_and_best(members)
        clean_last, clean_best = _last_and_best(clean.get((dataset, key), []))
        rows.append({
            "method": order[index] + differences[_recipe_without(key, step)], "countermeasure": countermeasure,
            "dataset": dataset, "last": last, "best": best,
            "last_percent_of_clean": None if not clean_last else 100 * last / clean_last,
            "best_percent_of_clean": None if best is None or not clean_best else 100 * best / clean_best,
            "seeds": [s["seed"] for s in members],
        })
    return rows


def _last_and_best(victims: list[dict]) -> tuple[float | None, float | None]:
    """The mean DSC (%) of ``victims`` (e.g. a row's seeds) with the last and with the best-on-protected-
    validation checkpoint, each None where none of them recorded one (no victims: both None)."""
    lasts = [s["values"]["dsc_percent"] for s in victims]
    bests = [s["best_dsc_percent"] for s in victims if s["best_dsc_percent"] is not None]
    return (float(np.mean(lasts)) if lasts else None), (float(np.mean(bests)) if bests else None)


def authors_protocol_markdown(rows: list[dict]) -> str:
    """
    The authors' protocol as a section of tables.md.

    Args:
        rows: as returned by authors_protocol_rows, at least one.

    Returns:
        Markdown: the title, a table with a line per row (numbers to 2 decimals, "n/a" for None) and
        a note on the recipe and the reference, ending in a newline.
    """
    def number(value):
        return "n/a" if value is None else f"{value:.2f}"

    cells = [[row["method"], row["countermeasure"], row["dataset"], number(row["last"]),
              number(row["last_percent_of_clean"]), number(row["best"]), number(row["best_percent_of_clean"]),
              _seeds_text(row["seeds"])] for row in rows]
    headers = ["method", "countermeasure", "dataset", "DSC last (%)", "last, % of clean",
               "DSC best on protected validation (%)", "best, % of clean", "seeds"]
    note = ("Victims trained with the authors' recipe (evaluate --recipe_name paper: whole volumes, batch 8, "
            "Adam 5e-4, the checkpoint best on a validation split of the victim's own, protected, training data), "
            "after the exploiter's step the countermeasure column names (none: no step); scored on the clean test "
            "cases; DSC: mean over the victims' seeds; % of clean: over the clean victims of the same recipe, "
            "step and dataset (n/a: there is none). Methods named as in Tables 1 and 4: a copy made with other "
            "settings than train.json's (e.g. fit_augmentation, the baselines' lighter surrogate) names them.")
    return "\n".join([f"## {AUTHORS_PROTOCOL_TITLE}", "", markdown_table(headers, cells), "", note, ""])
