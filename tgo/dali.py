"""NVIDIA DALI's data path (`data_backend=dali`, an optional extra): the training and validation
images of an image folder decoded and augmented by DALI, on the GPU when training runs on one.

Why: the 7,000 images/s of a compiled ViT-S/16 step on an H100 need more cores of PIL decoding and
RandAugment than the 8-16 a GPU usually gets (benchmarks/data.py; its figures are in the README's
Performance section). DALI decodes the JPEGs on the GPU (`decoders.image_random_crop`, device "mixed") and
runs the crop, RandAugment (DALI's own `auto_aug.rand_augment`), flip and normalisation there.

What stays timm's or tgo's: the files and labels (the ClassFolder's, so ImageNet-100's class list
and indices are the timm path's), the order of each epoch (the same sampler or shuffling generator,
so the same sharding under torchrun and the same repeated augmentation), random erasing (timm's
RandomErasing on the device batch, as timm's prefetcher does), mixup and cutmix (timm's Mixup in the
training loop), validation's disjoint shards, and the probe set (always tgo's PIL loader: its images
do not depend on the backend).

Determinism: the pipeline is built anew every epoch over that epoch's order, seeded from the epoch's
seed (the shuffling generator's) and the rank, so an epoch's batches depend only on them, as a
resumed run needs. Without a GPU DALI runs on the CPU (`device_id=None`), which is how it is tested.

Where it differs from timm's pipeline: DALI's RandAugment has no magnitude noise (timm's `mstd`),
its magnitude m of timm's 10 levels is m * 3 of DALI's 31 bins, `inc` maps to `monotonic_mag`, and
its operations' fill is grey (128); other auto_augment specs (AutoAugment, AugMix) are refused. The
crop and resize are DALI's (cubic), so pixel values differ from PIL's while shapes, ranges and
labels agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tgo.config import TrainConfig
from tgo.errors import ConfigError

INSTALL = "pip install nvidia-dali-cuda120 (or nvidia-dali-cuda130 for CUDA 13)"


def require() -> None:
    """Raise ConfigError when DALI cannot be imported, saying how to install it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:  # not installed, or its libraries missing
        raise ConfigError(f"data_backend=dali needs NVIDIA DALI, which cannot be imported here ({err}); {INSTALL}.") from None


def rand_augment_args(spec: str) -> dict[str, Any] | None:
    """DALI's rand_augment arguments for a timm RandAugment spec (rand-m9-mstd0.5-inc1), or None for
    none; timm's defaults: 2 operations, magnitude 10, not increasing."""
    spec = spec.strip()
    if spec in ("", "none"):
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"auto_augment: data_backend=dali runs RandAugment specs only (rand-m9-mstd0.5-inc1), not {spec!r}.")
    n, m, inc = 2, 10.0, False
    for part in parts[1:]:
        if part.startswith("mstd"):
            continue  # no magnitude noise in DALI's RandAugment (module docstring)
        if part.startswith("inc"):
            inc = bool(int(part[3:]))
        elif part.startswith("m"):
            m = float(part[1:])
        elif part.startswith("n"):
            n = int(part[1:])
    return dict(n=n, m=round(m * 3), num_magnitude_bins=31, monotonic_mag=inc)


