"""Benchmark of `tgo probe` over a folder of checkpoints against bare probes of the same weights,
side by side in one process: what probing a series costs beyond its probes.

The folder holds what timm's train.py leaves: five checkpoints of ViT-S/16 (`checkpoint-N.pth.tar`
written by timm's CheckpointSaver with the AdamW state, plus `last.pth.tar` and `model_best.pth.tar`,
copies of epochs already there). The whole command (`tgo.series.probe_checkpoints`: finding the
files and their epochs, telling copies apart, loading one checkpoint at a time, the probe, recording
every epoch into a fresh sqlite tracking store) is timed against five bare probes
(`tgo.probe.probe_model` of the same five state dicts, already in memory, on the same probe set).

Prints, each alone on a line:
  probe_series_over_probes: X        the command's time / the five bare probes' time (target <= 1.15)
  peak_rss_5_over_2_checkpoints: X   the command's peak resident memory over a folder of five
                                     checkpoints / over a folder of two (fresh processes; flat: ~1.0)
Lines starting with # give the seconds and megabytes behind them.

    python benchmarks/probe_series.py [--img-size 224] [--images 256] [--batch-size 32]
    python benchmarks/probe_series.py --img-size 64 --images 64       # smoke check, a minute

Run it on an otherwise idle machine (2 cores: another busy process triples the times).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def settings(args) -> dict:
    """tgo's settings for ViT-S/16 on synthetic images at --img-size (the smoke preset's dataset)."""
    return dict(
        preset="smoke",
        model="vit_small_patch16_224",
        patch_size=0,
        depth=0,
        img_size=args.img_size,
        synthetic_val_size=args.images,
        probe_size=args.images,
        probe_batch_size=args.batch_size,
        feature_epochs="none",  # the bare probes keep no features either: the same measurement on both sides
        device="cpu",
    )


def write_series(folder: Path, args, n: int) -> list[dict]:
    """n checkpoints as timm's train.py writes them (CheckpointSaver, AdamW state, last and
    model_best); returns the state dicts."""
    from timm.utils import CheckpointSaver

    from tgo.config import resolve
    from tgo.model import create_model

    torch.manual_seed(0)
    model = create_model(resolve(**settings(args)), 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    namespace = argparse.Namespace(model="vit_small_patch16_224", img_size=args.img_size, num_classes=4)
    saver = CheckpointSaver(model, opt, args=namespace, checkpoint_dir=str(folder), recovery_dir=str(folder), max_history=n)
    states = []
    for epoch in range(n):
        x = torch.randn(2, 3, args.img_size, args.img_size)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()  # the optimiser state a real checkpoint carries (twice the weights for AdamW)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        saver.save_checkpoint(epoch, metric=float(epoch))
    return states


def series_command(folder: Path, store: Path, args) -> str:
    from tgo.series import probe_checkpoints

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.chdir(store)
    return probe_checkpoints(str(folder), **settings(args)).run_id


def bare_probes(states: list[dict], args) -> None:
    from tgo.config import resolve
    from tgo.data import build_datasets
    from tgo.model import create_model
    from tgo.probe import probe_model
    from tgo.probeset import ProbeSet

    cfg = resolve(**settings(args))
    model = create_model(cfg, 4)
    val = build_datasets(cfg).val
    probe_set = ProbeSet.from_dataset(val, cfg.probe_size, cfg.probe_seed, folds=cfg.probe_folds)
    for state in states:
        model.load_state_dict(state)
        probe_model(model, probe_set.loader(cfg.probe_batch_size), cfg, "cpu")


def _peak_rss(folder: str, store: str, args, out) -> None:
    series_command(Path(folder), Path(store), args)
    out.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # kB -> MB on Linux


def peak_rss(folder: Path, root: Path, args) -> float:
    store = Path(tempfile.mkdtemp(dir=root))
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_peak_rss, args=(str(folder), str(store), args, queue))
    proc.start()
    value = queue.get(timeout=3600)
    proc.join()
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="tgo-bench-series-"))
    try:
        five, two = root / "five", root / "two"
        five.mkdir()
        two.mkdir()
        states = write_series(five, args, 5)
        write_series(two, args, 2)
        size = sum(f.stat().st_size for f in five.iterdir()) / 2**20
        print(f"# ViT-S/16 at {args.img_size} px, {args.images} probe images; five checkpoints of {size / 7:.0f} MB each (with AdamW state)")
        bare_probes(states[:1], args)  # warm-up: imports, first allocations
        t0 = time.perf_counter()
        bare_probes(states, args)
        bare = time.perf_counter() - t0
        store = Path(tempfile.mkdtemp(dir=root))
        t0 = time.perf_counter()
        series_command(five, store, args)
        command = time.perf_counter() - t0
        print(f"# five bare probes {bare:.1f} s; tgo probe over the folder {command:.1f} s")
        print(f"probe_series_over_probes: {command / bare:.3f}")
        rss5, rss2 = peak_rss(five, root, args), peak_rss(two, root, args)
        print(f"# peak resident memory: five checkpoints {rss5:.0f} MB, two {rss2:.0f} MB")
        print(f"peak_rss_5_over_2_checkpoints: {rss5 / rss2:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
