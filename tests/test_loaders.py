"""The training and validation loaders: the GPU's path (uint8 batches normalised and erased on the
device by timm's PrefetchLoader) gives the CPU path's batches, and worker processes kept between
epochs give an epoch the same augmentations whatever ran before it and however many workers there
are (what a resumed run needs)."""

import torch

from tgo.config import resolve
from tgo.data import build_datasets
from tgo.runtime import Dist, seed_epoch
from tgo.train import _loaders

CPU = torch.device("cpu")


def _epoch(cfg, epoch: int, loaders=None, on_device: bool = False):
    """One epoch's training batches, seeded as train.run_epoch seeds them; and the loaders."""
    data = build_datasets(cfg)
    loaders = loaders or _loaders(cfg, Dist(), data, None, CPU, drop_last=False, on_device=on_device)
    train, sampler, generator = loaders[:3]
    generator.manual_seed(seed_epoch(cfg.seed, epoch))
    return [(images.clone(), targets.clone()) for images, targets in train], loaders


def test_the_device_path_gives_the_cpu_path_batches_and_erases_on_the_device():
    cfg = resolve("smoke", synthetic_train_size=64, batch_size=16, hflip=0.5)
    cpu, _ = _epoch(cfg, 1)
    device, loaders = _epoch(cfg, 1, on_device=True)
    assert [t.tolist() for _, t in cpu] == [t.tolist() for _, t in device]
    for (a, _), (b, _) in zip(cpu, device, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape == (16, 3, 32, 32)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)  # (x - 255 m) / 255 s on the device == Normalize(x / 255)
    val = [images for images, _ in loaders[3]]
    assert sum(len(v) for v in val) == cfg.synthetic_val_size and val[0].dtype == torch.float32

    erased, _ = _epoch(resolve("smoke", synthetic_train_size=64, batch_size=16, hflip=0.5, reprob=1.0), 1, on_device=True)
    for images, _ in erased:
        zero = (images == 0).all(dim=1)  # (B, H, W): erased to 0 in every channel ('const' mode)
        assert (zero.flatten(1).sum(1) >= 0.02 * 32 * 32).all()  # each image has its rectangle, >= 2% of it
    # The first batch's augmentations are drawn before any erasing draws: the rest of it is the CPU path's.
    kept = ~(erased[0][0] == 0).all(dim=1, keepdim=True)
    torch.testing.assert_close(erased[0][0] * kept, cpu[0][0] * kept, atol=1e-5, rtol=0)


def test_workers_kept_between_epochs_augment_an_epoch_as_a_fresh_process_does():
    # hflip, random crops and colour jitter: augmentations drawn in the worker processes.
    cfg = resolve("smoke", synthetic_train_size=48, batch_size=8, hflip=0.5, workers=2)
    _, kept = _epoch(cfg, 1)
    assert kept[0].persistent_workers
    after_one, _ = _epoch(cfg, 2, loaders=kept)  # the same workers, one epoch later (an uninterrupted run)
    fresh, _ = _epoch(resolve("smoke", synthetic_train_size=48, batch_size=8, hflip=0.5, workers=1), 2)  # a resume, other workers
    assert len(after_one) == len(fresh) == 6
    for (a, ta), (b, tb) in zip(after_one, fresh, strict=True):
        assert torch.equal(ta, tb) and torch.equal(a, b)
    first, _ = _epoch(cfg, 1)
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, after_one, strict=True))  # epochs differ
