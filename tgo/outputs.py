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

A folder of its own (`output_dir`) is always kept. A temporary one (`output_dir` None, made with
`tempfile.mkdtemp(prefix=...)` in TMPDIR) is removed on leaving the `with` block: once its files
are logged to a run, or when the command fails (nothing in it was asked for); it is kept, less
its downloads, only when asked (`keep`: an analysis or comparison that logs no run, whose files
are then the only copy of its results). Before this, every analysis and comparison left its
folder behind (0.7-54 MB each, most of it the downloaded spectra and features).

A full disk under the folder (ENOSPC, while downloading into it or writing a figure) leaves the
`with` block as one DiskFullError that names the folder, says what is safe and what to do
(`tgo.errors.is_disk_full`); a full artifact store is named by `tgo.tracking` instead.

Kept apart from `tgo.report`, which renders text and stays pure: this module writes files, draws
through `tgo.plots` and logs through `tgo.tracking`.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pandas as pd
from matplotlib.figure import Figure

from tgo import plots, tracking
from tgo.errors import DiskFullError, is_disk_full, short_error


@dataclass(kw_only=True)
class Written:
    """What a command that writes a report returns besides its tables (the analysis's `Analysis`,
    the comparison's `Comparison` extend it): its notes, the figures and report it wrote, and the
    folder that holds them; where no folder was kept (output_dir None), the figures' and report's
    artifact paths in the run they were logged to (`OutputFolder.as_logged`)."""

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
        keep: keep the temporary folder (less its downloads) after a `with` block that succeeded.
        safe: what a full disk under the folder leaves safe, for its message (the analysis and the
            comparison log only at the end: nothing was logged).
    """

    def __init__(
        self,
        output_dir: str | Path | None,
        *,
        prefix: str,
        figure_format: str = "png",
        keep: bool = False,
        safe: str = "nothing was logged and the runs read are unchanged",
    ) -> None:
        self.temporary = not output_dir
        self.figure_format = figure_format
        self.keep = keep or not self.temporary
        self.safe = safe
        try:
            self.root = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix=prefix))
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if not is_disk_full(err):
                raise
            folder = f"the output folder {output_dir}" if output_dir else f"TMPDIR ({tempfile.gettempdir()})"
            raise DiskFullError(f"no space left in {folder} for a {prefix}* folder: {self._advice()}", where=folder) from None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup(failed=exc is not None)
        if exc is not None and is_disk_full(exc) and self._under_me(exc):
            detail = exc.detail if isinstance(exc, DiskFullError) else f"({short_error(exc)})"
            raise DiskFullError(f"no space left {detail} in {self.where()}: {self._advice()}", where=str(self.root)) from None

    def where(self) -> str:
        """The folder for a message: a temporary folder names TMPDIR, the place to change."""
        if self.temporary:
            return f"the temporary folder {self.root} (TMPDIR {tempfile.gettempdir()})"
        return f"the output folder {self.root}"

    def _advice(self) -> str:
        removed = "; the temporary folder was removed" if self.temporary else ""
        move = "point TMPDIR (or --output_dir) at" if self.temporary else "give an --output_dir on"
        return f"{self.safe}{removed}. Free space there, or {move} a disk with room, and run the command again."

    def _under_me(self, exc: BaseException) -> bool:
        """Whether the full disk is this folder's: a DiskFullError names its place (a download into
        the folder, or the artifact store, which `tgo.tracking` names itself); a bare OSError is a
        write of the command's own, and the folder is where the commands write."""
        if isinstance(exc, DiskFullError):
            return Path(exc.where).resolve().is_relative_to(self.root.resolve())
        return True

    @property
    def download(self) -> Path:
        """Where the command downloads the runs it reads (removed with a temporary folder, and from
        one that is kept)."""
        return self.root / "download"

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

    def cleanup(self, failed: bool = False) -> None:
        """Remove a temporary folder (module docstring): always after a failure, else unless `keep`,
        and then its downloads. A folder given is left as it is."""
        if not self.temporary:
            return
        shutil.rmtree(self.root if failed or not self.keep else self.download, ignore_errors=True)

    def as_logged(self, written: Written) -> None:
        """Once the folder's files are logged to a run and the folder is to go: `written`'s paths
        become the files' artifact paths in that run (figures/<name>.png, report/report.html), and
        its output_dir None. A folder kept leaves them as they are."""
        if self.keep:
            return
        written.figures = [p.relative_to(self.root) for p in written.figures]
        written.report_html = written.report_html.relative_to(self.root) if written.report_html else None
        written.report_md = written.report_md.relative_to(self.root) if written.report_md else None
        written.output_dir = None


@contextlib.contextmanager
def failing_run(run_id: str, kind: str, command: str, unchanged: str) -> Iterator[None]:
    """While an analysis or a comparison logs its files into the run it opened: an error ends that
    run FAILED (KILLED for Ctrl-C) with the reason in tgo.error, never left RUNNING, and a full
    artifact store becomes one DiskFullError that names the store, says that the runs read
    (`unchanged`: "training run ... and its artifacts") are unchanged, and gives the `command` to
    run again. Where the store cannot even mark the run, the message says so instead of claiming it."""
    try:
        yield
    except BaseException as err:
        full = err if isinstance(err, DiskFullError) else None
        what = (
            f"{err} while logging {kind} run {run_id}"
            if full
            else f"{kind} run {run_id} failed while logging its files ({short_error(err)})"
        )
        try:
            reason = f"{what}; {unchanged} are unchanged."
            tracking.finish(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", error=reason)
            state = f"that run is marked FAILED (tgo.error) with part of its files; delete it (mlflow runs delete --run-id {run_id})"
        except Exception as second:  # noqa: BLE001 - the store refuses this write too: say so, keep the first error
            state = f"that run could not be marked FAILED either ({short_error(second)}) and stays RUNNING; delete it once the store works"
        if full is None:
            raise
        raise DiskFullError(
            f"{what}: {state}; {unchanged} are unchanged. Free space in the artifact store, then run `{command}` again.",
            where=full.where,
        ) from None
