"""Pieces of tgo's reports shared by the analysis and the comparison: tables as Markdown, figures
in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd


def markdown_table(table: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, the `report` extra), else the plain
    text table in a code block, which keeps its columns."""
    try:
        return table.to_markdown(index=False, floatfmt=".4g")
    except ImportError:
        return "```\n" + table.to_string(index=False) + "\n```"


def html_figure(path: Path) -> str:
    """A figure in the HTML report: PNG and SVG inline (the report is one file), a PDF as a link."""
    if path.suffix == ".pdf":
        return f"<p><a href='../figures/{html.escape(path.name)}'>{html.escape(path.name)}</a></p>"
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"<img alt='{html.escape(path.stem)}' src='data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}'>"
