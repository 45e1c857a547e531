"""tgo's report writer: a `Document` is built once, from headings, paragraphs, notes, tables, figure
groups and findings, and rendered to Markdown and to HTML from the same calls.

    doc = Document("Geometry of run r1")
    doc.paragraph("Source of the geometry: the run's logged spectra.")
    doc.heading("TGO-I findings").findings(result.findings).paragraph(text, lead="Method.")
    doc.table(trends, float_format=".4g").figures("Depth profile", [path])
    html_path, md_path = doc.write(folder)          # folder/report/report.html and report.md

The report lives in `<folder>/report/`, its figures in `<folder>/figures/` beside it (the layout of
`tgo.outputs.OutputFolder`): the Markdown links them as ../figures/<name>; the HTML carries PNG and
SVG figures inline (the report is one file) and links a PDF. Pure: text in, text out (pandas for
the tables); nothing here touches MLflow or matplotlib.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from tgo.findings import Finding

CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
    "img{max-width:100%;border:1px solid #eee;margin:6px 0}"
)
VERDICT_COLORS = {"supported": "#1a7f37", "contradicted": "#cf222e", "mixed": "#9a6700", "inconclusive": "#57606a"}
FINDINGS_COLUMNS = ("#", "finding", "verdict", "test", "numbers")


def markdown_table(table: pd.DataFrame, float_format: str = ".4g") -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, the `report` extra), else the plain
    text table in a code block, which keeps its columns."""
    try:
        return table.to_markdown(index=False, floatfmt=float_format)
    except ImportError:
        return "```\n" + table.to_string(index=False, float_format=lambda x: format(x, float_format)) + "\n```"


def html_figure(path: Path) -> str:
    """A figure in the HTML report: PNG and SVG inline (the report is one file), a PDF as a link."""
    if path.suffix == ".pdf":
        return f"<p><a href='../figures/{html.escape(path.name)}'>{html.escape(path.name)}</a></p>"
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"<img alt='{html.escape(path.stem)}' src='data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}'>"


def _cell(text: object) -> str:
    """Text in a Markdown table cell: a `|` would end the cell."""
    return str(text).replace("|", "\\|")


# --------------------------------------------------------------------------------------------------
# blocks: each renders itself as Markdown and as HTML
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int

    def markdown(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class _Paragraph:
    text: str
    lead: str = ""  # a bold run-in label ("Method.")
    bold: bool = False  # the whole paragraph in bold (a headline)

    def markdown(self) -> str:
        text = f"**{self.text}**" if self.bold else self.text
        return f"**{self.lead}** {text}" if self.lead else text

    def html(self) -> str:
        text = f"<b>{html.escape(self.text)}</b>" if self.bold else html.escape(self.text)
        return f"<p><b>{html.escape(self.lead)}</b> {text}</p>" if self.lead else f"<p>{text}</p>"


@dataclass(frozen=True)
class _Note:
    text: str

    def markdown(self) -> str:
        return f"> {self.text}"

    def html(self) -> str:
        return f"<p><em>{html.escape(self.text)}</em></p>"


@dataclass(frozen=True, eq=False)
class _Table:
    frame: pd.DataFrame
    float_format: str

    def markdown(self) -> str:
        return markdown_table(self.frame, self.float_format)

    def html(self) -> str:
        return self.frame.to_html(index=False, float_format=lambda x: format(x, self.float_format))


@dataclass(frozen=True)
class _Figures:
    paths: tuple[Path, ...]

    def markdown(self) -> str:
        return "\n".join(f"![{p.stem}](../figures/{p.name})" for p in self.paths)

    def html(self) -> str:
        return "\n".join(html_figure(p) for p in self.paths)


@dataclass(frozen=True)
class _Findings:
    found: tuple[Finding, ...]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(FINDINGS_COLUMNS) + " |", "| " + " | ".join("---" for _ in FINDINGS_COLUMNS) + " |"]
        lines += [f"| {f.number} | {_cell(f.claim)} | **{f.verdict}** | {_cell(f.method)} | {_cell(f.evidence)} |" for f in self.found]
        return "\n".join(lines)

    def html(self) -> str:
        rows = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in FINDINGS_COLUMNS) + "</tr>"]
        rows += [
            f"<tr><td>{f.number}</td><td>{html.escape(f.claim)}</td>"
            f"<td style='color:{VERDICT_COLORS.get(f.verdict, 'inherit')}'><b>{html.escape(f.verdict)}</b></td>"
            f"<td>{html.escape(f.method)}</td><td>{html.escape(f.evidence)}</td></tr>"
            for f in self.found
        ]
        return "\n".join(rows) + "</table>"


# --------------------------------------------------------------------------------------------------
# the document
# --------------------------------------------------------------------------------------------------


class Document:
    """A report built once and rendered twice: each call adds one block (and returns the document,
    so calls can be chained); `to_markdown` and `to_html` render every block in order."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._blocks: list[_Heading | _Paragraph | _Note | _Table | _Figures | _Findings] = []

    def heading(self, text: str, level: int = 2) -> Document:
        """A section heading; level 2 is a section (the title is level 1), 3 a subsection."""
        self._blocks.append(_Heading(text, level))
        return self

    def paragraph(self, text: str, *, lead: str = "") -> Document:
        """A paragraph, optionally opened by a bold label (`lead`, such as "Method.")."""
        self._blocks.append(_Paragraph(text, lead))
        return self

    def headline(self, text: str) -> Document:
        """A paragraph in bold: the report's result in one sentence."""
        self._blocks.append(_Paragraph(text, bold=True))
        return self

    def note(self, text: str) -> Document:
        """A caveat: a block quote in Markdown, emphasised in HTML."""
        self._blocks.append(_Note(text))
        return self

    def table(self, table: pd.DataFrame, *, float_format: str = ".4g", empty: str = "") -> Document:
        """A table, without its index.

        Args:
            table: the rows to show.
            float_format: the format of its floats (a `format()` spec).
            empty: a paragraph shown instead when the table has no rows ("" shows the empty table).
        """
        if empty and table.empty:
            return self.paragraph(empty)
        self._blocks.append(_Table(table, float_format))
        return self

    def figures(self, heading: str, paths: Sequence[Path], *, level: int = 2) -> Document:
        """A group of figures under its heading; nothing at all when the group has no figure."""
        if paths:
            self.heading(heading, level)
            self._blocks.append(_Figures(tuple(paths)))
        return self

    def findings(self, found: Sequence[Finding]) -> Document:
        """The verdict table: number, claim, verdict (coloured in HTML), test and numbers of each finding."""
        self._blocks.append(_Findings(tuple(found)))
        return self

    def to_markdown(self) -> str:
        return "\n\n".join([f"# {self.title}", *(block.markdown() for block in self._blocks)]) + "\n"

    def to_html(self) -> str:
        head = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
        return "\n".join([head, f"<h1>{html.escape(self.title)}</h1>", *(block.html() for block in self._blocks), "</body></html>"])

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """Write `<folder>/report/report.html` and `report.md`; returns (html_path, md_path)."""
        report = Path(folder) / "report"
        report.mkdir(parents=True, exist_ok=True)
        html_path, md_path = report / "report.html", report / "report.md"
        md_path.write_text(self.to_markdown())
        html_path.write_text(self.to_html())
        return html_path, md_path
