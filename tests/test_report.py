"""The report writer (one Document, rendered to Markdown and HTML from the same calls) and the
output folder (figures, tables and report in their subfolders, logged to a run, a temporary one
removed once used)."""

import os
import tempfile

import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from tgo import plots, tracking
from tgo.errors import ConfigError
from tgo.findings import Finding
from tgo.outputs import OutputFolder
from tgo.report import VERDICT_COLORS, Document


def _figure() -> Figure:
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_one_document_renders_every_block_in_both_formats(tmp_path):
    out = OutputFolder(tmp_path, prefix="unused-", figure_format="png")
    png = out.figure(_figure(), "line")
    pdf = plots.save(_figure(), tmp_path / "figures" / "line.pdf")
    found = [Finding(1, "Rank rises | over training", "supported", "rank 3 -> 5", "change only"),
             Finding(2, "Anisotropy falls", "contradicted", "0.2 -> 0.4", "trend")]
    doc = (Document("A <report>").paragraph("Source: logged.").headline("3 of 4 differ.").note("A caveat.")
           .heading("Findings").findings(found).paragraph("Two tests each.", lead="Method.")
           .heading("Numbers").table(pd.DataFrame({"site": ["final"], "value": [1.234567]}), float_format=".3g")
           .table(pd.DataFrame(columns=["site"]), empty="Nothing differs.")
           .figures("Figures", [png, pdf]).figures("Empty group", [], level=3))
    md, html = doc.to_markdown(), doc.to_html()

    assert md.startswith("# A <report>\n\nSource: logged.\n\n**3 of 4 differ.**\n\n> A caveat.\n\n## Findings\n\n| # | finding |")
    assert "| 1 | Rank rises \\| over training | **supported** | change only | rank 3 -> 5 |" in md
    assert "**Method.** Two tests each." in md and "1.23" in md and "1.2346" not in md and "Nothing differs." in md
    assert "![line](../figures/line.png)" in md and "![line](../figures/line.pdf)" in md and "Empty group" not in md

    assert html.count("<style>") == 1 and "<title>A &lt;report&gt;</title>" in html and "<h1>A &lt;report&gt;</h1>" in html
    assert "<p><b>3 of 4 differ.</b></p>" in html and "<p><em>A caveat.</em></p>" in html
    assert f"<td style='color:{VERDICT_COLORS['supported']}'><b>supported</b></td>" in html
    assert f"color:{VERDICT_COLORS['contradicted']}" in html and "<p><b>Method.</b> Two tests each.</p>" in html
    assert "1.23" in html and "1.2346" not in html and "<p>Nothing differs.</p>" in html
    assert html.count("data:image/png;base64,") == 1 and "<a href='../figures/line.pdf'>" in html  # a PDF is linked
    assert "Empty group" not in html and html.endswith("</body></html>")

    html_path, md_path = doc.write(tmp_path)
    assert (html_path, md_path) == (tmp_path / "report" / "report.html", tmp_path / "report" / "report.md")
    assert md_path.read_text() == md and html_path.read_text() == html


def test_the_output_folder_lays_out_logs_and_cleans_up(store, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with OutputFolder(None, prefix="tgo-test-", figure_format="svg") as out:
        assert out.root.parent == tmp_path / "tmp" and out.root.name.startswith("tgo-test-")
        figure = out.figure(_figure(), "epochs_effective_rank")
        assert figure == out.root / "figures" / "epochs_effective_rank.svg" and figure.read_text().lstrip().startswith(("<?xml", "<svg"))
        assert out.table(pd.DataFrame({"a": [1]}), "trends") == out.root / "tables" / "trends.csv"
        Document("r").paragraph("p").write(out.root)
        out.file("summary.json", "{}")
        run_id = tracking.new_run("outputs", "logged")
        out.log(run_id, files=("summary.json",))
    assert not out.root.exists()  # a temporary folder not kept: removed once logged
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for sub in ("figures", "tables", "report")
                                                               for a in client.list_artifacts(run_id, sub)}
    assert {"figures/epochs_effective_rank.svg", "tables/trends.csv", "report/report.md", "report/report.html", "summary.json"} <= names

    with OutputFolder(None, prefix="tgo-test-", keep=True) as kept:  # kept when asked (nothing logged), less its downloads
        kept.download.mkdir()
        kept.file("summary.json", "{}")
    assert kept.root.is_dir() and os.listdir(kept.root) == ["summary.json"]
    with pytest.raises(RuntimeError), OutputFolder(None, prefix="tgo-test-", keep=True) as failed:  # a failure removes it
        raise RuntimeError("the command failed")
    assert not failed.root.exists()
    with OutputFolder(tmp_path / "mine", prefix="tgo-test-", keep=False) as given:  # a folder given is never removed
        pass
    assert given.root == tmp_path / "mine" and given.root.is_dir()


def test_a_bad_figure_format_is_a_config_error():
    assert plots.check_format("pdf") == "pdf"
    with pytest.raises(ConfigError, match="figure_format: 'gif' is not one of png, pdf, svg"):
        plots.check_format("gif")