def _pipeline(
    cfg: TrainConfig,
    files: list[str],
    labels: list[int],
    training: bool,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device_id: int | None,
    seed: int,
):
    """A DALI pipeline over `files` in their order: (images float32 (3, S, S) normalised, label)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment  # imported outside the pipeline: DALI converts its conditionals

    size = cfg.img_size
    gpu = device_id is not None
    rand = rand_augment_args(cfg.auto_augment) if training else None

    # No annotated names inside: DALI's AutoGraph, which converts the conditionals of rand_augment,
    # cannot convert them and would run the pipeline unconverted.
    @pipeline_def(enable_conditionals=rand is not None)
    def pipe():
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="reader")
        if training:
            # timm's RandomResizedCrop: area 0.08-1 (0.5-1 under 128 px), aspect 3/4-4/3, fused with the decode
            images = fn.decoders.image_random_crop(
                jpegs,
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                random_area=(0.08, 1.0) if size >= 128 else (0.5, 1.0),
                random_aspect_ratio=(3 / 4, 4 / 3),
            )
            images = fn.resize(images, size=(size, size), interp_type=types.INTERP_CUBIC, antialias=True)
            if rand is not None:
                images = rand_augment.rand_augment(images, shape=(size, size), max_translate_rel=0.45, **rand)
            elif cfg.auto_augment.strip() in ("", "none"):  # timm's colour jitter 0.4 when there is no auto-augment
                images = fn.color_twist(
                    images,
                    brightness=fn.random.uniform(range=(0.6, 1.4)),
                    contrast=fn.random.uniform(range=(0.6, 1.4)),
                    saturation=fn.random.uniform(range=(0.6, 1.4)),
                )
            mirror = fn.random.coin_flip(probability=cfg.hflip) if cfg.hflip > 0 else 0
            crop = {}
        else:
            images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
            # timm's eval: the shorter side to floor(size / crop_pct), then a centre crop of size
            images = fn.resize(images, resize_shorter=math.floor(size / cfg.crop_pct), interp_type=types.INTERP_CUBIC, antialias=True)
            mirror, crop = 0, dict(crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * v for v in mean],
            std=[255 * v for v in std],
            mirror=mirror,
            **crop,
        )
        return images, label.gpu() if gpu else label

    return pipe(batch_size=batch_size, num_threads=max(cfg.workers, 1), device_id=device_id, seed=seed, prefetch_queue_depth=2)


class DaliLoader:
    """(images (B, 3, S, S) float32, labels (B,) int64) batches on the device from DALI, over the
    order `order` gives each epoch (a sampler, or a fixed list of indices into `samples`).

    Args:
        cfg: the run's config (img_size, auto_augment, hflip, crop_pct, reprob, workers: DALI's CPU threads).
        samples: (path, label) of every image (torchvision's ImageFolder.samples).
        order: the indices of an epoch, iterated anew every epoch.
        training: the training pipeline (random crop, RandAugment, flip, erasing) or the evaluation one.
        mean, std: the normalisation, in [0, 1] units.
        batch_size: images per batch.
        drop_last: drop the last short batch.
        device: where the batches are made (a GPU: DALI's device; else DALI runs on the CPU).
        generator: the run's shuffling generator, whose seed (set every epoch) seeds the pipeline.
        rank: this process among the training processes (mixed into the seed).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        samples: Sequence[tuple[str, int]],
        order: Any,
        training: bool,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        drop_last: bool,
        device: torch.device,
        generator: torch.Generator,
        rank: int = 0,
    ) -> None:
        require()
        rand_augment_args(cfg.auto_augment if training else "none")  # a spec DALI cannot run fails here, before the run
        self.cfg, self.samples, self.order, self.training = cfg, samples, order, training
        self.mean, self.std, self.batch_size, self.drop_last = mean, std, batch_size, drop_last
        self.device, self.generator, self.rank = device, generator, rank
        self.erasing = None
        if training and cfg.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erasing = RandomErasing(probability=cfg.reprob, mode="const", device=str(device))

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        indices = [int(i) for i in self.order]
        if not indices:
            return
        files = [self.samples[i][0] for i in indices]
        labels = [int(self.samples[i][1]) for i in indices]
        seed = (self.generator.initial_seed() * 1_000_003 + self.rank) % (2**31)
        device_id = None  # DALI on the CPU
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = _pipeline(self.cfg, files, labels, self.training, self.mean, self.std, self.batch_size, device_id, seed)
        batches = DALIGenericIterator(
            pipe,
            ["images", "labels"],
            reader_name="reader",
            last_batch_policy=LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL,
        )
        try:
            for batch in batches:
                images = batch[0]["images"]
                targets = batch[0]["labels"].reshape(-1).long()
                if self.erasing is not None:
                    images = self.erasing(images)
                yield images, targets
        finally:
            del batches, pipe  # the pipeline's threads and buffers go with the epoch
