"""Benchmark of the training engine, side by side in one process (CPU unless a GPU is present).

Prints, each alone on a line:
  tgo_over_bare_epoch: X   per-epoch wall time of a tgo run with probing off (train, validation,
                           checkpoint, MLflow logging: the time between consecutive epochs' logged
                           metrics) / the same model, data, optimiser and batch size in a bare
                           PyTorch loop (train and validation passes only). demo preset settings.
  probe_share_tgo1: X      the probe's share of an epoch at the tgo1 scale (1000 probe images,
                           126,689 training and 5,000 validation images), estimated from measured
                           per-image costs of ViT-S/16 at 224 px: probe / (train + validation + probe)
  weight_spectra_share_tgo1: X   the weight spectra's share of a tgo1 epoch (every epoch)
  kept_features_share_tgo1: X    similarity and intrinsic dimension of the kept features, averaged
                           over a 300-epoch run that keeps 11 epochs (target of both: <= 0.01)
  demo_wall_s: X           the embedded default (`tgo train`, demo preset) end to end, in seconds

    python benchmarks/train.py [--epochs 4] [--rounds 3] [--skip-demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import mlflow
import torch
from torch.utils.data import DataLoader

TGO1_TRAIN, TGO1_VAL, TGO1_PROBE = 126_689, 5_000, 1_000
CHECKPOINT_S: list[float] = []  # tgo's logged time/checkpoint_s, every epoch of every tgo run


def bare_epochs(cfg, epochs: int) -> list[float]:
    """The plain PyTorch loop: same timm model, AdamW, loss, data and batch size as tgo's run."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2

    from tgo.data import build_datasets
    from tgo.model import create_model

    data = build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, data.num_classes)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    train = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True)
    val = DataLoader(data.val, batch_size=cfg.probe_batch_size)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for images, targets in train:
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for images, targets in val:
                model(images)
        times.append(time.perf_counter() - start)
    return times


def tgo_epochs(cfg_overrides: dict, epochs: int) -> list[float]:
    """tgo's run with probing off; per-epoch time from the logged metrics' timestamps."""
    from tgo.train import run

    result = run(**cfg_overrides, epochs=epochs, probe_every=0, system_metrics=False, experiment="bench")
    client = mlflow.MlflowClient()
    history = sorted(client.get_metric_history(result.run_id, "val/loss"), key=lambda m: m.step)
    stamps = [m.timestamp / 1000 for m in history]
    CHECKPOINT_S.extend(m.value for m in client.get_metric_history(result.run_id, "time/checkpoint_s"))
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]  # as the bare loop's: the first epoch warms up


def per_image_costs_224() -> tuple[float, float, float, float]:
    """Seconds per image at 224 px: a training step, a validation forward, the probe pass (all
    sites and views, float64 products), and the probe's fixed cost (spectra of 44 site/views and
    their K = 5 jackknife replicates)."""
    import timm

    from tgo.config import resolve
    from tgo.probe import probe_model

    cfg = resolve("tgo1", data_dir="unused")  # the probe settings of the TGO-I setting
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n = 16
    images, targets = torch.randn(n, 3, 224, 224), torch.randint(0, 100, (n,))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images[:2]), targets[:2])
    loss.backward()
    start = time.perf_counter()
    for i in range(0, n, 8):
        loss = torch.nn.functional.cross_entropy(model(images[i : i + 8]), targets[i : i + 8])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train = (time.perf_counter() - start) / n
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        model(images)
        val = (time.perf_counter() - start) / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        probe_model(model, [images[:8]], cfg, "cpu")
        small = time.perf_counter() - start
        start = time.perf_counter()
        probe_model(model, [images[i : i + 8] for i in range(0, n, 8)], cfg, "cpu")
        large = time.perf_counter() - start
    per_image = (large - small) / (n - 8)
    fixed = max(small - 8 * per_image, 0.0)
    return train, val, per_image, fixed


