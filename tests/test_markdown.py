"""custom.markdown: the one Markdown table writer."""

import pytest

from custom.markdown import markdown_table


def test_markdown_table_lines():
    table = markdown_table(["method", "DSC (%)"], [["clean", "80.00"], ["voxshield", "n/a"]])
    assert table.splitlines() == [
        "| method | DSC (%) |",
        "| --- | --- |",
        "| clean | 80.00 |",
        "| voxshield | n/a |",
    ]
    assert not table.endswith("\n")


def test_markdown_table_without_rows_and_with_a_short_row():
    assert markdown_table(["a"], []) == "| a |\n| --- |"
    with pytest.raises(ValueError, match="a row has 1 cells, the header 2"):
        markdown_table(["a", "b"], [["only one"]])
