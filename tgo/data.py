"""Datasets and transforms: digits (embedded), synthetic, imagefolder, imagenet100, cifar10/100.

Every dataset yields (image tensor (3, H, W), int label) through timm's transforms
(`timm.data.create_transform`), so the embedded default and ImageNet-100 share one pipeline.
`build_datasets(cfg)` returns the train and validation sets and the class count; the fixed probe
subset is drawn from the validation set (`tgo.probeset`).
"""

from __future__ import annotations

import copy
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

from tgo.config import TrainConfig
from tgo.errors import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def imagenet100_classes() -> list[str]:
    """The 100 WordNet ids of ImageNet-100 (shipped with tgo, as in shared/data)."""
    return files("tgo").joinpath("data/imagenet100_classes.txt").read_text().split()


@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    notes: list[str]  # plain-language facts about the data to log (incompleteness, sizes)


# --------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------


def transforms(cfg: TrainConfig, mean, std, device_side: bool = False):
    """(train, eval) transforms from timm for PIL images at cfg.img_size.

    device_side: stop at uint8 tensors (timm's `use_prefetcher`), for a loader that normalises and
    erases on the device (timm's PrefetchLoader, tgo's loaders on a GPU): normalisation and random
    erasing then leave the transform, every other step is the same.
    """
    from timm.data import create_transform

    train = create_transform(
        use_prefetcher=device_side,
        input_size=cfg.img_size,
        is_training=True,
        hflip=cfg.hflip,
        auto_augment=None if cfg.auto_augment in ("", "none") else cfg.auto_augment,
        re_prob=cfg.reprob,
        interpolation="bicubic",
        mean=mean,
        std=std,
        scale=(0.08, 1.0) if cfg.img_size >= 128 else (0.5, 1.0),
    )
    _posterize_to_zero_bits(train)
    evaluate = create_transform(
        input_size=cfg.img_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=cfg.crop_pct,
        mean=mean,
        std=std,
        use_prefetcher=device_side,
    )
    return train, evaluate


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image, as Pillow gave before version 13.

    timm's increasing posterize (RandAugment's `inc1` set, tgo1's) keeps 4 - int(level * 0.4) bits,
    0 at the top level 10, which magnitude noise reaches (m9 with mstd 0.5: 2% of its draws); the
    AutoAugment policies' posterize keeps 0 bits at their low levels. Pillow 13 refuses 0 bits
    ("bits must be between or equal to 1 and 8"): 0.16% of tgo1's images, a third of its 256-image
    batches, so every tgo1 epoch stopped within its first batches."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit dropped: black, the mask Pillow 12 applied
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_to_zero_bits(transform) -> None:
    """Point the posterize operations of timm's auto-augmentations inside `transform` (RandAugment's,
    AugMix's ops; AutoAugment's sub-policies) at tgo's `posterize`, in place."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", [transform]):
        groups = getattr(step, "policy", None) or [getattr(step, "ops", [])]
        for op in (op for group in groups for op in group):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of a dataset with another transform (the images and labels shared): the
    loaders' device-side copy of a set whose own transform the probe set keeps. Every dataset here
    (ArrayImages, torchvision's folders and CIFAR) applies `self.transform`, as timm's
    `create_loader` assumes when it sets it."""
    twin = copy.copy(dataset)
    twin.transform = transform  # type: ignore[attr-defined]
    return twin


# --------------------------------------------------------------------------------------------------
# augmentation seeds in worker processes
# --------------------------------------------------------------------------------------------------


class SeededOrder(Sampler):
    """A sampler's indices, each paired with the epoch's seed and its position in the epoch:
    (seed, position, index), for `SeededItems`.

    The seed is the shuffling generator's own (`initial_seed()`, set by `train.run_epoch` every
    epoch before the loader is iterated), read without drawing from it, so the order is the one the
    wrapped sampler gives on its own.
    """

    def __init__(self, order: Sampler, generator: torch.Generator) -> None:
        self.order, self.generator = order, generator

    def __len__(self) -> int:
        return len(self.order)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        seed = self.generator.initial_seed()
        return ((seed, position, int(i)) for position, i in enumerate(self.order))


