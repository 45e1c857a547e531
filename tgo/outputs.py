"""The folder a command writes into: figures, tables and report in their subfolders, logged to a
run as artifacts of the same names, and removed afterwards when it was only a temporary folder.

    with OutputFolder(output_dir, prefix="tgo-analysis-", figure_format="svg") as out:
        out.figure(fig, "epochs_effective_rank")       # <folder>/figures/epochs_effective_rank.svg
        out.table(trends, "trends")                     # <folder>/tables/trends.csv
        Document(title).write(out.root)                 # <folder>/report/report.{md,html}
        out.log(run_id, files=("findings.json",))       # figures/, tables/, report/ and the files

The layout, shared by the analysis, comparison, sweep and study runs:

    <folder>/figures/<name>.<figure_format>      artifact figures/<name>.<figure_format>
    <folder>/tables/<name>.csv                   artifact tables/<name>.csv
    <folder>/report/report.md, report.html       artifact report/... (`tgo.report.Document.write`)
    <folder>/<file>                              artifact <file> (a summary such as findings.json)

A folder of its own (`output_dir`) is always kept; a temporary one (`output_dir` None, made with
`tempfile.mkdtemp(prefix=...)`) is kept when asked (`keep`: the analysis and the comparison, whose
results point into it) and removed on leaving the `with` block otherwise (the sweep's aggregate
and the study's summary, once logged). Kept apart from `tgo.report`, which renders text and stays
pure: this module writes files, draws through `tgo.plots` and logs through `tgo.tracking`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from tgo import plots, tracking


@dataclass(kw_only=True)
class Written:
    """What a command that writes a report returns besides its tables (the analysis's `Analysis`,
    the comparison's `Comparison` extend it): its notes, the figures and report it wrote, and the
    folder that holds them."""

    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    report_html: Path | None = None
    report_md: Path | None = None
    output_dir: Path | None = None


SUBFOLDERS = ("figures", "tables", "report")  # logged as artifacts of the same names


class OutputFolder:
    """Where a command's figures, tables, report and summary files go (module docstring).

    Args:
        output_dir: the folder (made if missing; always kept), or None for a temporary folder.
        prefix: the temporary folder's name prefix ("tgo-analysis-").
        figure_format: png, pdf or svg, checked by the command beforehand (`tgo.plots.check_format`).
        keep: keep the temporary folder after the `with` block (a folder given is always kept).
    """

    def __init__(self, output_dir: str | Path | None, *, prefix: str, figure_format: str = "png", keep: bool = True) -> None:
        self.temporary = not output_dir
        self.root = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=prefix))
        self.root.mkdir(parents=True, exist_ok=True)
        self.figure_format = figure_format
        self.keep = keep or not self.temporary

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def figure(self, fig: Figure, name: str) -> Path:
        """Save `fig` as figures/<name>.<figure_format>; returns its path."""
        return plots.save(fig, self.figures / f"{name}.{self.figure_format}")

    def table(self, table: pd.DataFrame, name: str) -> Path:
        """Write `table` as tables/<name>.csv (without its index); returns its path."""
        self.tables.mkdir(parents=True, exist_ok=True)
        path = self.tables / f"{name}.csv"
        table.to_csv(path, index=False)
        return path

    def parquet(self, table: pd.DataFrame, name: str) -> Path | None:
        """Also write `table` as tables/<name>.parquet, where pandas has a Parquet engine (else None)."""
        self.tables.mkdir(parents=True, exist_ok=True)
        path = self.tables / f"{name}.parquet"
        try:
            table.to_parquet(path, index=False)
        except ImportError:
            return None
        return path

    def file(self, name: str, text: str) -> Path:
        """Write `text` as <folder>/<name> (a summary such as findings.json); returns its path."""
        path = self.root / name
        path.write_text(text)
        return path

    def log(self, run_id: str, files: Sequence[str] = ()) -> None:
        """Log the subfolders written (figures/, tables/, report/) and the named files at the top of
        the folder to the run, as artifacts of the same names."""
        for sub in SUBFOLDERS:
            if (self.root / sub).exists():
                tracking.log_folder(run_id, self.root / sub, sub)
        for name in files:
            tracking.log_file(run_id, self.root / name, None)

    def cleanup(self) -> None:
        """Remove the folder unless it is kept (a folder given, or `keep`)."""
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
