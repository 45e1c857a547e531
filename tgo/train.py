"""The training engine: a timm ViT, timm's optimiser, scheduler and mixup, and the geometry probe
at epoch 0 (before any update) and after every probed epoch, all tracked in MLflow.

    from tgo.train import run
    result = run(preset="smoke", epochs=3)          # or run(cfg) with a TrainConfig
    result.run_id, result.metrics["geom/final/cls/effective_rank"]

Steps: epoch 0 is the network at initialisation (val metrics and geometry, no training);
epoch e >= 1 is the network after e passes over the training set. Every metric has step = epoch.

Determinism and resume: every epoch re-seeds torch, numpy and random from (seed, epoch), and the
shuffling generator too, so an epoch depends only on the weights and optimiser state it starts
from. The checkpoint written after each epoch (checkpoints/last.pt) holds those, so a run killed
at any point and resumed with resume=<run_id> continues in the same MLflow run, at the next epoch
(a run killed before its first checkpoint starts again from its initialisation, with its own
config: an epoch's metrics are logged after its checkpoint, so it has logged none), and ends with
the metrics an uninterrupted run would have (on the CPU; GPU kernels may not be bitwise
deterministic).

Distributed: under `torchrun`, each rank trains on its DistributedSampler shard (DDP), validation
and the probe run on disjoint shards whose sums are all-reduced, and only rank 0 talks to MLflow.

Beside the engine: tgo.runtime (processes, devices, precision, seeds) and tgo.recording (what goes
into the MLflow run: its start, each epoch's record and the progress line, its close after an error).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Sized
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from tqdm.auto import tqdm

from tgo import tracking
from tgo.alarms import Alarms, EpochAlarms
from tgo.config import TrainConfig, from_dict, from_overrides
from tgo.data import ClassFolder, Datasets, SeededItems, SeededOrder, build_datasets, transforms, with_transform
from tgo.errors import ArtifactError, ConfigError, TrainingError
from tgo.keys import HEAD_VIEW, Tag
from tgo.measure import measure
from tgo.model import create_model
from tgo.probe import ProbeResult, head_view, site_names
from tgo.probeset import ProbeSet, dataset_size
from tgo.recording import EpochCommitter, cpu_copy, dataset_inputs, record_failure, record_start, record_stop
from tgo.runtime import Dist, amp_dtype, autocast, init_distributed, rank0_flag, resolve_device, rng_state, seed_epoch, use_device
from tgo.weights import WeightSpectra

if TYPE_CHECKING:  # timm is imported where it is used
    from timm.data import Mixup
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.data.loader import PrefetchLoader
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3
    from torch.utils.data.distributed import DistributedSampler

    from tgo.dali import DaliLoader

    # A loader of (images, targets) batches: torch's DataLoader, timm's PrefetchLoader around one, or DALI's.
    Loader: TypeAlias = DataLoader | PrefetchLoader | DaliLoader

log = logging.getLogger(__name__)

# Settings that a resumed run may change; any other difference from the run's own config is an error.
RESUMABLE_CHANGES = (
    "epochs",
    "device",
    "workers",
    "resume",
    "compile",
    "amp",
    "system_metrics",
    "run_name",
    "experiment",
    "checkpoint_epochs",
    "alarms",
    "alarm_action",
)


@dataclass
class TrainResult:
    """What `run` returns: the MLflow run, and the last epoch's metrics (including geometry)."""

    run_id: str
    epoch: int
    metrics: dict[str, float]
    config: TrainConfig
    history: dict[int, dict[str, float]] = field(default_factory=dict)  # the epochs run by this call
    head: tuple[str, str] = HEAD_VIEW  # the (site, view) that feeds the model's head (tgo.probe.head_view)
    stopped_by: str = ""  # the alarm(s) whose action stop ended the run at `epoch` (the tag tgo.stopped_by), or ""
    alarms: list[dict] = field(default_factory=list)  # each alarm's first firing (the tag tgo.alarm)


# --------------------------------------------------------------------------------------------------
# set-up: everything an epoch needs, built before the run is touched (bad input loses nothing)
# --------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What `build` makes from a config: the data, the model and its optimisation, the loaders."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    amp: torch.dtype | None  # autocast dtype, None for full precision
    channels_last: bool
    data: Datasets
    model: torch.nn.Module  # the bare model: evaluated, probed and checkpointed
    train_model: torch.nn.Module  # what trains: the model, wrapped by DDP and torch.compile if asked
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler  # a timm scheduler, stepped once per epoch or, with sched_on_updates, after every update
    scaler: torch.amp.GradScaler
    mixup: Mixup | None  # timm's Mixup, or None
    loss_fn: torch.nn.Module
    train_loader: Loader
    sampler: (
        RepeatAugSampler | DistributedSampler | None
    )  # RepeatAugSampler (repeated_aug > 1) or DistributedSampler (torchrun); None: the loader shuffles
    generator: torch.Generator  # the shuffling generator, re-seeded every epoch
    val_loader: Loader
    probe_set: ProbeSet | None
    probe_loader: DataLoader | None
    ema: ModelEmaV3 | None = None  # timm's ModelEmaV3 (model_ema), or None
    previous_features: dict | None = None  # the probe features of the last kept epoch (feature_epochs)
    start_epoch: int = 0  # 0 for a new run; the epoch after the checkpoint's when resuming
    alarms: Alarms = field(default_factory=lambda: Alarms([]))  # the run's alarm rules and what they have seen

    @property
    def probed(self) -> torch.nn.Module:
        """The weights the probe measures and weights_epoch_XXXX.pt keeps (probe_weights)."""
        if self.cfg.probe_weights == "ema":
            assert self.ema is not None, "probe_weights=ema needs model_ema (the config checks it)"
            return self.ema.module
        return self.model