def tgo2_costs_224() -> tuple[float, float]:
    """Seconds per tgo1 epoch of the TGO-II measurements: the weight spectra of ViT-S/16 (every
    epoch), and at a kept epoch the similarity and intrinsic dimension of 1000 x 384 features at
    14 sites x 2 views (the features themselves come from the probe's pass: no extra forward)."""
    import numpy as np
    import timm

    from tgo.similarity import feature_metrics
    from tgo.weights import weight_spectra

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=100)
    start = time.perf_counter()
    weight_spectra(model)
    weights = time.perf_counter() - start
    rng = np.random.default_rng(0)
    sites = ["patch_embed", "pos_embed", *[f"block_{i:02d}" for i in range(12)], "final"]
    features = {(s, v): rng.normal(size=(1000, 384)).astype(np.float16) for s in sites for v in ("cls", "mean") if s != "patch_embed" or v == "mean"}
    start = time.perf_counter()
    feature_metrics(features, features)
    similarity = time.perf_counter() - start
    return weights, similarity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the bare loop and tgo")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="tgo-bench-") as workdir:  # its store and runs (1.4 GB), removed afterwards
        os.chdir(workdir)
        try:
            _measure(args, workdir)
        finally:
            os.chdir(here)  # out of the folder before it is removed


def _measure(args: argparse.Namespace, workdir: str) -> None:
    """`main`'s measurements, with the tracking store in `workdir`."""
    from tgo.config import resolve

    uri = f"sqlite:///{workdir}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)

    overrides = dict(preset="demo", checkpoint_epochs="last")
    cfg = resolve(**overrides)
    # Alternate so that both see the machine in the same state; skip each one's first epoch (warm-up).
    bare, tgo = [], []
    for _ in range(args.rounds):
        bare += bare_epochs(cfg, args.epochs)[1:]
        tgo += tgo_epochs(overrides, args.epochs)
    t_bare, t_tgo = statistics.median(bare), statistics.median(tgo)

    train, val, probe_img, probe_fixed = per_image_costs_224()
    weights_s, similarity_s = tgo2_costs_224()
    probe_epoch = TGO1_PROBE * probe_img + probe_fixed
    epoch = TGO1_TRAIN * train + TGO1_VAL * val + probe_epoch

    demo_wall = float("nan")
    if not args.skip_demo:
        from tgo.train import run

        start = time.perf_counter()
        run(preset="demo", experiment="bench-demo")
        demo_wall = time.perf_counter() - start

    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; demo settings, {args.epochs} epochs x {args.rounds}")
    print(f"# seconds per epoch: bare {t_bare:.2f} (median of {' '.join(f'{t:.2f}' for t in bare)}), "
          f"tgo (probe off) {t_tgo:.2f} (median of {' '.join(f'{t:.2f}' for t in tgo)})")
    print(f"# of which writing the resumable checkpoint (model + AdamW state), median: {statistics.median(CHECKPOINT_S):.2f} s")
    print(f"# 224 px seconds per image: train step {train:.4f}, validation {val:.4f}, probe {probe_img:.4f} "
          f"(+ {probe_fixed:.2f} s fixed); tgo1 epoch estimate {epoch / 3600:.2f} h on this machine")
    print(f"tgo_over_bare_epoch: {t_tgo / t_bare:.3f}")
    print(f"probe_share_tgo1: {probe_epoch / epoch:.4f}")
    # weight spectra every epoch; similarity and intrinsic dimension at 11 of 300 epochs (feature_epochs=auto)
    print(f"weight_spectra_share_tgo1: {weights_s / epoch:.5f}")
    print(f"kept_features_share_tgo1: {similarity_s * 11 / 300 / epoch:.5f}  (at a kept epoch: {similarity_s / epoch:.5f})")
    print(f"demo_wall_s: {demo_wall:.0f}")


if __name__ == "__main__":
    main()
