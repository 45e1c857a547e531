"""Benchmark of the tgo1 training data path on the CPU: how many images per second one loader worker
makes, and so how many cores a GPU needs to be fed.

The pipeline is tgo1's, built by tgo.data.transforms for the tgo1 preset: JPEG decode (PIL, through
tgo's ClassFolder), RandomResizedCrop to 224 px (bicubic, scale 0.08-1), RandAugment
rand-m9-mstd0.5-inc1, horizontal flip, to a uint8 tensor, collated by timm's fast_collate. That is a
worker's share on a GPU: normalisation and random erasing run on the device (timm's PrefetchLoader).
The images are real photographs: scikit-learn's two sample JPEGs (china.jpg, flower.jpg, 640 x 427),
cut into --crops crops each of ImageNet's typical size, 500 x 375 px, mirrored or not, and
re-encoded at quality 90 (about 55 KB each: smoother than ImageNet's photographs, about 110 KB at
this size, which take longer to decode), read round and round from a temporary folder (the page
cache: the decoding is timed, not the disk).

One worker is the loop a DataLoader worker runs: torch limited to one thread, no worker process
(the batches a worker sends through shared memory cost little beside the decoding). The CPU's own
path (normalised and erased in the worker, as tgo runs on a CPU) is timed beside it, in alternation
(--rounds rounds of --images images each; the median round is printed): this VM's speed drifts by
10-20% within a minute.

Prints, each alone on a line:
  loader_images_per_s_per_worker: X     images per second one worker makes (the GPU path)
  workers_per_1000_images_per_s: X      workers (cores) per 1000 images/s of training throughput
and, for context, loader_images_per_s_per_worker_cpu_path (normalised and erased in the worker),
dali_cpu_images_per_s_per_thread where NVIDIA DALI is installed (tgo.dali's training pipeline run
on one CPU thread once built, its build on a # line: for comparison only, DALI's point is the GPU),
and lines starting with # for the seconds behind them, the cores the issue's anchor throughputs
need (a ViT-S/16 step on an H100: about 2,000 images/s eager, 7,000 compiled; an RTX 3090 about
1,050), and how busy other processes kept the cores meanwhile.

    python benchmarks/data.py [--images 256] [--rounds 3] [--crops 8]
    python benchmarks/data.py --images 32 --rounds 1          # smoke check, seconds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageOps
from probe import OtherLoad  # benchmarks/probe.py, beside this script
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, Subset

from tgo.config import resolve
from tgo.data import IMAGENET_MEAN, IMAGENET_STD, ClassFolder, transforms

ANCHORS = {"H100 compiled": 7000, "H100 eager": 2000, "RTX 3090": 1050}
SIZE = (500, 375)


def photographs(root: Path, crops: int) -> int:
    """Cut scikit-learn's sample photographs into `crops` crops each of 500 x 375 px (every other one
    mirrored), saved at JPEG quality 90 as an image folder root/train/<photo>/; returns the count."""
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "images"
    n = 0
    for name in ("china", "flower"):
        photo = Image.open(folder / f"{name}.jpg").convert("RGB")
        (root / "train" / name).mkdir(parents=True)
        w, h = photo.size[0] - SIZE[0], photo.size[1] - SIZE[1]
        for k in range(crops):
            x, y = w * k // max(crops - 1, 1), h * ((k * 5) % crops) // max(crops - 1, 1)
            crop = photo.crop((x, y, x + SIZE[0], y + SIZE[1]))
            (ImageOps.mirror(crop) if k % 2 else crop).save(root / "train" / name / f"{name}_{k}.jpg", quality=90)
            n += 1
    return n


def timed(loader: Iterable) -> float:
    """Seconds for one pass over the loader."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def dali_rate(cfg, folder: ClassFolder, args) -> tuple[float, float] | None:
    """tgo.dali's training pipeline on one CPU thread: (images per second once built, seconds to
    build it and make one batch, which every epoch pays), medians of the rounds; None without DALI."""
    try:
        from tgo.dali import DaliLoader, require

        require()
    except Exception:  # noqa: BLE001 - no DALI here: the line is left out
        return None
    generator = torch.Generator().manual_seed(0)

    def loader(n: int) -> DaliLoader:
        order = [i % len(folder) for i in range(n)]
        return DaliLoader(replace(cfg, workers=1, reprob=0.0), folder.samples, order, True, IMAGENET_MEAN, IMAGENET_STD,
                          args.batch_size, False, torch.device("cpu"), generator)

    one, whole = loader(args.batch_size), loader(args.images)
    timed(one)  # warm: DALI's first pipeline converts its conditionals and loads its plugins
    rounds = [(timed(one), timed(whole)) for _ in range(args.rounds)]
    first = statistics.median(a for a, _ in rounds)
    return (args.images - args.batch_size) / statistics.median(b - a for a, b in rounds), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per round and path")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two paths")
    parser.add_argument("--crops", type=int, default=8, help="crops of each of the two photographs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per collated batch")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a DataLoader worker runs torch on one thread
    root = Path(tempfile.mkdtemp(prefix="tgo-data-bench-"))
    cfg = resolve("tgo1", data_dir=str(root))  # tgo1's transforms; the folder is this one
    try:
        files = photographs(root, args.crops)
        sizes = [p.stat().st_size for p in root.rglob("*.jpg")]
        loaders = {}
        for path, device_side in (("gpu", True), ("cpu", False)):
            train_tf, _ = transforms(cfg, IMAGENET_MEAN, IMAGENET_STD, device_side=device_side)
            folder = ClassFolder(str(root / "train"), transform=train_tf)
            items = Subset(folder, [i % len(folder) for i in range(args.images)])
            loaders[path] = DataLoader(items, batch_size=args.batch_size, collate_fn=fast_collate if device_side else None)
        for loader in loaders.values():  # warm: imports, the page cache, PIL's decoder
            timed(DataLoader(Subset(loader.dataset, range(args.batch_size)), batch_size=args.batch_size, collate_fn=loader.collate_fn))
        load = OtherLoad()
        seconds: dict[str, list[float]] = {path: [] for path in loaders}
        for _ in range(args.rounds):
            for path, loader in loaders.items():
                seconds[path].append(timed(loader))
        per_worker = {path: args.images / statistics.median(s) for path, s in seconds.items()}
        dali = dali_rate(cfg, ClassFolder(str(root / "train")), args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rate = per_worker["gpu"]
    print(f"# tgo1 training pipeline ({cfg.auto_augment}, RandomResizedCrop {cfg.img_size} px, hflip {cfg.hflip}) on {files} JPEGs of "
          f"{SIZE[0]} x {SIZE[1]} px, quality 90, {statistics.mean(sizes) / 1024:.0f} KiB on average; torch {torch.__version__}, "
          f"{os.cpu_count()} cores, {load.text()} busy meanwhile")
    for path, s in seconds.items():
        print(f"# {path} path: {args.images} images in {' '.join(f'{t:.2f}' for t in s)} s (rounds)")
    print(f"loader_images_per_s_per_worker: {rate:.0f}")
    print(f"workers_per_1000_images_per_s: {1000 / rate:.1f}")
    print(f"loader_images_per_s_per_worker_cpu_path: {per_worker['cpu']:.0f}")
    if dali is not None:
        print(f"dali_cpu_images_per_s_per_thread: {dali[0]:.0f}")
        print(f"# dali: {dali[1]:.2f} s to build the pipeline and make the first batch of {args.batch_size} (every epoch)")
    for name, throughput in ANCHORS.items():
        print(f"# {name} at {throughput} images/s needs {throughput / rate:.0f} workers (cores) at this rate")


if __name__ == "__main__":
    main()
