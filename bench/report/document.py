"""The report as data: parts with text, lists, tables and figures, rendered alike as Markdown, LaTeX and HTML.

The report is built once as a list of `Part`s and then rendered by each of
`markdown`, `latex` and `html`, so the three outputs cannot disagree on a
number, an order or a caption. A task's own `Section`s become parts too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.base import Section


@dataclass
class Item:
    """One line of a list: 'label: v1, v2 (+3 more)'; `code` values are identifiers (commit, path, run id)."""

    label: str
    values: list[str]
    more: int = 0
    code: bool = True


@dataclass
class Table:
    """Cells as text, headed by column names, with what the HTML needs besides the text.

    `sort_keys` holds a number per cell for the columns that sort numerically
    (index and column names a subset of `cells`'); `cell_ids` anchors each row
    to its results file; `attrs` become `data-*` attributes (the page's filters).
    """

    cells: pd.DataFrame
    caption: str = ""
    id: str = ""
    sort_keys: pd.DataFrame | None = None
    cell_ids: pd.Series | None = None
    attrs: pd.DataFrame | None = None
    numeric: tuple[str, ...] = ()  # right-aligned columns
    note: str = ""  # printed under the table: what a mark in its cells means


@dataclass
class Part:
    """A heading (level 2 or 3) with paragraphs, a list, tables and figures; `collapsible` folds it in the HTML."""

    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    collapsible: bool = False


def section_part(section: Section) -> Part:
    """A task's report section as a part of the report."""
    tables = [] if section.table is None or section.table.empty else [Table(section.table.astype(str))]
    return Part(section.title, text=[section.text] if section.text else [], tables=tables,
                figures=list(section.figures))  # fmt: skip
