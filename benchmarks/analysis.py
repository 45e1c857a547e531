"""Benchmark of the analysis: a synthetic run of 100 epochs x 15 sites x 3 views in a local store.

Prints the wall time of `tgo.analysis.analyze` and the share of it spent reading from MLflow, for
a run laid out as tgo writes it (spectra artifacts: every epoch in one download) and for a run that
has only metric histories (one get_metric_history call per key: MLflow has no multi-key call).

    python benchmarks/analysis.py [--epochs 100]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

SITES = ["patch_embed", "pos_embed", *[f"block_{i:02d}" for i in range(12)], "final"]  # 15
D = 384


def synthetic_run(epochs: int, with_spectra: bool, folder: str) -> str:
    """A run whose geometry follows power-law spectra that flatten over training."""
    from tgo.probe import ProbeResult, SiteViewGeometry
    from tgo.spectral import Spectra, observables_from_spectra

    client = MlflowClient()
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(exp.experiment_id, run_name=f"synthetic-{'spectra' if with_spectra else 'metrics'}").info.run_id
    rng = np.random.default_rng(0)
    ranks = np.arange(1, D + 1, dtype=float)
    for epoch in range(epochs + 1):
        result = ProbeResult()
        for s, site in enumerate(SITES):
            for view in ("cls", "patch", "mean"):
                if (site, view) == ("patch_embed", "cls"):
                    continue
                alpha = 2.0 - 1.2 * epoch / epochs + 0.02 * s + rng.normal(0, 0.01)
                lam = ranks ** -alpha
                n = 1000 if view != "patch" else 196_000
                spectra = Spectra(lam, np.sqrt((n - 1) * lam), np.sqrt(n * lam), np.diag(lam), rng.normal(size=D), n, n)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obs = observables_from_spectra(spectra)
                result.geometry[(site, view)] = SiteViewGeometry(site, view, lam, spectra.singular_values, spectra.uncentered_singular_values, obs, n)
        metrics = [Metric(k, v, 0, epoch) for k, v in result.metrics().items()]
        metrics.append(Metric("val/acc1", 10 + 80 * epoch / epochs, 0, epoch))
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        if with_spectra:
            path = result.save(os.path.join(folder, f"epoch_{epoch:04d}.npz"))
            client.log_artifact(run_id, str(path), "geometry/spectra")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tgo-bench-analysis-") as workdir:  # removed afterwards, also after a failure
        uri = f"sqlite:///{workdir}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)

        from tgo import analysis, runs

        print(f"# {args.epochs + 1} epochs x {len(SITES)} sites x 3 views ({len(SITES) * 3 - 1} site/views), local sqlite store")
        for with_spectra in (True, False):
            run_id = synthetic_run(args.epochs, with_spectra, workdir)
            run = MlflowClient().get_run(run_id)
            start = time.perf_counter()
            if with_spectra:
                runs.spectra_files(run_id, __import__("pathlib").Path(workdir) / f"read-{run_id}")
            else:
                runs.table_from_metrics(run_id, [k for k in run.data.metrics if k.startswith("geom/")])
            runs.scalar_table(run_id, ["val/acc1"])
            read = time.perf_counter() - start
            start = time.perf_counter()
            result = analysis.analyze(run_id, output_dir=os.path.join(workdir, f"out-{run_id}"), log=True)
            total = time.perf_counter() - start
            kind = "spectra" if with_spectra else "metrics"
            print(f"# {kind}: {len(result.geometry)} values, {len(result.figures)} figures; reading {read:.1f} s of {total:.1f} s")
            print(f"analysis_wall_s_{kind}: {total:.1f}")
            print(f"analysis_read_share_{kind}: {read / total:.3f}")


if __name__ == "__main__":
    main()