class SeededItems(Dataset):
    """A dataset read by worker processes with its augmentations seeded per image.

    Worker processes that live across epochs (`persistent_workers`) would carry their random state
    from one epoch to the next, so an epoch's augmentations would depend on how many epochs this
    process had run: a resumed run would not repeat an uninterrupted one. Each image's draws are
    instead seeded from (epoch seed, rank, position in the epoch) before its transform runs: the
    augmentations are the same whatever the number of workers (a resume may change `workers`) and
    differ between ranks and between the copies of repeated augmentation. Python's, numpy's and
    torch's generators are all seeded, as timm's transforms draw from all three.
    """

    def __init__(self, dataset: Dataset, rank: int = 0) -> None:
        self.dataset, self.rank = dataset, rank

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]):
        seed, position, index = key
        state = np.random.SeedSequence([seed, self.rank, position]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))
        return self.dataset[index]


# --------------------------------------------------------------------------------------------------
# in-memory datasets: digits and synthetic
# --------------------------------------------------------------------------------------------------


class ArrayImages(Dataset):
    """Images held in memory as uint8 arrays (N, H, W, 3), returned as PIL through a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _digits(cfg: TrainConfig):
    """scikit-learn's handwritten digits (1797 images, 8x8, 17 grey levels), upsampled to
    img_size with bicubic interpolation and repeated over 3 channels. A fixed stratified split
    (80 / 20, independent of the training seed) keeps the probe images the same across seeds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = (digits.images / 16.0 * 255).round().astype(np.uint8)  # (1797, 8, 8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((cfg.img_size, cfg.img_size), Image.Resampling.BICUBIC)) for g in grey])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    idx_train, idx_val = train_test_split(np.arange(len(rgb)), test_size=0.2, random_state=0, stratify=digits.target)
    return (rgb[idx_train], digits.target[idx_train]), (rgb[idx_val], digits.target[idx_val]), 10


def _synthetic(cfg: TrainConfig):
    """Class-conditional noise images: each class has a smooth random prototype; an image is its
    prototype plus noise. Learnable in a few epochs; generated from a fixed seed (0)."""
    k = cfg.num_classes or 4
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, size=(k, 4, 4, 3)).astype(np.uint8)
    protos = np.stack([np.asarray(Image.fromarray(c).resize((cfg.img_size, cfg.img_size), Image.Resampling.BILINEAR)) for c in coarse])

    def make(n):
        labels = np.arange(n) % k
        noise = rng.normal(0, 40, size=(n, cfg.img_size, cfg.img_size, 3))
        return np.clip(protos[labels] + noise, 0, 255).astype(np.uint8), labels

    return make(cfg.synthetic_train_size), make(cfg.synthetic_val_size), k


# --------------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------------


def checked_loader(path: str) -> Image.Image:
    """PIL loader that names the file when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}. Remove or replace the file.") from None


class ClassFolder(ImageFolder):
    """torchvision's ImageFolder, optionally restricted to a fixed list of classes (ImageNet-100)."""

    def __init__(self, root: str, classes: list[str] | None = None, **kwargs) -> None:
        self._only = classes
        super().__init__(root, loader=checked_loader, **kwargs)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        if self._only is not None:
            present = set(classes)
            classes = [c for c in self._only if c in present]
        return classes, {c: i for i, c in enumerate(classes)}


def _split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise DataError(
            f"{path} does not exist: data_dir must hold train/ and val/, each with one folder per "
            f"class (torchvision's ImageFolder layout), e.g. {root}/train/<class>/<image>.jpg."
        )
    return path


def _folder(root: Path, split: str, transform, classes=None) -> ClassFolder:
    path = _split_dir(root, split)
    try:
        return ClassFolder(str(path), classes=classes, transform=transform)
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise DataError(f"{path}: {err}. Expected one folder per class with images inside.") from None


