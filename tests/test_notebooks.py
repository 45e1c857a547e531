"""Every notebook runs top to bottom (papermill) against a small tracking store built here."""

import json
from pathlib import Path

import pytest

from helpers import ROOT, sqlite_store, tracking_store

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare_runs.ipynb", "03_sweeps_and_studies.ipynb"]
    for path in NOTEBOOKS:
        book = json.loads(path.read_text())
        params = [c for c in book["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{path.name} needs one cell tagged 'parameters'"
        for cell in book["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """Two training runs, a two-seed sweep and a two-trial study, all on the smoke preset."""
    folder = tmp_path_factory.mktemp("notebooks")
    uri = sqlite_store(folder)
    with tracking_store(uri, cwd=folder):
        from tgo.study import study
        from tgo.sweep import sweep
        from tgo.train import run

        runs = [run(preset="smoke", epochs=1, seed=s, experiment="nb", run_name=f"smoke-{s}").run_id for s in (0, 1)]
        swept = sweep("0,1", preset="smoke", epochs=1, storage=f"journal:{folder / 'sweep.journal'}", experiment="nb")
        space = folder / "space.yaml"
        space.write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}\n")
        studied = study(2, preset="smoke", epochs=1, search_space=space, storage=f"journal:{folder / 'study.journal'}", experiment="nb")
        yield {"uri": uri, "runs": runs, "sweep": swept.parent_run_id, "study": studied.parent_run_id, "folder": folder}


def _execute(name: str, folder: Path, **parameters):
    import papermill

    out = folder / f"out_{name}"
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters=parameters, kernel_name="python3", cwd=str(folder), progress_bar=False)
    book = json.loads(out.read_text())
    text = "".join(
        "".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
        for c in book["cells"] if c["cell_type"] == "code" for o in c["outputs"]
    )
    images = sum("image/png" in o.get("data", {}) for c in book["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    return text, images


@pytest.mark.slow
def test_quickstart(small_store):
    text, images = _execute("01_quickstart.ipynb", small_store["folder"], tracking_uri=small_store["uri"], run_id=small_store["runs"][0])
    assert small_store["runs"][0] in text and "effective_rank" in text and images >= 1


@pytest.mark.slow
def test_compare_runs(small_store):
    text, images = _execute("02_compare_runs.ipynb", small_store["folder"], tracking_uri=small_store["uri"],
                            filter_string="tags.`tgo.kind` = 'train' and params.`config.preset` = 'smoke'")
    assert "smoke-0" in text and "smoke-1" in text and images >= 1


@pytest.mark.slow
def test_sweeps_and_studies(small_store):
    text, images = _execute("03_sweeps_and_studies.ipynb", small_store["folder"], tracking_uri=small_store["uri"],
                            sweep_run_id=small_store["sweep"], study_run_id=small_store["study"])
    assert "ci95_high" in text and "COMPLETE" in text and images >= 2
