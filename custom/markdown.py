"""Markdown tables for the result files (results.md, tables.md, the benchmarks' diagnostics)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """
    A Markdown table: the header line, the separator line and one line per row, joined by newlines
    (no trailing newline).

    Args:
        header: the column titles.
        rows: the cells of each row, already formatted, as many as ``header`` has columns.

    Raises:
        ValueError: for a row whose length differs from the header's.
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {list(row)}.")
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
