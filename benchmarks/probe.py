"""Benchmark of the geometry probe: ViT-S/16 on the CPU at 64 px and at tgo1's 224 px, side by side in one process.

Every probe measures all 44 site/views. "With uncertainty" is the default probe: probe(folds=5),
five fold accumulators per site/view and the delete-one-fold jackknife standard error of every
observable (tgo.uncertainty); folds=1 switches it off. Products are float64 unless said otherwise.

Prints, each alone on a line:

section 64 (--img-size px, default 64; --images images, default 512; batch --batch-size, default 64)
  probe_over_inference: X    probe time (with uncertainty, float64) / bare inference time
  naive_over_probe: X        naive baseline time / probe time (with uncertainty). The naive baseline
                             collects every activation, then calls numpy's SVD with its defaults
                             (np.linalg.svd(Xc): full_matrices=True) per site and view.
  memory_1024_over_512: X    peak RSS of a probe (with uncertainty) over 2 x --images images / over
                             --images (fresh processes; 1024 and 512 by default)
and, for context, the float32-product probe (probe_float32_over_inference), the probe without
uncertainty (probe_over_inference_no_uncertainty: folds=1, float64) and a naive baseline that asks
numpy for singular values only (naive_values_only_over_probe: np.linalg.svd(Xc, compute_uv=False)).

section 224 (tgo1's resolution: 224 px, --images-224 images, default 256, batch --batch-size-224, default 32)
  probe_over_inference_224: X   probe time (with uncertainty, float64) / bare inference time.
                                Target: at most 1.6 on a 2-core CPU.
  naive_over_probe_224: X       naive baseline time / probe time (with uncertainty). numpy's default
                                SVD would need over 20 GB here (a 50,176 x 50,176 U per patch view),
                                so this baseline stores every activation in float32, converts one
                                site/view at a time to float64 and calls np.linalg.svd(Xc,
                                compute_uv=False) on it.
and, for context, probe_over_inference_224_float32 (float32 products, folds=5) and
probe_over_inference_224_no_uncertainty (folds=1, float64).

Lines starting with # give the seconds behind the ratios and the eigendecomposition floor: the
probe's float64 eigvalsh of 384 x 384 matrices (covariance and second moment per site/view), 2 x 44
without uncertainty and 2 x 44 x (K + 1) with K folds (the full estimate and K leave-one-fold-out
replicates), a fixed cost per probe whatever the number of images.

Bare inference and the probes are timed in alternation (--rounds rounds, default 3: bare inference,
then each probe variant) and the median of the per-round ratios is printed: this VM's speed drifts
by 10-20% within a minute. Run it on an otherwise idle machine: with another process on the cores,
numpy's OpenBLAS threads wait on each other and its eigvalsh slows about tenfold, which the ratios
would blame on the probe (each section's first line says how busy other processes kept the cores).

    python benchmarks/probe.py [--sections 64,224] [--images 512] [--img-size 64] [--batch-size 64]
                               [--images-224 256] [--batch-size-224 32] [--rounds 3]
    python benchmarks/probe.py --images 32 --images-224 32 --rounds 1    # smoke check, minutes
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tgo.uncertainty import DEFAULT_FOLDS

SECTIONS = ("64", "224")


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


def run_probe(model, loader, precision="float64", folds=DEFAULT_FOLDS) -> None:
    from tgo.probe import probe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pos_embed/cls is constant: a documented degenerate view
        probe(model, loader, precision=precision, folds=folds, progress=False)


# The probe variants timed against bare inference: (name, precision, folds); the first is the headline.
VARIANTS = (
    ("probe", "float64", DEFAULT_FOLDS),
    ("float32 products", "float32", DEFAULT_FOLDS),
    ("no uncertainty", "float64", 1),
)


def collect(model, loader) -> dict[tuple[str, str], list[np.ndarray]]:
    """Every site and view's activations (float32), as the probe sees them."""
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
                if prefix is not None:  # a copy: a view would keep the whole (B, T + 1, D) output alive
                    rows.setdefault((site, "cls"), []).append(prefix[:, 0].numpy().copy())
                rows.setdefault((site, "patch"), []).append(patches.reshape(-1, patches.shape[-1]).numpy())
                rows.setdefault((site, "mean"), []).append(patches.mean(1).numpy())
    return rows


