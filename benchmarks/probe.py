"""Benchmark of the geometry probe: ViT-S/16 at 64 px on the CPU, side by side in one process.

Prints, each alone on a line:
  probe_over_inference: X    probe time (all sites and views, float64) / bare inference time
  naive_over_probe: X        naive baseline time / probe time. The naive baseline collects every
                             activation, then calls numpy's SVD with its defaults
                             (np.linalg.svd(Xc): full_matrices=True) per site and view.
  memory_1024_over_512: X    peak RSS of a probe over 1024 images / over 512 (fresh processes)
and, for context, the float32-product probe and a naive baseline that asks numpy for singular
values only (compute_uv=False).

Bare inference and the probe are timed in alternation (--rounds pairs, default 3) and the median
of the per-pair ratios is printed: this VM's speed drifts by 10-20% within a minute.

    python benchmarks/probe.py [--images 512] [--img-size 64] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class NoiseImages(Dataset):
    """Deterministic images made on the fly from the index (memory does not grow with N)."""

    def __init__(self, n: int, img_size: int) -> None:
        self.n, self.img_size = n, img_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.img_size, self.img_size, generator=g), 0


def vit_s16(img_size: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=img_size, num_classes=100).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_inference(model, loader) -> None:
    with torch.no_grad():
        for images, _ in loader:
            model(images)


def run_probe(model, loader, precision="float64") -> None:
    from tgo.probe import probe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pos_embed/cls is constant: a documented degenerate view
        probe(model, loader, precision=precision, progress=False)


def naive(model, loader, values_only: bool) -> None:
    """Collect every site and view's activations, then one numpy SVD per site and view."""
    rows: dict[tuple[str, str], list[np.ndarray]] = {}
    with torch.no_grad():
        for images, _ in loader:
            seen = {}
            hook = model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patch_embed", o))
            final, blocks = model.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True)
            hook.remove()
            sites = {"patch_embed": (None, seen["patch_embed"])}
            pos = model._pos_embed(seen["patch_embed"])
            sites["pos_embed"] = (pos[:, :1], pos[:, 1:])
            for k, (spatial, prefix) in enumerate(blocks):
                sites[f"block_{k:02d}"] = (prefix, spatial)
            sites["final"] = (final[:, :1], final[:, 1:])
            for site, (prefix, patches) in sites.items():
                if prefix is not None:
                    rows.setdefault((site, "cls"), []).append(prefix[:, 0].numpy())
                rows.setdefault((site, "patch"), []).append(patches.reshape(-1, patches.shape[-1]).numpy())
                rows.setdefault((site, "mean"), []).append(patches.mean(1).numpy())
    for parts in rows.values():
        X = np.concatenate(parts).astype(np.float64)
        Xc = X - X.mean(axis=0)
        if values_only:
            np.linalg.svd(Xc, compute_uv=False)
        else:
            np.linalg.svd(Xc)


N_SPECTRA = 44  # site/views of ViT-S/16: 14 sites x (cls, patch, mean) + patch_embed x (patch, mean)


def eig_floor(model) -> float:
    """Seconds for the eigendecompositions the probe must do after its pass, whatever the probe set:
    per site and view, eigvalsh of the covariance and of the second moment (RankMe), in float64."""
    rng = np.random.default_rng(0)
    d = model.embed_dim
    mats = [(a.T @ a) for a in (rng.standard_normal((2 * d, d)) for _ in range(2 * N_SPECTRA))]
    np.linalg.eigvalsh(mats[0])
    return timed(lambda: [np.linalg.eigvalsh(m) for m in mats])


def _peak_rss_worker(n_images: int, img_size: int, batch_size: int, queue) -> None:
    model = vit_s16(img_size)
    loader = DataLoader(NoiseImages(n_images, img_size), batch_size=batch_size)
    run_probe(model, loader)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_rss_kib(n_images: int, img_size: int, batch_size: int) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_worker, args=(n_images, img_size, batch_size, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare inference and the probe")
    args = parser.parse_args()

    model = vit_s16(args.img_size)
    loader = DataLoader(NoiseImages(args.images, args.img_size), batch_size=args.batch_size)
    cached = [batch for batch in loader]  # every method reads the same tensors from memory
    bare_inference(model, cached[:1])  # warm-up
    run_probe(model, cached[:1])  # warm-up
    bare, probe64, probe32 = [], [], []
    for _ in range(args.rounds):  # alternate, so that each ratio compares like machine states
        bare.append(timed(lambda: bare_inference(model, cached)))
        probe64.append(timed(lambda: run_probe(model, cached)))
        probe32.append(timed(lambda: run_probe(model, cached, "float32")))
    ratio64 = statistics.median(p / b for p, b in zip(probe64, bare))
    ratio32 = statistics.median(p / b for p, b in zip(probe32, bare))
    t_bare, t_probe, t_probe32 = map(statistics.median, (bare, probe64, probe32))
    t_naive_values = timed(lambda: naive(model, cached, values_only=True))
    t_naive = timed(lambda: naive(model, cached, values_only=False))
    t_eig = eig_floor(model)
    rss_512 = peak_rss_kib(args.images, args.img_size, args.batch_size)
    rss_1024 = peak_rss_kib(2 * args.images, args.img_size, args.batch_size)

    print(f"# ViT-S/16, {args.img_size} px, {args.images} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# seconds (medians): bare {t_bare:.2f}, probe {t_probe:.2f} (float32 products {t_probe32:.2f}), "
          f"naive {t_naive:.2f} (singular values only {t_naive_values:.2f})")
    print(f"# peak RSS MiB: {rss_512 / 1024:.0f} ({args.images} images), {rss_1024 / 1024:.0f} ({2 * args.images})")
    print(f"# per round: bare {' '.join(f'{t:.2f}' for t in bare)}; probe {' '.join(f'{t:.2f}' for t in probe64)}; "
          f"float32 products {' '.join(f'{t:.2f}' for t in probe32)}")
    print(f"# of the probe's time, its 2 x {N_SPECTRA} float64 eigvalsh of {model.embed_dim} x {model.embed_dim} "
          f"matrices alone take {t_eig:.2f} s = {t_eig / t_bare:.2f} x bare inference (a fixed cost per probe)")
    print(f"probe_over_inference: {ratio64:.3f}")
    print(f"naive_over_probe: {t_naive / t_probe:.2f}")
    print(f"memory_1024_over_512: {rss_1024 / rss_512:.3f}")
    print(f"probe_float32_over_inference: {ratio32:.3f}")
    print(f"naive_values_only_over_probe: {t_naive_values / t_probe:.2f}")


if __name__ == "__main__":
    main()
