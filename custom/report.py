"""The paper's tables from victim evaluations (results.json), and the report workflow that writes them
with the views of custom.protection_views and the figures of custom.figures."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from custom.figures import comparison_figure, frontier_figure, perturbation_figure
from custom.markdown import markdown_table
from custom.nifti_io import VoxShieldInputError, write_atomic
from custom.protection_views import (
    AUTHORS_PROTOCOL_TITLE, COUNTERMEASURE_TITLE, FRONTIER_TITLE, authors_protocol_markdown, authors_protocol_rows,
    countermeasure_markdown, countermeasure_matrix, frontier_markdown, frontier_rows,
)
from custom.results import (
    ABLATED_METHOD, ABLATIONS, CLEAN, CLEAN_REFERENCE, FULL, MAIN_VICTIM, SETTINGS, Variant, by_fit_length,
    collect_results, metric_cell, setting_text, summarise, table4_row, train_defaults,
)

REPORT_FORMAT = "voxshield-report/1"
TABLES_NAME = "tables.md"
REPORT_NAME = "report.json"
PERTURBATION_FIGURE = "perturbation.png"
COMPARISON_FIGURE = "comparison.png"
FRONTIER_FIGURE = "frontier.png"
# key in report.json -> (Markdown header, decimals)
METRICS = {
    "dsc_percent": ("DSC (%)", 2),
    "hd95_mm": ("HD95 (mm)", 2),
    "psnr_db_volume": ("PSNR (dB)", 2),
    "ssim_3d_volume": ("SSIM", 4),
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


def _paper_tables(summaries: list[dict]) -> list[_Table]:
    # the patch recipe without an exploiter's step; the others have their own sections
    summaries = [s for s in summaries if s["countermeasure"] is None and s["recipe_name"] == "patch"]
    main = [s for s in summaries if s["variant"] in (Variant(CLEAN), Variant(FULL))]
    method, method_order = by_fit_length(main, lambda s: s["method"], lambda name: (name != CLEAN, name))
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
    variant, variant_order = by_fit_length(
        ablated, lambda s: CLEAN_REFERENCE if s["method"] == CLEAN else s["variant"].ablation,
        (CLEAN_REFERENCE, *ABLATIONS).index)
    ablation = [(variant[id(s)], (s["dataset"],), s) for s in ablated]
    has_ablation = any(row != CLEAN_REFERENCE for row, _, _ in ablation)
    table3 = _build(
        "table3", f"Table 3: ablation of the {ABLATED_METHOD} generator losses", "variant", ("dataset",),
        list(METRICS), ablation if has_ablation else [], variant_order,
        f"victim {MAIN_VICTIM}; variant from protection.generator.training (lambda_spd, lambda_isc)",
    )
    other = [(table4_row(s), (s["dataset"],), s) for s in summaries
             if s["victim"] == MAIN_VICTIM and (s["variant"].settings or s["method"] == CLEAN)]
    other_rows = sorted({row for row, _, _ in other} - {CLEAN_REFERENCE})
    table4 = _build(
        "table4", "Table 4: settings other than train.json's defaults", "method: variant", ("dataset",),
        list(METRICS), other if other_rows else [], [CLEAN_REFERENCE, *other_rows],
        f"victim {MAIN_VICTIM}; defaults: "
        + ", ".join(setting_text(name, train_defaults()[name]) for name in SETTINGS),
    )
    return [table for table in (table1, table2, table3, table4) if table.rows]


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
            _format(metric_cell(table.cells[(row, group)], metric), METRICS[metric][1])
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
                **{metric: metric_cell(summaries, metric) for metric in table.metrics},
            })
    return rows


def _render(built: list[_Table], frontier: list[dict], matrix: dict, authors: list[dict]) -> str:
    """The paper's tables, then the frontier, the countermeasure matrix and the authors' protocol
    when they have rows."""
    return "\n".join([*(_markdown(table) for table in built), *([frontier_markdown(frontier)] if frontier else []),
                      *([countermeasure_markdown(matrix)] if matrix["rows"] else []),
                      *([authors_protocol_markdown(authors)] if authors else [])])


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
      dilation, squash, ROI masking, surrogate and generator steps, surrogate batches per epoch, fitting
      through the exploiter's augmentation; and the arguments of both networks, where the training record names them),
      one row per method and variant, with the clean reference row; UNet victim. Tables 1-3 leave
      these results out. A training-free method's settings are read from its perturbation parameters.

    Where Tables 1-3 hold fits of one method or variant for several lengths (training epochs), each
    length gets its own row (column group in Table 2), "name, N epochs", rather than being averaged.

    A cell with several results (e.g. seeds) shows their mean and ``(n=...)``, n counting the
    results that have that metric; "-" marks no result, "n/a" a metric that none of them has.
    A note under each table gives the test sets and victim recipes the numbers come from.

    Then, when such results exist, the views of custom.protection_views: the frontier (see
    frontier_rows): per method, support (ROI or whole volume) and eps, the whole-volume PSNR and SSIM
    and the UNet victim's DSC as % of the clean victim's with the same recipe (mean over seeds, lowest
    and highest seed), random noise in the ROI marked as the floor; the countermeasure matrix (see
    countermeasure_matrix); the authors' protocol (see authors_protocol_rows).

    Args:
        results: as returned by custom.results.collect_results.
    """
    summaries = [summarise(result) for result in results]
    return _render(_paper_tables(summaries), frontier_rows(summaries), countermeasure_matrix(summaries),
                   authors_protocol_rows(summaries))


def write_report(paths: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> dict:
    """
    Write OUTPUT/tables.md (see tables) and OUTPUT/report.json, the same numbers as rows: one per
    table row and column group, with each metric's ``{"mean", "n", "results"}``; when they have rows,
    report.json's "countermeasures" and "authors_protocol" (custom.protection_views's
    countermeasure_matrix and authors_protocol_rows); and, when there are frontier rows,
    report.json's "frontier" (the rows of custom.protection_views.frontier_rows) and
    OUTPUT/frontier.png (custom.figures.frontier_figure).

    Args:
        paths: results.json files or folders holding them (see custom.results.collect_results).
        output_dir: created if missing.

    Returns:
        the report.json content.
    """
    results = collect_results(paths)
    summaries = [summarise(result) for result in results]
    built, frontier, matrix = _paper_tables(summaries), frontier_rows(summaries), countermeasure_matrix(summaries)
    authors = authors_protocol_rows(summaries)
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