def naive(model, loader, values_only: bool) -> None:
    """Collect every site and view's activations, then one numpy SVD per site and view, each
    converted to float64 (and its float32 rows released) one at a time."""
    rows = collect(model, loader)
    while rows:
        X = np.concatenate(rows.pop(next(iter(rows))), dtype=np.float64)
        X -= X.mean(axis=0)
        if values_only:
            np.linalg.svd(X, compute_uv=False)
        else:
            np.linalg.svd(X)
        del X


EMBED_DIM = 384  # ViT-S/16
N_SPECTRA = 44  # site/views of ViT-S/16: 14 sites x (cls, patch, mean) + patch_embed x (patch, mean)


def eig_floor(dim: int, folds: int) -> tuple[float, float]:
    """Seconds for the eigendecompositions the probe must do after its pass, whatever the probe set:
    per site and view, eigvalsh of the covariance and of the second moment (RankMe), in float64;
    (2 x 44 of them without uncertainty, 2 x 44 x (K + 1) with K folds)."""
    rng = np.random.default_rng(0)
    mats = [(a.T @ a) for a in (rng.standard_normal((2 * dim, dim)) for _ in range(2 * N_SPECTRA))]
    np.linalg.eigvalsh(mats[0])
    plain = timed(lambda: [np.linalg.eigvalsh(m) for m in mats])
    jack = timed(lambda: [np.linalg.eigvalsh(m) for _ in range(folds + 1) for m in mats])
    return plain, jack


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


class OtherLoad:
    """Cores kept busy by other processes (and VM steal) since construction: busy CPU time of the
    whole machine (/proc/stat) less this process's and its children's, over wall time (Linux)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                ticks = [int(v) for v in fh.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        own = sum(os.times()[:4])
        return busy, own, time.perf_counter()

    def text(self) -> str:
        end = self._sample()
        if self.start is None or end is None:
            return "unknown"
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return f"{max(busy - own, 0.0) / wall:.2f} of {os.cpu_count()} cores"


def alternate(model, cached, rounds: int) -> tuple[list[float], dict[str, list[float]]]:
    """Bare inference then each probe variant, `rounds` times over the same cached batches; returns
    the bare times and each variant's times, round by round."""
    images, labels = cached[0]
    warm = [(images[:8], labels[:8])]
    bare_inference(model, warm)  # warm-up
    for _, precision, folds in VARIANTS:
        run_probe(model, warm, precision, folds)  # warm-up
    bare: list[float] = []
    probes: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(rounds):  # alternate, so that each ratio compares like machine states
        bare.append(timed(lambda: bare_inference(model, cached)))
        for name, precision, folds in VARIANTS:
            probes[name].append(timed(lambda: run_probe(model, cached, precision, folds)))
    return bare, probes


def ratio(times: list[float], bare: list[float]) -> float:
    return statistics.median(t / b for t, b in zip(times, bare))


def report_times(bare: list[float], probes: dict[str, list[float]], naive_s: dict[str, float]) -> None:
    medians = ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in probes.items())
    naives = ", ".join(f"{name} {t:.2f}" for name, t in naive_s.items())
    print(f"# seconds (medians): bare {statistics.median(bare):.2f}; {medians}; naive: {naives}")
    per_round = "; ".join(f"{name} {' '.join(f'{t:.2f}' for t in ts)}" for name, ts in probes.items())
    print(f"# per round: bare {' '.join(f'{t:.2f}' for t in bare)}; {per_round}")


def report_floor(dim: int, floor: tuple[float, float], bare_s: float) -> None:
    plain, jack = floor
    print(f"# of the probe's time, its 2 x {N_SPECTRA} float64 eigvalsh of {dim} x {dim} matrices alone take "
          f"{plain:.2f} s = {plain / bare_s:.2f} x bare inference (a fixed cost per probe, without uncertainty)")
    print(f"# with the jackknife (K = {DEFAULT_FOLDS}), its 2 x {N_SPECTRA} x (K + 1) = "
          f"{2 * N_SPECTRA * (DEFAULT_FOLDS + 1)} eigvalsh of {dim} x {dim} take {jack:.2f} s = "
          f"{jack / bare_s:.2f} x bare inference (a fixed cost per probe)")