def imagenet100_report(root: str | Path) -> dict:
    """What an ImageNet-100 tree holds: images per class and split, and what is missing."""
    root = Path(root)
    classes = imagenet100_classes()
    missing: dict[str, list[str]] = {}  # split -> classes without images
    per_split: dict[str, dict[str, int]] = {}  # split -> class -> images
    for split in ("train", "val"):
        counts = {}
        for c in classes:
            d = root / split / c
            counts[c] = sum(1 for f in os.scandir(d) if f.name.endswith(IMG_EXTENSIONS)) if d.is_dir() else 0
        per_split[split] = counts
        missing[split] = [c for c, n in counts.items() if n == 0]
    return {"root": str(root), "missing": missing, "counts": per_split}


def _imagenet100(cfg: TrainConfig, train_tf, eval_tf, notes: list[str]):
    root = Path(cfg.data_dir)
    for split in ("train", "val"):
        _split_dir(root, split)
    report = imagenet100_report(root)
    missing = sorted(set(report["missing"]["train"]) | set(report["missing"]["val"]))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(
            f"ImageNet-100 under {root} is incomplete: {len(missing)} of 100 classes have no images "
            f"in train/ or val/ ({shown}). Build it with `tgo data imagenet100 --src IMAGENET1K "
            f"--dst {root}`, which reports what the source lacks."
        )
    small = {c: n for c, n in report["counts"]["train"].items() if n < 1000}
    if small:
        message = (
            f"ImageNet-100 under {root}: {len(small)} classes have fewer than 1000 training images "
            f"(the full set has about 1300 each), smallest {min(small.values())}."
        )
        warnings.warn(message, stacklevel=1)  # about the data, not the caller: reported here
        notes.append(message)
    classes = imagenet100_classes()
    return _folder(root, "train", train_tf, classes), _folder(root, "val", eval_tf, classes), 100


def _cifar(cfg: TrainConfig, train_tf, eval_tf):
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, k = (CIFAR10, 10) if cfg.dataset == "cifar10" else (CIFAR100, 100)
    root = cfg.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "tgo", cfg.dataset)
    try:
        train = cls(root, train=True, transform=train_tf, download=cfg.download)
        val = cls(root, train=False, transform=eval_tf, download=cfg.download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{cfg.dataset} not found under {root} ({err}). Pass download=true to let torchvision "
            f"fetch it (needs internet), or data_dir=<folder holding the extracted archive>."
        ) from None
    except OSError as err:  # offline download
        raise DataError(f"could not download {cfg.dataset} to {root}: {err}. Are you offline?") from None
    return train, val, k


