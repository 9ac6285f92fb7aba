"""leaderboard.md: the report's parts as Markdown (GitHub tables; figures inline as relative links)."""

from __future__ import annotations

from collections.abc import Sequence

from bench.report.document import Item, Part
from bench.report.format import md_table


def item_line(item: Item) -> str:
    values = ", ".join(f"`{v}`" if item.code else v for v in item.values) or "–"
    return f"- {item.label}: {values}" + (f" (+{item.more} more)" if item.more else "")


def render_part(part: Part) -> str:
    out = [f"{'#' * part.level} {part.title}\n"]
    out += [f"{t}\n" for t in part.text]
    if part.items:
        out.append("\n".join(item_line(i) for i in part.items) + "\n")
    for table in part.tables:
        if table.caption:
            out.append(f"{table.caption}\n")
        out.append(md_table(table.cells))
        if table.note:  # after the blank line that ends the table (a plain line right under it is a row in GFM)
            out.append(f"{table.note}\n")
    if part.figures:
        out.append("\n".join(f"![{p.stem}]({p.name})" for p in part.figures) + "\n")
    return "\n".join(out)


def render_markdown(title: str, parts: list[Part], lead: Sequence[str] = ()) -> str:
    """The document: the title, the lead lines (what a reader must know before any number), then the parts."""
    return "\n".join([f"# {title}\n", *(f"{line}\n" for line in lead), *(render_part(p) for p in parts)])
