"""How often the default alarm set (tgo.alarms.DEFAULT_ALARMS) fires on the embedded default.

The demo preset's head view dips early in training: with the schedule stepped once per epoch
(sched_on_updates=false, as before tgo stepped it per update) its effective rank fell from 66 to
31 at epoch 2 and came back to 58 by epoch 10. A collapse alarm should stay silent on that. This
script trains the demo's first epochs for several seeds, both ways, and prints for each the
lowest ratio of the head view's effective rank to its initial value, and whether each default rule
fired; then the rate over seeds.

    python benchmarks/alarm_rate.py --seeds 0,1,2 --epochs 4

Each run is the demo's 10-epoch schedule, stopped after --epochs epochs (the dip is in the first
three). About a minute per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the 10-epoch schedule to train")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="tgo-alarm-rate-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.chdir(tmp)
        from tgo.alarms import parse
        from tgo.config import resolve
        from tgo.train import StopTraining, run

        names = [r.name for r in parse("default")]

        def stop_after(epoch: int, metrics: dict) -> None:
            if epoch >= args.epochs:
                raise StopTraining(f"measured {args.epochs} epochs")

        rows = []
        for per_update in (False, True):
            for seed in seeds:
                cfg = resolve(
                    "demo", seed=seed, sched_on_updates=per_update, weight_spectra=False, feature_epochs="none", alarms="default", experiment="rate"
                )
                history: dict[int, dict] = {}

                def keep(epoch: int, metrics: dict, history=history) -> None:
                    history[epoch] = metrics
                    stop_after(epoch, metrics)

                try:
                    run(cfg, epoch_callback=keep)
                except StopTraining:
                    pass
                rank = np.array([history[e]["geom/final/cls/effective_rank"] for e in sorted(history)])
                fired = {n: any(history[e].get(f"alarm/{n}", 0.0) == 1.0 for e in history) for n in names}
                rows.append((per_update, seed, rank, fired))
                print(
                    f"sched_on_updates={per_update!s:5} seed {seed}: final/cls effective rank {np.round(rank, 1).tolist()}, "
                    f"lowest / initial {rank[1:].min() / rank[0]:.2f}; fired: {fired}",
                    flush=True,
                )
        for per_update in (False, True):
            mine = [r for r in rows if r[0] == per_update]
            for n in names:
                k = sum(r[3][n] for r in mine)
                print(f"sched_on_updates={per_update}: {n} fired in {k} of {len(mine)} runs")


if __name__ == "__main__":
    main()
