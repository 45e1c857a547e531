"""The fixed probe subset: which validation images the geometry probe sees, and a fingerprint of them.

The subset depends only on the dataset's length, the requested size and a seed (numpy's
`default_rng(seed).choice` without replacement, sorted): the same seed gives the same images
whatever the batch size, worker count or device. The fingerprint (SHA-256) covers the chosen
indices and the content of each chosen item, so a later re-probe can tell whether it sees the same
data: for path-based datasets (torchvision's ImageFolder and anything with `.samples`) the relative
file path, label and file bytes; otherwise the item's tensor bytes and label.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sized
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tgo import uncertainty


def probe_indices(n_items: int, size: int, seed: int) -> np.ndarray:
    """`size` distinct indices of range(n_items), sorted, fixed by `seed`."""
    if size < 1:
        raise ValueError(f"probe_size must be at least 1, got {size}.")
    if size > n_items:
        raise ValueError(f"probe_size={size} exceeds the {n_items} images of the validation set; choose probe_size <= {n_items}.")
    return np.sort(np.random.default_rng(seed).choice(n_items, size=size, replace=False))


def dataset_size(dataset: Dataset) -> int:
    """len(dataset): every dataset tgo probes is map-style, with a length (torch's Dataset declares
    no __len__, since an IterableDataset may have none)."""
    return len(cast(Sized, dataset))


def _item_bytes(dataset: Dataset, index: int) -> bytes:
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # ImageFolder: (path, label)
        path, label = samples[index]
        root = getattr(dataset, "root", os.path.dirname(path))
        with open(path, "rb") as fh:
            content = fh.read()
        return os.path.relpath(path, root).encode() + f"|{label}|".encode() + content
    item = dataset[index]
    parts = item if isinstance(item, (tuple, list)) else (item,)
    out = b""
    for part in parts:
        if isinstance(part, torch.Tensor):
            out += part.detach().cpu().contiguous().numpy().tobytes()
        else:
            out += repr(part).encode()
    return out


def fingerprint(dataset: Dataset, indices: np.ndarray) -> str:
    """SHA-256 over the indices and the content of each indexed item (see module docstring)."""
    h = hashlib.sha256()
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    for i in indices:
        h.update(hashlib.sha256(_item_bytes(dataset, int(i))).digest())
    return h.hexdigest()


class _WithFold(Dataset):
    """The probe images as (image, label, fold): the fold travels with its image through any batch
    size, worker count or DDP shard."""

    def __init__(self, dataset: Dataset, indices: list[int], folds: list[int]) -> None:
        self.dataset, self.indices, self.folds = dataset, indices, folds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item = self.dataset[self.indices[i]]
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        return image, label, self.folds[i]


@dataclass
class ProbeSet:
    """A fixed subset of a dataset for the geometry probe: indices, fingerprint, each image's
    jackknife fold (`tgo.uncertainty.fold_ids`) and a loader."""

    dataset: Dataset
    indices: np.ndarray
    seed: int
    fingerprint: str
    folds: int = uncertainty.DEFAULT_FOLDS

    @classmethod
    def from_dataset(cls, dataset: Dataset, size: int, seed: int = 0, folds: int = uncertainty.DEFAULT_FOLDS) -> ProbeSet:
        indices = probe_indices(dataset_size(dataset), size, seed)
        return cls(dataset, indices, seed, fingerprint(dataset, indices), folds)

    @property
    def fold_ids(self) -> np.ndarray:
        """The fold of each probe image, in index order: fixed by the seed and the set's size."""
        return uncertainty.fold_ids(len(self.indices), self.folds, self.seed)

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self) -> Subset:
        return Subset(self.dataset, self.indices.tolist())

    def loader(
        self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """A loader of (images, labels, folds) over the probe images in index order (no shuffling,
        no dropped batch). Under DDP, rank r of w takes every w-th image from r on: the shards are
        disjoint and cover the subset exactly (DistributedSampler would pad with repeats, which
        would bias the geometry)."""
        shard = self.indices[rank::world_size].tolist()
        folds = self.fold_ids[rank::world_size].tolist()
        return DataLoader(
            _WithFold(self.dataset, shard, folds),
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    def record(self) -> dict:
        """What a run records about its probe set (JSON-serialisable)."""
        return {
            "size": int(len(self.indices)),
            "seed": int(self.seed),
            "folds": int(self.folds),
            "dataset_size": int(dataset_size(self.dataset)),
            "fingerprint": self.fingerprint,
            "indices": [int(i) for i in self.indices],
        }
