"""The training and validation loaders: the GPU's path (uint8 batches normalised and erased on the
device by timm's PrefetchLoader) gives the CPU path's batches, and worker processes kept between
epochs give an epoch the same augmentations whatever ran before it and however many workers there
are (what a resumed run needs)."""

import pytest
import torch

from tgo.config import resolve
from tgo.data import build_datasets
from tgo.probeset import ProbeSet
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


def _jpeg_tree(root, per_class: int = 6) -> None:
    """train/ and val/ of two classes of 64 x 48 JPEGs (smooth colour ramps with noise), as DALI reads."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 64)[None, :, None]
    for split in ("train", "val"):
        for k, c in enumerate(("a", "b")):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                base = np.broadcast_to(ramp * (0.3 + 0.7 * k) + rng.integers(0, 60, 3), (48, 64, 3))
                image = np.clip(base + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(root / split / c / f"{i}.jpg", quality=90)


def test_dali_gives_the_timm_path_labels_shapes_value_ranges_and_probe_set(tmp_path):
    pytest.importorskip("nvidia.dali", exc_type=ImportError)
    _jpeg_tree(tmp_path)
    settings = dict(dataset="imagefolder", data_dir=str(tmp_path), num_classes=0, batch_size=4, probe_size=6, probe_batch_size=5,
                    auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, hflip=0.5, workers=1)
    timm_cfg, dali_cfg = resolve("smoke", **settings), resolve("smoke", data_backend="dali", **settings)
    data = build_datasets(timm_cfg)
    probe = ProbeSet.from_dataset(data.val, 6, seed=0, folds=2)
    timm_loaders = _loaders(timm_cfg, Dist(), data, probe, CPU, drop_last=True)
    dali_loaders = _loaders(dali_cfg, Dist(), data, probe, CPU, drop_last=True)
    low = (torch.tensor(0.0) - torch.tensor(data.mean)) / torch.tensor(data.std)
    high = (torch.tensor(1.0) - torch.tensor(data.mean)) / torch.tensor(data.std)
    for epoch in (1, 2):
        batches = {}
        for name, loaders in (("timm", timm_loaders), ("dali", dali_loaders)):
            loaders[2].manual_seed(seed_epoch(0, epoch))
            batches[name] = [(images.clone(), targets.clone()) for images, targets in loaders[0]]
        assert len(batches["dali"]) == len(batches["timm"]) == 3
        for (a, ta), (b, tb) in zip(batches["timm"], batches["dali"], strict=True):
            assert torch.equal(ta, tb) and b.dtype == a.dtype == torch.float32 and b.shape == a.shape == (4, 3, 32, 32)
            channels = b.transpose(0, 1).flatten(1)
            assert (channels.min(1).values >= low - 1e-4).all() and (channels.max(1).values <= high + 1e-4).all()
    dali_loaders[2].manual_seed(seed_epoch(0, 2))  # epoch 2 again (a resume): the same batches
    again = [images for images, _ in dali_loaders[0]]
    assert all(torch.equal(a, b) for a, (b, _) in zip(again, batches["dali"], strict=True))
    val = {name: list(loaders[3]) for name, loaders in (("timm", timm_loaders), ("dali", dali_loaders))}
    for (a, ta), (b, tb) in zip(val["timm"], val["dali"], strict=True):
        assert torch.equal(ta, tb) and b.shape == a.shape
        assert (b - a).abs().mean() < 0.1  # the same centre crop; DALI's resize against PIL's
    probe_images = [[x.clone() for x in batch] for batch in timm_loaders[4]]
    for a, b in zip(probe_images, dali_loaders[4], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # the probe set's loader is the timm path's


def test_dali_backend_needs_dali_or_a_jpeg_folder(store, tmp_path, capsys):
    from tgo import cli

    code = cli.main(["train", "--preset", "smoke", "--data_backend", "dali"])
    assert code == 2 and "data_backend: dali reads JPEG folders" in capsys.readouterr().err
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        _jpeg_tree(tmp_path)
        code = cli.main(["train", "--preset", "smoke", "--dataset", "imagefolder", "--data_dir", str(tmp_path), "--num_classes", "0",
                         "--data_backend", "dali", "--probe_size", "6", "--batch_size", "4"])
        err = capsys.readouterr().err
        assert code == 2 and "data_backend=dali needs NVIDIA DALI" in err and "pip install nvidia-dali-cuda120" in err, err


def test_randaugment_posterize_to_zero_bits_gives_a_black_image_not_an_error():
    """tgo1's RandAugment (rand-m9-mstd0.5-inc1) posterizes to 0 bits at its top magnitude, which
    Pillow 13 refuses: a tgo1 epoch stopped within its first batches."""
    from PIL import Image

    from tgo.data import IMAGENET_MEAN, IMAGENET_STD, transforms

    train, _ = transforms(resolve("smoke", auto_augment="rand-m9-mstd0.5-inc1"), IMAGENET_MEAN, IMAGENET_STD)
    (augment,) = [t for t in train.transforms if hasattr(t, "ops")]
    (op,) = [op for op in augment.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the top level, always applied
    photo = Image.new("RGB", (8, 6), (200, 120, 40))
    assert op(photo).getextrema() == ((0, 0), (0, 0), (0, 0))
    op.magnitude = 9  # 1 bit kept: Pillow's posterize
    assert op(photo).getpixel((0, 0)) == (128, 0, 0)