def build_datasets(cfg: TrainConfig, model_data_config: dict | None = None) -> Datasets:
    """The train and validation datasets of a config, with timm's transforms applied.

    Args:
        cfg: the dataset, its folder, the image size and the augmentations.
        model_data_config: a model's own data config (`timm.data.resolve_data_config`: mean, std,
            crop_pct, interpolation), which then replaces the dataset's normalisation and crop in the
            evaluation transform: for weights trained elsewhere with other statistics.
    """
    notes: list[str] = []
    mean, std = (HALF, HALF) if cfg.dataset in ("digits", "synthetic") else (IMAGENET_MEAN, IMAGENET_STD)
    train_tf, eval_tf = transforms(cfg, mean, std)
    if model_data_config is not None:
        from timm.data import create_transform

        mean, std = tuple(model_data_config["mean"]), tuple(model_data_config["std"])
        eval_tf = create_transform(
            input_size=cfg.img_size,
            is_training=False,
            interpolation=model_data_config.get("interpolation", "bicubic"),
            crop_pct=model_data_config.get("crop_pct", cfg.crop_pct),
            mean=mean,
            std=std,
        )
        notes.append(
            f"normalised as the model was trained: mean {mean}, std {std}, crop {model_data_config.get('crop_pct', cfg.crop_pct)}."
        )
    if cfg.dataset in ("digits", "synthetic"):
        (xt, yt), (xv, yv), k = _digits(cfg) if cfg.dataset == "digits" else _synthetic(cfg)
        train, val = ArrayImages(xt, yt, train_tf), ArrayImages(xv, yv, eval_tf)
    elif cfg.dataset == "imagefolder":
        root = Path(cfg.data_dir)
        train, val = _folder(root, "train", train_tf), _folder(root, "val", eval_tf)
        if train.classes != val.classes:
            raise DataError(
                f"{root}: train/ and val/ have different class folders ({len(train.classes)} vs {len(val.classes)}); they must match."
            )
        k = len(train.classes)
    elif cfg.dataset == "imagenet100":
        train, val, k = _imagenet100(cfg, train_tf, eval_tf, notes)
    else:
        train, val, k = _cifar(cfg, train_tf, eval_tf)
    if k < 2:  # a head with one class is always right: "val acc 100%" that says nothing
        where = f" under {cfg.data_dir}" if cfg.data_dir else ""
        raise DataError(
            f"{cfg.dataset}{where} has {k} class{'es' if k != 1 else ''} ({', '.join(map(str, getattr(train, 'classes', []))) or 'none'}); "
            "classification needs at least two, else every prediction is right and nothing is learnt. Add a "
            "folder per class to train/ and val/. Nothing was trained or logged."
        )
    if cfg.num_classes and cfg.num_classes != k and cfg.dataset != "synthetic":
        raise DataError(f"num_classes={cfg.num_classes} but {cfg.dataset} has {k} classes; leave num_classes=0.")
    notes.append(f"{cfg.dataset}: {len(train)} training and {len(val)} validation images, {k} classes.")
    return Datasets(train, val, k, mean, std, notes)


def build_imagenet100(src: str | Path, dst: str | Path, splits=("train", "val")) -> dict:
    """Make ImageNet-100 under dst as symlinks into an ImageNet-1k class-folder tree at src
    (src/train/<wnid>/*.JPEG, src/val/<wnid>/*.JPEG). Returns `imagenet100_report(dst)` plus the
    classes the source lacks; existing links are kept, so it can be re-run to complete a tree."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"--src {src} does not exist; point it at an ImageNet-1k tree with train/ and val/.")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise DataError(
            f"--dst {dst} lies inside --src {src}: ImageNet-100 would be written into the ImageNet-1k "
            "tree it links to. Choose a folder outside it."
        )
    lacking: dict[str, list[str]] = {}
    replaced = 0
    for split in splits:
        split_src = src / split
        if not split_src.is_dir():
            raise DataError(
                f"{split_src} does not exist: the ImageNet-1k tree needs {split}/<wnid>/ class folders "
                "(for val/, sorted into class folders as torchvision's ImageFolder expects)."
            )
        lacking[split] = []
        for wnid in imagenet100_classes():
            cls_src = split_src / wnid
            if not cls_src.is_dir():
                lacking[split].append(wnid)
                continue
            cls_dst = dst / split / wnid
            try:
                cls_dst.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise DataError(
                    f"cannot make the folder {cls_dst}: a file stands where a folder should be "
                    f"(in {dst}). Move it away, or choose another --dst."
                ) from None
            for entry in os.scandir(cls_src):
                if not entry.name.endswith(IMG_EXTENSIONS):
                    continue
                try:
                    is_image = entry.is_file()  # follows links: a dangling or looping link is no image
                except OSError:
                    is_image = False
                if not is_image:
                    continue
                link = cls_dst / entry.name
                if os.path.lexists(link):
                    if link.exists():
                        continue  # kept: the tree can be completed by running again
                    link.unlink()  # a dangling link left by an earlier tree: made again
                    replaced += 1
                link.symlink_to(os.path.abspath(entry.path))
    report = imagenet100_report(dst)
    report["source_lacks"] = lacking
    report["replaced_links"] = replaced
    return report