def build(cfg: TrainConfig, d: Dist | None = None, ckpt: dict | None = None) -> Setup:
    """Everything an epoch needs for `cfg`, made before the run is touched, so that bad input loses
    nothing: datasets and probe set, the model and its optimisation, mixup and loss, and the loaders.

    Args:
        cfg: the run's config.
        d: this process among the training processes (one process by default).
        ckpt: a checkpoint to resume from: its weights and optimiser state are restored, and the
            run starts at the epoch after its own.
    """
    d = d or Dist()
    device = resolve_device(cfg.device, d.local_rank)
    use_device(device)
    data = build_datasets(cfg)
    probe_set = _probe_set(cfg, data)
    model, channels_last = _model(cfg, data.num_classes, device)
    amp = amp_dtype(cfg, device)
    mixup, loss_fn = _loss(cfg, data.num_classes)
    # The last short training batch is dropped under mixup (timm's Mixup asks for an even batch)
    # and under torchrun. The loaders come before the schedule, which may count their batches.
    train_loader, sampler, generator, val_loader, probe_loader = _loaders(
        cfg, d, data, probe_set, device, drop_last=d.enabled or mixup is not None
    )
    optimizer, scheduler, scaler, ema = _optimisation(cfg, model, device, amp, updates_per_epoch=len(train_loader))
    start_epoch = _restore(ckpt, cfg, model, ema, optimizer, scheduler, scaler, len(train_loader)) if ckpt is not None else 0
    train_model = _train_model(cfg, d, model, device)
    alarms = _alarms(cfg, model, ckpt)
    return Setup(
        cfg,
        d,
        device,
        amp,
        channels_last,
        data,
        model,
        train_model,
        optimizer,
        scheduler,
        scaler,
        mixup,
        loss_fn,
        train_loader,
        sampler,
        generator,
        val_loader,
        probe_set,
        probe_loader,
        ema=ema,
        start_epoch=start_epoch,
        alarms=alarms,
    )


def _alarms(cfg: TrainConfig, model: torch.nn.Module, ckpt: dict | None) -> Alarms:
    """The run's alarm rules (cfg.alarms, parsed when the config was made), their sites held to the
    model's own, and what a resumed run's rules had seen (its checkpoint)."""
    alarms = Alarms.for_sites(cfg.alarms, cfg.alarm_action, site_names(model), head_view(model))
    return alarms.load_state(ckpt.get("alarms") if ckpt is not None else None)


def _probe_set(cfg: TrainConfig, data: Datasets) -> ProbeSet | None:
    """The fixed probe images of the run (cfg.probe_size of the validation set), or None when the
    run is not probed (probe_every=0).

    Raises:
        ConfigError: a probe larger than the validation set.
    """
    if not cfg.probe_every:
        return None
    try:
        return ProbeSet.from_dataset(data.val, cfg.probe_size, seed=cfg.probe_seed, folds=cfg.probe_folds)
    except ValueError as err:  # a probe larger than the validation set
        raise ConfigError(str(err)) from None