def section_small(args, floor: tuple[float, float]) -> None:
    others = OtherLoad()
    model = vit_s16(args.img_size)
    loader = DataLoader(NoiseImages(args.images, args.img_size), batch_size=args.batch_size)
    cached = [batch for batch in loader]  # every method reads the same tensors from memory
    bare, probes = alternate(model, cached, args.rounds)
    t_probe = statistics.median(probes["probe"])
    t_naive_values = timed(lambda: naive(model, cached, values_only=True))
    t_naive = timed(lambda: naive(model, cached, values_only=False))
    rss_512 = peak_rss_kib(args.images, args.img_size, args.batch_size)
    rss_1024 = peak_rss_kib(2 * args.images, args.img_size, args.batch_size)

    print(f"# ViT-S/16, {args.img_size} px, {args.images} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; other processes kept {others.text()} "
          "busy meanwhile")
    report_times(bare, probes, {"svd": t_naive, "singular values only": t_naive_values})
    print(f"# peak RSS MiB: {rss_512 / 1024:.0f} ({args.images} images), {rss_1024 / 1024:.0f} ({2 * args.images})")
    report_floor(model.embed_dim, floor, statistics.median(bare))
    print(f"probe_over_inference: {ratio(probes['probe'], bare):.3f}")
    print(f"naive_over_probe: {t_naive / t_probe:.2f}")
    print(f"memory_1024_over_512: {rss_1024 / rss_512:.3f}")
    print(f"probe_float32_over_inference: {ratio(probes['float32 products'], bare):.3f}")
    print(f"probe_over_inference_no_uncertainty: {ratio(probes['no uncertainty'], bare):.3f}")
    print(f"naive_values_only_over_probe: {t_naive_values / t_probe:.2f}", flush=True)


def section_224(args, floor: tuple[float, float]) -> None:
    others = OtherLoad()
    model = vit_s16(224)
    loader = DataLoader(NoiseImages(args.images_224, 224), batch_size=args.batch_size_224)
    cached = [batch for batch in loader]  # every method reads the same tensors from memory
    bare, probes = alternate(model, cached, args.rounds)
    t_probe = statistics.median(probes["probe"])
    t_naive = timed(lambda: naive(model, cached, values_only=True))

    print(f"# ViT-S/16, 224 px, {args.images_224} images, batch {args.batch_size_224}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; other processes kept {others.text()} "
          "busy meanwhile")
    report_times(bare, probes, {"singular values only, one site/view at a time in float64": t_naive})
    report_floor(model.embed_dim, floor, statistics.median(bare))
    print(f"probe_over_inference_224: {ratio(probes['probe'], bare):.3f}")
    print(f"naive_over_probe_224: {t_naive / t_probe:.2f}")
    print(f"probe_over_inference_224_float32: {ratio(probes['float32 products'], bare):.3f}")
    print(f"probe_over_inference_224_no_uncertainty: {ratio(probes['no uncertainty'], bare):.3f}", flush=True)


def sections(text: str) -> list[str]:
    chosen = [s.strip().removesuffix("px") for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS)} (comma-separated); got {text!r}")
    return [s for s in SECTIONS if s in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=sections, default=list(SECTIONS),
                        help="comma-separated sections to run: 64 (--img-size px), 224 (tgo1); default both")
    parser.add_argument("--images", type=int, default=512, help="probe images of section 64")
    parser.add_argument("--img-size", type=int, default=64, help="image size of section 64")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of section 64")
    parser.add_argument("--images-224", type=int, default=256, help="probe images of section 224")
    parser.add_argument("--batch-size-224", type=int, default=32, help="batch size of section 224")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of bare inference and the probes")
    args = parser.parse_args()

    floor = eig_floor(EMBED_DIM, DEFAULT_FOLDS)
    if "64" in args.sections:
        section_small(args, floor)
    if "224" in args.sections:
        section_224(args, floor)


if __name__ == "__main__":
    main()