def _model(cfg: TrainConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The ViT at its initial weights on `device`, and whether it runs channels-last (asked for, and
    on a GPU)."""
    seed_epoch(cfg.seed, 0)  # the initial weights depend on the seed alone
    model = create_model(cfg, num_classes).to(device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, channels_last


# torch's optimisers, by timm's name, that have a fused CUDA implementation (all parameters' updates
# in a few kernels). On CUDA the others already default to their foreach (multi-tensor) form.
FUSED_OPTIMIZERS = ("adam", "adamw")


def optimizer_kwargs(opt: str, device: torch.device) -> dict[str, Any]:
    """What timm's create_optimizer_v2 passes on to the optimiser for `opt` on `device`: fused=True
    for torch's Adam and AdamW on CUDA (a few kernels per step instead of several per parameter, and
    the GradScaler's inf check without a host read); nothing elsewhere, so that the CPU keeps
    torch's default implementation and its results."""
    name = opt.lower().split("_")[-1]  # timm's reading: lookahead_adamw is AdamW inside Lookahead
    return {"fused": True} if device.type == "cuda" and name in FUSED_OPTIMIZERS else {}


def _optimisation(
    cfg: TrainConfig, model: torch.nn.Module, device: torch.device, amp: torch.dtype | None, updates_per_epoch: int
) -> tuple[torch.optim.Optimizer, Scheduler, torch.amp.GradScaler, ModelEmaV3 | None]:
    """timm's optimiser and scheduler for `model`, the gradient scaler, and the weight average.

    Args:
        cfg: the run's config (opt, lr, weight decay, schedule, model_ema).
        model: the bare model.
        device: where it trains (the scaler's device type, the optimiser's implementation).
        amp: the autocast dtype; the scaler scales the loss for float16 only.
        updates_per_epoch: optimiser updates in an epoch (the training loader's batches), the unit
            of the schedule with sched_on_updates.

    Returns:
        (optimizer, scheduler, scaler, ema): ema is timm's ModelEmaV3 with model_ema, else None.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay, **optimizer_kwargs(cfg.opt, device)
    )
    # Per epoch (DeiT's; timm's default): the lr changes between epochs, so the first one runs at
    # warmup_lr throughout. With sched_on_updates, timm plans the same schedule in updates and
    # train_one_epoch steps it after every update (step_update).
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=max(cfg.epochs, 1),
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=not cfg.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)  # loss scaling for fp16 only
    ema: ModelEmaV3 | None = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)  # a copy of the weights, averaged after every step
    return optimizer, scheduler, scaler, ema


def _loss(cfg: TrainConfig, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """timm's Mixup (with mixup or cutmix, else None) and the training loss that fits it: soft-target
    cross-entropy under mixup, label smoothing's, or plain cross-entropy."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()  # mixup makes soft targets, smoothing included
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _restore(
    ckpt: dict,
    cfg: TrainConfig,
    model: torch.nn.Module,
    ema: ModelEmaV3 | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    scaler: torch.amp.GradScaler,
    updates_per_epoch: int,
) -> int:
    """Load a checkpoint's weights (and weight average), optimiser, scaler and schedule in place
    (`updates_per_epoch`: the schedule's unit with sched_on_updates).

    Returns:
        The epoch to start at: the one after the checkpoint's.
    """
    model.load_state_dict(ckpt["model"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    start_epoch = int(ckpt["epoch"]) + 1
    if int(ckpt["config"]["epochs"]) == cfg.epochs or cfg.sched == "plateau":
        scheduler.load_state_dict(ckpt["scheduler"])  # a plain resume: exactly where it stopped
    elif start_epoch > 1:
        # Extended (resume with more epochs): the schedule is planned anew over cfg.epochs, so
        # from here on the lr is what a cfg.epochs-long run has at each epoch (README). The
        # saved schedule would have kept its old length, leaving the new epochs at min_lr.
        if cfg.sched_on_updates:
            scheduler.step_update((start_epoch - 1) * updates_per_epoch)  # the updates made so far
        else:
            scheduler.step(start_epoch - 1)
    return start_epoch


def _train_model(cfg: TrainConfig, d: Dist, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What trains: `model`, wrapped by DDP under torchrun and by torch.compile if asked (the bare
    model is what is evaluated, probed and checkpointed)."""
    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # torch.compile of a Module is an OptimizedModule, a Module (its stubs say only Callable)
        train_model = cast(torch.nn.Module, torch.compile(train_model))
    return train_model


def _train_sampler(cfg: TrainConfig, d: Dist, train: Dataset) -> RepeatAugSampler | DistributedSampler | None:
    """The order of the training images: DeiT's repeated augmentation (repeated_aug > 1), a
    DistributedSampler shard under torchrun, or None for the loader's own shuffle by the run's
    generator."""
    if cfg.repeated_aug > 1:
        from timm.data.distributed_sampler import RepeatAugSampler

        # DeiT's repeated augmentation: each image num_repeats times per epoch, the copies on
        # different ranks (so differently augmented); an epoch keeps len(train) images, rounded
        # down to a multiple of 256 as DeiT does where the set is large enough.
        return RepeatAugSampler(
            train,
            num_replicas=d.world,
            rank=d.rank,
            shuffle=True,
            num_repeats=cfg.repeated_aug,
            selected_round=256 if dataset_size(train) >= 256 * d.world else 0,
        )
    if d.enabled:
        from torch.utils.data.distributed import DistributedSampler

        return DistributedSampler(train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    return None


def _check_batches(cfg: TrainConfig, data: Datasets, batches: int) -> None:
    """Raise ConfigError when an epoch of this process would hold no training batch."""
    if batches == 0:
        raise ConfigError(f"batch_size: {cfg.batch_size} exceeds the {dataset_size(data.train)} training images per process; lower it.")


def _loaders(
    cfg: TrainConfig,
    d: Dist,
    data: Datasets,
    probe_set: ProbeSet | None,
    device: torch.device,
    drop_last: bool,
    on_device: bool | None = None,
) -> tuple[Loader, RepeatAugSampler | DistributedSampler | None, torch.Generator, Loader, DataLoader | None]:
    """The training, validation and probe loaders of this process.

    The loaders are timm's parts rather than `timm.data.create_loader`, which does not fit tgo's
    run: it makes its own samplers (a DistributedSampler seeded 0 without dropping, no
    RepeatAugSampler outside torchrun, no DeiT rounding), takes no shuffling generator (tgo re-seeds
    it every epoch, `run_epoch`), always drops the last training batch, and pads validation shards
    with repeated images (tgo sums disjoint shards). Its pieces are used as it uses them: the
    transforms stopping at uint8 (`use_prefetcher`), `fast_collate`, and `PrefetchLoader`, which
    moves each batch to the GPU on a side stream one batch ahead and normalises and erases it there.
    Workers stay alive between epochs (`persistent_workers`), each prefetching two batches (the
    DataLoader's default), their augmentations seeded per image (`tgo.data.SeededItems`).

    Args:
        cfg: the run's config (batch sizes, workers, repeated_aug, reprob).
        d: this process; validation and the probe run on disjoint shards of the ranks.
        data: the datasets.
        probe_set: the probe images, or None.
        device: where the batches go (pinned memory for a GPU).
        drop_last: drop the last short training batch.
        on_device: normalise and erase on the device (timm's prefetcher); None: on a GPU. The CPU
            normalises in the transform as before (the same cores would do the work either way).

    Returns:
        (train_loader, sampler, generator, val_loader, probe_loader): the training sampler (None:
        shuffled by the loader) and the generator that shuffles, re-seeded every epoch.

    Raises:
        ConfigError: a batch larger than this process's share of the training set.
    """
    from timm.data.loader import PrefetchLoader, fast_collate

    on_device = device.type == "cuda" if on_device is None else on_device
    pin = device.type == "cuda"
    generator = torch.Generator()
    sampler = _train_sampler(cfg, d, data.train)
    val_shard = list(range(d.rank, dataset_size(data.val), d.world))  # disjoint shards, sums all-reduced
    # The probe set's loader stays deterministic and normalised in its transform (tgo.probeset),
    # whatever the backend.
    probe_loader = probe_set.loader(cfg.probe_batch_size, cfg.workers, pin, d.rank, d.world) if probe_set else None
    if cfg.data_backend == "dali":
        from tgo.dali import DaliLoader

        order = sampler if sampler is not None else RandomSampler(cast(Sized, data.train), generator=generator)
        train_samples, val_samples = cast(ClassFolder, data.train).samples, cast(ClassFolder, data.val).samples
        dali = partial(DaliLoader, cfg, mean=data.mean, std=data.std, device=device, generator=generator, rank=d.rank)
        dali_train = dali(train_samples, order, True, batch_size=cfg.batch_size, drop_last=drop_last)
        _check_batches(cfg, data, len(dali_train))
        dali_val = dali(val_samples, val_shard, False, batch_size=cfg.probe_batch_size, drop_last=False)
        return dali_train, sampler, generator, dali_val, probe_loader
    train_set, val_set = data.train, data.val
    if on_device:
        train_tf, eval_tf = transforms(cfg, data.mean, data.std, device_side=True)
        train_set, val_set = with_transform(data.train, train_tf), with_transform(data.val, eval_tf)
    common: dict[str, Any] = dict(
        num_workers=cfg.workers,
        pin_memory=pin,
        persistent_workers=cfg.workers > 0,
        collate_fn=fast_collate if on_device else None,  # uint8 batches
    )
    if cfg.workers == 0:
        # In this process: the augmentations draw from its generators, seeded every epoch.
        train: DataLoader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            shuffle=sampler is None,
            drop_last=drop_last,
            generator=generator,
            **common,
        )
    else:
        # The order is the sampler's (or the generator's shuffle), drawn in this process every
        # epoch; the loader's own generator only seeds the workers once (SeededItems re-seeds them
        # per image), so it is a fixed one and draws nothing from the run's generators.
        order = sampler if sampler is not None else RandomSampler(cast(Sized, train_set), generator=generator)
        train = DataLoader(
            SeededItems(train_set, d.rank),
            batch_size=cfg.batch_size,
            sampler=SeededOrder(order, generator),
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(0),
            **common,
        )
    _check_batches(cfg, data, len(train))
    val: DataLoader = DataLoader(Subset(val_set, val_shard), batch_size=cfg.probe_batch_size, **common)
    train_loader: Loader = train
    val_loader: Loader = val
    if on_device:
        train_loader = PrefetchLoader(train, mean=data.mean, std=data.std, device=device, re_prob=cfg.reprob)
        val_loader = PrefetchLoader(val, mean=data.mean, std=data.std, device=device)
    return train_loader, sampler, generator, val_loader, probe_loader


# --------------------------------------------------------------------------------------------------
# one epoch
# --------------------------------------------------------------------------------------------------


# Training steps between the host's reads of the device (the non-finite check and the progress bar).
# A read (Tensor.item, tolist, bool of a tensor) makes the host wait until the device has finished
# everything queued, so that on a GPU a read every step leaves the device idle while the host
# prepares the next step; every HOST_READ_EVERY steps the wait is spread over that many. A run with
# a non-finite loss stops at the next read: within HOST_READ_EVERY steps of it.
HOST_READ_EVERY = 50


def train_one_epoch(s: Setup, epoch: int) -> dict[str, float]:
    """One pass over the training set. Returns train/loss, train/acc1 and train/images_per_s.

    The running sums and the recent losses stay on the device; the host reads them every
    HOST_READ_EVERY steps and at the end of the epoch (a constant number of reads per window,
    whatever the step count), then stops at the first non-finite loss with the images trained
    before it. With sched_on_updates the schedule is stepped after every update.
    """
    cfg, device = s.cfg, s.device
    s.train_model.train()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x images, correct top-1
    losses = torch.zeros(HOST_READ_EVERY, dtype=torch.float64, device=device)  # the steps' losses since the last read
    sizes: list[int] = []  # those steps' batch sizes (known to the host without asking the device)
    seen = 0  # images before those steps
    updates = (epoch - 1) * len(s.train_loader)  # optimiser updates before this epoch
    start = time.perf_counter()
    bar = tqdm(s.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not s.d.main or None)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)  # (B, 3, H, W)
        targets = targets.to(device, non_blocking=True)  # (B,) class indices
        if s.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        hard = targets  # accuracy is against the hard labels, also under mixup
        if s.mixup is not None:
            images, targets = s.mixup(images, targets)  # targets become (B, classes) soft labels
        with autocast(device, s.amp):
            logits = s.train_model(images)  # (B, classes)
            loss = s.loss_fn(logits, targets)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            s.scaler.unscale_(s.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        if s.ema is not None:
            s.ema.update(s.model)
        if cfg.sched_on_updates:
            updates += 1
            s.scheduler.step_update(updates)  # the lr of the next update (timm's count, from 0 at the run's start)
        n = images.shape[0]
        loss = loss.detach()
        losses[len(sizes)] = loss
        sums[0] += loss.double() * n
        sums[1] += (logits.detach().argmax(dim=1) == hard).sum()
        sizes.append(n)
        if len(sizes) == HOST_READ_EVERY:
            _read_losses(losses, sizes, seen, epoch, bar)
            seen += sum(sizes)
            sizes.clear()
    _read_losses(losses, sizes, seen, epoch, bar)
    seen += sum(sizes)
    stats = torch.cat([sums, sums.new_full((1,), float(seen))])
    if s.d.enabled:
        dist.all_reduce(stats)  # sums over the ranks' shards
    loss_sum, correct, count = stats.tolist()
    elapsed = time.perf_counter() - start
    return {
        "train/loss": loss_sum / max(count, 1),
        "train/acc1": 100.0 * correct / max(count, 1),
        "train/images_per_s": count / elapsed,
    }


def _read_losses(losses: torch.Tensor, sizes: list[int], seen: int, epoch: int, bar: tqdm) -> None:
    """The host's one read of the last len(sizes) steps' losses: the first non-finite one stops the
    run (the message counts the images trained before its step); else the bar shows the last loss.

    Raises:
        TrainingError: a non-finite loss.
    """
    if not sizes:
        return
    values = losses[: len(sizes)].tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite training loss ({value}) at epoch {epoch}, after {seen + sum(sizes[:i])} images. The run "
                "stops here; its last good checkpoint (checkpoints/last.pt, the previous epoch) is "
                "kept. Lower lr, enable grad_clip, or use amp=off."
            )
    bar.set_postfix(loss=f"{values[-1]:.3f}")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Loader,
    device: torch.device,
    amp: torch.dtype | None,
    d: Dist,
    num_classes: int,
    channels_last: bool = False,
) -> dict[str, float]:
    """val/loss (cross-entropy on hard labels), val/acc1 and val/acc5 (top-min(5, classes)), in %."""
    model.eval()
    k = min(5, num_classes)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, count
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        stats[0] += F.cross_entropy(logits, targets, reduction="sum")
        stats[1] += (top[:, 0] == targets).sum()
        stats[2] += (top == targets[:, None]).any(dim=1).sum()
        stats[3] += targets.numel()
    if d.enabled:
        dist.all_reduce(stats)
    n = max(stats[3].item(), 1)
    return {"val/loss": stats[0].item() / n, "val/acc1": 100 * stats[1].item() / n, "val/acc5": 100 * stats[2].item() / n}


def _validate(s: Setup) -> dict[str, float]:
    """val/* of the trained weights; with model_ema, val_ema/* of their average too."""
    out = evaluate(s.model, s.val_loader, s.device, s.amp, s.d, s.data.num_classes, s.channels_last)
    if s.ema is not None:
        ema = evaluate(s.ema.module, s.val_loader, s.device, s.amp, s.d, s.data.num_classes, s.channels_last)
        out.update({k.replace("val/", "val_ema/", 1): v for k, v in ema.items()})
    return out


def run_epoch(s: Setup, epoch: int) -> tuple[dict[str, float], ProbeResult | None, WeightSpectra | None, EpochAlarms | None]:
    """Epoch 0 measures the network at initialisation; epoch e >= 1 trains one pass first. Then
    validation, and the probe when it is due (every probe_every epochs, and the last), with the
    alarm rules tested on its geometry. Returns the epoch's metrics (geometry and its standard
    errors, token interaction, alarm/<name> and, with weight_spectra, the weight spectra included),
    the probe's result, the weight spectra and what the alarms found (None when not probed)."""
    cfg = s.cfg
    metrics: dict[str, float] = {"lr": s.optimizer.param_groups[0]["lr"]}
    if epoch > 0:
        seed = seed_epoch(cfg.seed, epoch)  # an epoch depends only on the state it starts from
        s.generator.manual_seed(seed)
        if s.sampler is not None:
            # DistributedSampler mixes in the run's seed itself; timm's RepeatAugSampler shuffles by
            # the epoch alone, so the epoch's seed is given instead (seeds of a sweep see different orders).
            s.sampler.set_epoch(epoch if cfg.repeated_aug <= 1 else seed)
        t0 = time.perf_counter()
        metrics.update(train_one_epoch(s, epoch))
        metrics.update(_validate(s))
        s.scheduler.step(epoch, metrics["val/acc1"])  # sets the lr of the next epoch (a no-op when stepped per update)
        metrics["time/epoch_s"] = time.perf_counter() - t0
    else:
        metrics.update(_validate(s))
    due = s.probe_loader is not None and (epoch % cfg.probe_every == 0 or epoch == cfg.epochs)
    m = measure(
        s.probed,
        s.probe_loader if due else None,
        cfg,
        s.device,
        epoch=epoch,
        distributed=s.d.enabled,
        main=s.d.main,
        progress=s.d.main and None,
        previous_features=s.previous_features,
        alarms=s.alarms,
    )
    metrics.update(m.metrics)
    geometry, weights = m.geometry, m.weights
    if geometry is not None and geometry.features:
        s.previous_features = geometry.features
    return metrics, geometry, weights, m.alarms


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _resume_config(cfg: TrainConfig, given: set[str], saved: dict) -> TrainConfig:
    """The resumed run's own config, with the settings of RESUMABLE_CHANGES that were given
    (`given`: the names set explicitly) taken from cfg. Any other given setting that differs from
    the run's own is an error: a resumed run continues with what it started with."""
    base = from_dict(saved)
    conflicts = [
        f"{k} (run: {getattr(base, k)!r}, given: {getattr(cfg, k)!r})"
        for k in sorted(given)
        if k not in RESUMABLE_CHANGES and k != "preset" and getattr(cfg, k) != getattr(base, k)
    ]
    if conflicts:
        raise ConfigError(
            "resume continues a run with its own settings; these differ from it: "
            + "; ".join(conflicts)
            + f". Only {', '.join(RESUMABLE_CHANGES)} may change on resume."
        )
    return replace(base, **{k: getattr(cfg, k) for k in RESUMABLE_CHANGES if k in given})


def _fetch_resume(cfg: TrainConfig, given: set[str], d: Dist, tmp: str) -> tuple[TrainConfig, dict | None]:
    """The config and checkpoint of the run to resume, read by rank 0 (under torchrun every rank gets
    them). The checkpoint is None for a run stopped before its first one: it starts again from its
    initialisation with its own config (config/config.json). Nothing is written here: the run's
    lease is taken once everything is built (`_run`), so that a refusal or a failed build leaves
    the run as it was."""
    box: list = [None, None]  # the checkpoint, the run's own config
    if d.main:
        run = tracking.get_run(cfg.resume)
        _check_resumable(run)
        ckpt = _resume_checkpoint(run, tmp)
        box = [ckpt, ckpt["config"] if ckpt is not None else _config_to_restart(run, tmp)]
        if ckpt is not None and tracking.is_finished(run) and ckpt["epoch"] >= cfg.epochs:
            log.warning("run %s already finished %d epochs; pass epochs > %d to extend it.", cfg.resume, ckpt["epoch"], ckpt["epoch"])
    if d.enabled:
        dist.broadcast_object_list(box, src=0)
    ckpt, saved = box
    return _resume_config(cfg, given, saved), ckpt


LAST_CHECKPOINT = "checkpoints/last.pt"
CHECKPOINT_FORMAT = "tgo-checkpoint-1"  # a resumable checkpoint's "format" (`_checkpoint`)


def _check_resumable(run) -> None:
    """Refuse, before anything is read or written, a run that resume cannot continue: one in MLflow's
    trash, one of another kind (an analysis, a comparison, a sweep's or study's parent), one tgo did
    not make, or one another live process trains. A training run is tagged tgo.kind=train; one
    killed before its tags were written has tgo's lease tag alone."""
    run_id, tags = run.info.run_id, run.data.tags
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(
            f"resume: run {run_id} is deleted (in MLflow's trash). Nothing was changed; restore it first "
            f"(`mlflow runs restore --run-id {run_id}`) to resume it, or start a new run."
        )
    kind = tags.get(Tag.KIND, "")
    if kind == "train" or (not kind and Tag.LEASE in tags):
        tracking.refuse_if_trained(run)
        return
    if kind == "analysis":
        what = f"an analysis run (of training run {tags.get(Tag.ANALYZED_RUN, '?')}), not a training run"
    elif kind:
        what = f"a {kind} run (tgo.kind={kind}), not a training run" + (
            f"; to continue the {kind}, run its command again (it resumes its own runs)" if kind in ("sweep", "study") else ""
        )
    elif Tag.RESUMES in tags:
        what = f"the launcher run of an `mlflow run` that resumed run {tags[Tag.RESUMES]}; resume that run instead"
    else:
        what = "not a run tgo trained (it has no tgo.kind tag)"
    raise ConfigError(f"resume: run {run_id} is {what}. Nothing was changed; resume takes the id of a tgo training run (tgo.kind=train).")


def _unusable(run, message: str) -> ConfigError:
    """The error for a training run that cannot be resumed: the run is marked FAILED with `message`
    if it still reads RUNNING (its process was killed, `_check_resumable` saw no live one), so that
    its state says the same."""
    tracking.close_failed(run.info.run_id, message)
    marked = " It is marked FAILED." if run.info.status == "RUNNING" else ""
    return ConfigError(message + marked)


def _resume_checkpoint(run, tmp: str) -> dict | None:
    """The run's resumable checkpoint, or None where it has none (stopped before its first).

    Raises:
        ConfigError: a damaged checkpoint, or one that is not tgo's (never unpickled); the run is
            marked FAILED if it still reads RUNNING.
    """
    run_id = run.info.run_id
    if LAST_CHECKPOINT not in tracking.artifact_names(run_id, LAST_CHECKPOINT.rpartition("/")[0]):
        return None  # hidden .last.pt.*.partial files of a write cut short are not a checkpoint
    try:
        ckpt = tracking.load_checkpoint(tracking.download(run_id, LAST_CHECKPOINT, tmp), f"{LAST_CHECKPOINT} of run {run_id}")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ArtifactError(f"{LAST_CHECKPOINT} of run {run_id} is not a tgo checkpoint (it has no format {CHECKPOINT_FORMAT!r}).")
    except ArtifactError as err:
        raise _unusable(
            run,
            f"resume: {err} Run {run_id} cannot be continued from it; its recorded epochs (metrics, spectra, kept "
            "weights) are safe. Train its settings again as a new run (its config is config/config.json).",
        ) from None
    return ckpt


def _config_to_restart(run, tmp: str) -> dict:
    """The own config of a run stopped before its first checkpoint, which starts again from its
    initialisation. Refused (ConfigError, the run marked FAILED if it reads RUNNING) where that
    would log a step twice (it has metrics without a checkpoint) or it recorded no config.

    The first checkpoint is written before any metric (recording.EpochCommitter), so a run without
    one has logged none; what it did write (params, spectra, kept weights of epoch 0) is written
    again with the same values."""
    run_id = run.info.run_id
    logged = tracking.logged_steps(run_id, "val/loss")
    if logged:
        raise _unusable(
            run,
            f"resume: run {run_id} has metrics up to epoch {max(logged)} but no {LAST_CHECKPOINT} (removed?), so it "
            "cannot be continued, and starting it again would log those epochs twice. Its recorded epochs are "
            "safe; train its settings again as a new run.",
        )
    try:
        return json.loads(tracking.download(run_id, "/".join(tracking.config_artifact()), tmp).read_text())
    except (tracking.TrackingError, ValueError):
        raise _unusable(
            run,
            f"resume: run {run_id} stopped before it recorded its settings (it has no {'/'.join(tracking.config_artifact())} "
            "and no checkpoint), so there is nothing to resume; start a new run.",
        ) from None


def _checkpoint(s: Setup, epoch: int, metrics: dict, run_id: str) -> dict:
    return {
        "format": "tgo-checkpoint-1",
        "epoch": epoch,
        "run_id": run_id,
        "config": s.cfg.to_dict(),
        "model": s.model.state_dict(),
        **({"ema": s.ema.module.state_dict()} if s.ema is not None else {}),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "scaler": s.scaler.state_dict(),
        "rng": rng_state(),
        "alarms": s.alarms.state(),  # a resumed run's alarms go on from what they had seen
        "metrics": metrics,
    }


class StopTraining(Exception):
    """Raised by an epoch callback to end a run early (an Optuna pruner, for one). The run is
    closed as KILLED with the tag tgo.stopped_early, its epochs so far intact."""


def run(cfg: TrainConfig | None = None, *, parent_run_id: str = "", epoch_callback=None, on_start=None, **overrides) -> TrainResult:
    """Train a ViT with per-epoch geometry, tracked in MLflow; return the run id and metrics.

    `cfg` is a TrainConfig, or None to build one from `overrides` (preset="demo" by default,
    values as Python objects or strings). See tgo.config.TrainConfig for every setting.
    parent_run_id makes the run a child of that run (sweeps and studies); epoch_callback(epoch,
    metrics) is called after each epoch is recorded and may raise StopTraining; on_start(run_id) as
    soon as the MLflow run exists (a sweep or study records it in its trial before any work, so that
    the run of a worker that dies can be found and marked FAILED).
    """
    if cfg is None:
        cfg, given = from_overrides(overrides)
    elif overrides:
        cfg, given = from_overrides({**cfg.to_dict(), **overrides})
    else:
        given = set(cfg.to_dict())  # a TrainConfig is checked when it is made: every field is given
    d = init_distributed(cfg.device.lower())
    try:
        return _run(cfg, given, d, parent_run_id, epoch_callback, on_start)
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, given: set[str], d: Dist, parent_run_id: str = "", epoch_callback=None, on_start=None) -> TrainResult:
    if d.main:
        tracking.check_tracking()
    # The working folder (downloads, each epoch's files before they are logged) goes however the
    # run ends, a refused resume or a failed build included.
    with tempfile.TemporaryDirectory(prefix="tgo-") as tmp:
        return _train(cfg, given, d, tmp, parent_run_id, epoch_callback, on_start)


def _train(cfg: TrainConfig, given: set[str], d: Dist, tmp: str, parent_run_id: str, epoch_callback, on_start) -> TrainResult:
    ckpt = None
    if cfg.resume:
        cfg, ckpt = _fetch_resume(cfg, given, d, tmp)
    s = build(cfg, d, ckpt)  # data, model, optimisation: all before the run is touched
    if ckpt is not None and d.main:
        s.previous_features = _kept_features_before(cfg, s.start_epoch, tmp)  # for similarity/<site>/cka_previous

    # ---- the MLflow run (rank 0 only) ----
    run_id, lease = "", None
    if d.main:
        if cfg.resume:
            tracking.claim(tracking.get_run(cfg.resume))  # refused while another live process trains it
        try:
            run_id = tracking.start_run(
                cfg.experiment, cfg.run_name or run_name(cfg), cfg.resume, cfg.system_metrics, parent_run_id
            ).info.run_id
        except BaseException:
            if cfg.resume:
                tracking.release(cfg.resume)  # the claim belongs to a process that trains the run
            raise
        lease = tracking.Lease(run_id).start()  # tells a resume elsewhere that this run is alive
        if on_start is not None:
            on_start(run_id)
    # On a GPU each epoch's record is written by a background thread while the next epoch trains; on
    # the CPU in line, as the two would share the same cores (a background write cost the demo's
    # 8-second epochs about 1 s, an in-line one 0.4 s).
    committer = EpochCommitter(run_id, tmp, background=s.device.type != "cpu")
    try:
        if d.main:  # the run's config, tags, probe set and datasets, and the line that says what starts
            probe_record = s.probe_set.record() if s.probe_set is not None else None
            record_start(
                run_id,
                cfg,
                num_classes=s.data.num_classes,
                notes=s.data.notes,
                world=d.world,
                head=head_view(s.model),
                probe_record=probe_record,
                datasets=dataset_inputs(cfg, s.data.train, s.data.val, s.data.num_classes, probe_record),
                device=s.device,
                ckpt=ckpt,
                start_epoch=s.start_epoch,
            )
        history: dict[int, dict[str, float]] = {}
        last_metrics = dict(ckpt["metrics"]) if ckpt is not None else {}
        keep = cfg.checkpoint_epoch_set()
        stopped_by, last_epoch = "", cfg.epochs
        for epoch in range(s.start_epoch, cfg.epochs + 1):
            metrics, geometry, spectra_of_weights, found = run_epoch(s, epoch)
            if d.main:
                checkpoint = _checkpoint(s, epoch, metrics, run_id)
                if committer.background:
                    checkpoint = cpu_copy(checkpoint)  # training goes on while the snapshot is written
                weights = checkpoint["ema" if cfg.probe_weights == "ema" else "model"]  # the weights the probe measured
                committer.submit(
                    epoch,
                    cfg.epochs,
                    checkpoint,
                    weights if epoch in keep else None,
                    geometry,
                    dict(metrics),
                    spectra_of_weights,
                    alarms=(found, s.alarms.summary()) if found is not None else None,
                )
                if geometry is not None and epoch == s.start_epoch and geometry.degenerate():
                    tracking.set_tags(run_id, {Tag.DEGENERATE_VIEWS: ",".join(geometry.degenerate())})
            history[epoch] = last_metrics = metrics
            if epoch_callback is not None:
                if d.main:
                    committer.wait()  # the callback may read the run: its epoch is recorded first
                epoch_callback(epoch, metrics)
            # An alarm with action stop fired: the run ends here, its epoch recorded. Rank 0 tests the
            # rules and tells every rank, so that all leave the loop together.
            if rank0_flag(found is not None and found.stop, d.enabled and s.alarms.action == "stop"):
                stopped_by, last_epoch = ",".join(f.alarm for f in found.fired) if found is not None else "alarm", epoch
                break
        if d.main:
            committer.wait()
            if stopped_by:
                record_stop(run_id, found, cfg.epochs)
            tracking.end_run("FINISHED")
        return TrainResult(run_id, last_epoch, last_metrics, cfg, history, head_view(s.model), stopped_by, s.alarms.summary())
    except BaseException as err:
        if d.main:
            store_lost = record_failure(err, run_id, committer, stopped=isinstance(err, StopTraining))
            if store_lost is not None:  # one message instead of MLflow's chain of tracebacks
                raise TrainingError(store_lost) from None
        raise
    finally:
        if lease is not None:
            lease.stop()


def run_name(cfg: TrainConfig) -> str:
    """A name that says what the run is and tells it from its siblings: <preset>-<dataset>-seed<N>-<4
    hex>. (MLflow's generated names come from Python's `random`, which tgo seeds before the run
    opens: every run of one seed would get the same name.)"""
    return f"{cfg.preset}-{cfg.dataset}-seed{cfg.seed}-{uuid.uuid4().hex[:4]}"


def _kept_features_before(cfg: TrainConfig, epoch: int, tmp: str) -> dict | None:
    """A resumed run's probe features of its last kept epoch before `epoch`, or None."""
    earlier = sorted(e for e in cfg.feature_epoch_set() if e < epoch)
    if not earlier:
        return None
    try:
        return ProbeResult.load_features(tracking.download(cfg.resume, "/".join(tracking.features_artifact(earlier[-1])), tmp))
    except tracking.TrackingError:  # a run started before tgo kept features
        return None
