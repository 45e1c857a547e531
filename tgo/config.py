"""One typed training config, its presets, and validation with messages that name the parameter.

`resolve(preset, **overrides)` is the only way in: it starts from a preset, applies overrides given
as Python values or as the strings MLflow and the command line pass (an empty string means "the
preset's value"), checks every key, type and range, and returns a frozen `TrainConfig`.

Presets
  demo   the embedded default: ViT-S/16 on scikit-learn's handwritten digits, upsampled to 32 px,
         3 channels; minutes on a 2-core CPU.
  smoke  seconds on a CPU, for tests: a 2-block ViT-Tiny (width 192, 8 px patches) on a small
         synthetic dataset.
  tgo1   the TGO-I setting: ViT-S/16 at 224 px on ImageNet-100, DeiT recipe (Touvron et al. 2021):
         AdamW, lr 5e-4 x batch/512, weight decay 0.05, cosine schedule, 5 warm-up epochs, label
         smoothing 0.1, mixup 0.8, cutmix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing
         0.25, drop path 0.1, batch 256; probe of 1000 validation images. The study does not give
         its epoch count: 300 epochs, DeiT's schedule, is the common practice for ViT-S/16 on
         ImageNet-100 and is used here (README, "Reproducing TGO-I").
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from tgo import alarms as alarm_rules
from tgo.errors import ConfigError

Preset = Literal["demo", "smoke", "tgo1"]
Dataset = Literal["digits", "synthetic", "imagefolder", "imagenet100", "cifar10", "cifar100"]
AmpMode = Literal["auto", "bf16", "fp16", "off"]
Schedule = Literal["cosine", "step", "plateau", "poly", "tanh", "multistep"]
ProbePrecision = Literal["float64", "float32"]
ProbeWeights = Literal["model", "ema"]
DataBackend = Literal["timm", "dali"]
AlarmAction = Literal["warn", "stop"]
DATASETS, AMP_MODES, SCHEDULES = get_args(Dataset), get_args(AmpMode), get_args(Schedule)
DEVICES_HELP = "auto, cpu, cuda, cuda:N or mps"
DATASET_DEPENDENT = ("num_classes",)  # preset values that describe the preset's dataset, dropped for another one


def _field(default: Any, help: str) -> Any:
    """A TrainConfig field with its one-line help (`tgo train --help`, MLproject's comments)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. Field names are the MLflow parameter names; each field's help
    is its metadata (HELP)."""

    preset: Preset = _field(
        "demo", f"starting point: {', '.join(get_args(Preset))} (demo: digits on a CPU; smoke: seconds, for tests; tgo1: the TGO-I study)"
    )
    # data
    dataset: Dataset = _field("digits", f"one of {', '.join(get_args(Dataset))}")
    data_dir: str = _field("", "imagefolder/imagenet100: folder with train/ and val/ class folders; cifar: the dataset root")
    download: bool = _field(False, "cifar10/cifar100 only: let torchvision download the archive (needs internet)")
    img_size: int = _field(32, "input resolution in pixels (a multiple of the patch size)")
    synthetic_train_size: int = _field(512, "synthetic dataset: training images")
    synthetic_val_size: int = _field(128, "synthetic dataset: validation images")
    num_classes: int = _field(0, "classes of the head; 0 takes the dataset's count")
    workers: int = _field(0, "DataLoader worker processes (data_backend=dali: DALI's CPU threads)")
    data_backend: DataBackend = _field(
        "timm",
        "imagefolder/imagenet100: timm (PIL decoding and augmentation in worker processes) or dali (NVIDIA DALI: JPEG decoding "
        "and augmentation on the GPU; pip install nvidia-dali-cuda120)",
    )
    # model
    model: str = _field(
        "vit_small_patch16_224",
        "timm model of the ViT token layout, built with pretrained=False (e.g. vit_small_patch16_224, vit_small_patch14_reg4_dinov2, eva02_tiny_patch14_224)",
    )
    patch_size: int = _field(0, "patch size override; 0 keeps the model's own")
    depth: int = _field(0, "number of transformer blocks override; 0 keeps the model's own")
    drop_path: float = _field(0.0, "stochastic depth rate")
    # optimisation (timm's create_optimizer_v2 / create_scheduler_v2)
    epochs: int = _field(10, "training epochs (epoch 0, the initialisation, is probed in addition)")
    batch_size: int = _field(64, "training images per step (per process under torchrun)")
    lr: float = _field(0.0, "peak learning rate; 0 applies the scaling rule base_lr x batch_size / 512")
    base_lr: float = _field(1e-3, "learning rate at batch size 512 for the scaling rule")
    min_lr: float = _field(1e-6, "floor of the cosine schedule")
    warmup_lr: float = _field(1e-6, "learning rate at the start of the warm-up")
    weight_decay: float = _field(0.05, "AdamW weight decay")
    opt: str = _field("adamw", "timm optimiser name (create_optimizer_v2), e.g. adamw, sgd, lamb")
    sched: Schedule = _field("cosine", f"timm schedule (create_scheduler_v2): {', '.join(get_args(Schedule))}")
    warmup_epochs: int = _field(1, "linear warm-up epochs")
    sched_on_updates: bool = _field(
        False,
        "step the schedule after every optimiser update (timm's step_update) instead of once per epoch, so that the warm-up rises within the first epochs (per-epoch stepping, DeiT's, trains the whole first epoch at warmup_lr); not with sched=plateau",
    )
    grad_clip: float = _field(0.0, "gradient norm clipping; 0 is off")
    smoothing: float = _field(0.1, "label smoothing")
    mixup: float = _field(0.0, "mixup alpha; 0 is off")
    cutmix: float = _field(0.0, "cutmix alpha; 0 is off")
    auto_augment: str = _field("none", "timm RandAugment spec such as rand-m9-mstd0.5-inc1, or none")
    reprob: float = _field(0.0, "random erasing probability")
    hflip: float = _field(0.5, "horizontal flip probability")
    crop_pct: float = _field(1.0, "evaluation centre-crop ratio (0.875 for ImageNet, 1 for digits)")
    repeated_aug: int = _field(
        0,
        "repeated augmentation: each training image this many times per epoch, differently augmented (timm's RepeatAugSampler; DeiT: 3); 0 or 1: off",
    )
    model_ema: bool = _field(False, "keep an exponential moving average of the weights (timm's ModelEmaV3; DeiT: on)")
    model_ema_decay: float = _field(0.99996, "decay per step of the weight average (DeiT: 0.99996)")
    # probe
    probe_size: int = _field(256, "validation images in the fixed geometry probe set")
    probe_every: int = _field(1, "probe every N epochs (always at epoch 0 and the last); 0 switches the probe off")
    probe_batch_size: int = _field(128, "batch size of the probe and of validation")
    probe_patch_tokens: int = _field(0, "patch view: keep k random patch tokens per image; 0 keeps all")
    probe_precision: ProbePrecision = _field("float64", "float64 (default) or float32 products in the probe's accumulators")
    probe_seed: int = _field(0, "seed of the probe image selection (independent of the training seed)")
    probe_folds: int = _field(5, "folds of the jackknife that gives every observable its standard error (1: none)")
    weight_spectra: bool = _field(
        True,
        "every epoch, the singular values, stable rank, effective rank and WeightWatcher's alpha of every weight matrix (weights/...; about 10 s an epoch for ViT-S on a CPU)",
    )
    probe_weights: ProbeWeights = _field(
        "model",
        "weights the probe measures (and checkpoints/weights_epoch_XXXX.pt keeps): model, the trained weights, or ema, their average (needs model_ema)",
    )
    # alarms on the geometry while it is measured (tgo.alarms)
    alarms: str = _field(
        "default",
        "rules on the geometry, ';'-separated: [name:] <site>/<view>/<observable> (< or >) <number | c*init | c*best> [for N] "
        "(site, view: globs; head/<observable>: the view that feeds the head), each breach tested against its standard error; "
        f"default: {alarm_rules.DEFAULT_ALARMS!r}; none: no alarm",
    )
    alarm_action: AlarmAction = _field(
        "warn",
        "when an alarm fires: warn (log line, metric alarm/<name>, tag tgo.alarm) or stop (also end the run after that epoch's record, FINISHED, tagged tgo.stopped_by; a Lightning fit is asked to stop)",
    )
    # run
    seed: int = _field(0, "training seed (initialisation, shuffling, augmentation)")
    device: str = _field("auto", DEVICES_HELP)
    amp: AmpMode = _field("auto", f"mixed precision: {', '.join(get_args(AmpMode))} (auto: bf16 on a GPU that has it, off on the CPU)")
    compile: bool = _field(False, "torch.compile the training model")
    channels_last: bool = _field(True, "channels_last memory format on CUDA")
    checkpoint_epochs: str = _field("0,last", "epochs whose weights are kept as artifacts: e.g. 0,10,last, or all, or none")
    feature_epochs: str = _field(
        "auto",
        "epochs whose per-image cls and mean features of every site are kept (geometry/features/, float16) and compared (similarity/, intrinsic_dim/): auto (0, powers of 2, the last), a list such as 0,10,last, all, or none",
    )
    resume: str = _field("", "id of a run to continue in place from its last checkpoint")
    experiment: str = _field(
        "", "MLflow experiment for new runs; empty: MLflow's choice (MLFLOW_EXPERIMENT_NAME, else Default), as under `mlflow run`"
    )
    run_name: str = _field("", "MLflow run name for new runs")
    system_metrics: bool = _field(True, "log CPU, memory and GPU system metrics (needs psutil; pynvml for GPUs)")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr > 0 else self.base_lr * self.batch_size / 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def checkpoint_epoch_set(self) -> set[int]:
        """The epochs whose weights are kept, as numbers (0 is the initialisation)."""
        return _epoch_set(self.checkpoint_epochs, self.epochs)

    def feature_epoch_set(self) -> set[int]:
        """The epochs whose probe features are kept: "auto" is 0, the powers of 2 and the last
        (11 epochs of a 300-epoch run); with the probe off, none."""
        return _epoch_set(self.feature_epochs, self.epochs) if self.probe_every else set()


def _epoch_set(spec: str, epochs: int) -> set[int]:
    """ "none", "all", "auto" (0, powers of 2, the last) or "0,10,last" -> epoch numbers; ValueError else."""
    spec = spec.strip().lower()
    if spec == "none":
        return set()
    if spec == "all":
        return set(range(epochs + 1))
    if spec == "auto":
        return {0, epochs} | {2**k for k in range(epochs.bit_length()) if 2**k <= epochs}
    return {epochs if part.strip() == "last" else int(part) for part in spec.split(",")}


PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        dataset="digits",
        img_size=32,
        epochs=10,
        batch_size=64,
        base_lr=1e-3,
        warmup_epochs=1,
        sched_on_updates=True,
        weight_decay=0.05,
        smoothing=0.1,
        hflip=0.0,
        crop_pct=1.0,
        probe_size=256,
        probe_batch_size=128,
        drop_path=0.0,
        weight_spectra=False,
    ),
    "smoke": dict(
        model="vit_tiny_patch16_224",
        dataset="synthetic",
        img_size=32,
        patch_size=8,
        depth=2,
        epochs=2,
        batch_size=32,
        synthetic_train_size=128,
        synthetic_val_size=64,
        num_classes=4,
        base_lr=2e-3,
        warmup_epochs=0,
        sched_on_updates=True,
        probe_size=32,
        probe_batch_size=32,
        hflip=0.0,
        system_metrics=False,
        weight_spectra=False,
    ),
    "tgo1": dict(
        dataset="imagenet100",
        img_size=224,
        epochs=300,
        batch_size=256,
        base_lr=5e-4,
        min_lr=1e-5,
        warmup_lr=1e-6,
        weight_decay=0.05,
        sched="cosine",
        warmup_epochs=5,
        smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
        auto_augment="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        drop_path=0.1,
        hflip=0.5,
        crop_pct=0.875,
        repeated_aug=3,
        model_ema=True,
        probe_size=1000,
        probe_batch_size=250,
        workers=8,
        checkpoint_epochs="0,1,10,100,last",
    ),
}

assert tuple(PRESETS) == get_args(Preset), "PRESETS and the Preset choices must agree"
FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

SEED_MAX = 2**32 - 1  # numpy's and torch's seed range
# Every integer setting's accepted range [low, high], with why where the bound is not plain. The
# upper bounds refuse a slip or an absurd value before any work (no ViT is trained for 10^23
# epochs), each far above any use: a tgo1 run is 300 epochs of batch 256 at 224 px.
INT_RANGES: dict[str, tuple[int, int, str]] = {
    "img_size": (1, 4096, ""),
    "synthetic_train_size": (1, 1_000_000, ""),
    "synthetic_val_size": (1, 1_000_000, ""),
    "num_classes": (0, 1_000_000, " (0: the dataset's count)"),
    "workers": (0, 1024, ""),
    "patch_size": (0, 4096, " (0: the model's own)"),
    "depth": (0, 1024, " (0: the model's own)"),
    "epochs": (0, 1_000_000, ""),
    "batch_size": (1, 1_000_000, ""),
    "warmup_epochs": (0, 1_000_000, ""),
    "repeated_aug": (0, 1000, " (0 or 1: off; DeiT uses 3)"),
    "probe_size": (2, 100_000_000, " (a covariance needs two images)"),
    "probe_every": (0, 1_000_000, " (0: no probe)"),
    "probe_batch_size": (1, 1_000_000, ""),
    "probe_patch_tokens": (0, 1_000_000, " (0: all)"),
    "probe_seed": (0, SEED_MAX, " (numpy's and torch's seed range)"),
    "probe_folds": (1, 10_000, " (1: no standard errors; 5 is the default)"),
    "seed": (0, SEED_MAX, " (numpy's and torch's seed range)"),
}
assert set(INT_RANGES) == {name for name, kind in _HINTS.items() if kind is int}, "every integer setting has its range"


def _parse(name: str, value: Any) -> Any:
    """Coerce a value (possibly a string from MLflow or argparse) to the field's type."""
    kind = _HINTS[name]
    if kind is bool:
        return parse_bool(name, value)
    if kind is int:
        low, high, why = INT_RANGES[name]
        return parse_int(name, value, low, high, why)
    if kind is float:
        return parse_float(name, value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {type(value).__name__} {value!r}.")
    return value.strip()


def _int_range(low: int, high: int | None) -> str:
    """ "an integer in [0, 2^32 - 1]", or "an integer >= 0" without an upper bound."""
    if high is None:
        return f"an integer >= {low}"
    return f"an integer in [{low}, {'2^32 - 1' if high == SEED_MAX else high}]"


def parse_int(name: str, value: Any, minimum: int = 0, maximum: int | None = None, why: str = "") -> int:
    """An integer parameter from a typed value or text ("3"; "3.0" and "1e3" as MLflow's float
    parameters arrive), read exactly: never through a float, which turns 99999999999999999999999
    into 99999999999999991611392.

    Args:
        name: the parameter, for messages.
        value: an int, an integral float, or text.
        minimum, maximum: the accepted range (maximum None: no upper bound).
        why: what the range means, for the message (" (0: off)").

    Raises:
        ConfigError: not an integer, or outside the range; the message names the parameter and its range.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}.")
    out_of_range = ConfigError(f"{name}: must be {_int_range(minimum, maximum)}{why}, got {value!r}.")
    if isinstance(value, int):
        out = value
    else:
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise ConfigError(f"{name}: expected an integer, got {value!r}.") from None
        if not number.is_finite() or number != number.to_integral_value():
            raise ConfigError(f"{name}: expected an integer, got {value!r}.")
        if number.adjusted() > 30:  # beyond every range, and int() of 1e999999999 would take minutes
            raise out_of_range
        out = int(number)
    if out < minimum or (maximum is not None and out > maximum):
        raise out_of_range
    return out


def parse_bool(name: str, value: Any) -> bool:
    """A true/false parameter from a bool or text (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}.")


def parse_float(name: str, value: Any) -> float:
    """A finite number parameter from a typed value or text."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}.")
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}.") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}.")
    return out


def _check_timm_names(cfg, need) -> None:
    """What timm would reject only once training starts: the optimiser name and the augmentation
    spec, checked with timm's own lists and parser before any work."""
    from timm.optim import list_optimizers

    opt = cfg.opt.lower()
    known = {name for name in list_optimizers() if isinstance(name, str)}  # names only (no with_description)
    base = opt.split("_", 1)[1] if opt.startswith("lookahead_") else opt
    need(
        base in known,
        f"opt: unknown optimiser {cfg.opt!r}; timm knows {', '.join(sorted(known))} (any of them may be prefixed with lookahead_).",
    )
    spec = cfg.auto_augment.strip()
    if spec and spec.lower() != "none":
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        hparams = dict(translate_const=int(cfg.img_size * 0.45), img_mean=(124, 116, 104))
        make = (
            rand_augment_transform
            if spec.startswith("rand")
            else augment_and_mix_transform
            if spec.startswith("augmix")
            else auto_augment_transform
        )
        try:
            make(spec, hparams)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as err:
            need(
                False,
                f"auto_augment: timm cannot read {spec!r} ({type(err).__name__}: {err}); use a spec such as "
                "rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, original or v0 (AutoAugment), or none.",
            )


def _check(cfg: TrainConfig) -> None:
    """Ranges and choices, each error naming the parameter and the accepted values."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(cfg.preset in PRESETS, f"preset: unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}.")
    need(cfg.dataset in DATASETS, f"dataset: unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}.")
    if cfg.dataset in ("imagefolder", "imagenet100"):
        need(bool(cfg.data_dir), f"data_dir: dataset={cfg.dataset} needs data_dir, a folder with train/ and val/ class folders.")
    for name, (low, high, why) in INT_RANGES.items():
        value = getattr(cfg, name)
        need(low <= value <= high, f"{name}: must be {_int_range(low, high)}{why}, got {value}.")
    need(
        cfg.num_classes != 1,
        "num_classes: must be 0 (the dataset's count) or at least 2; with one class there is nothing to learn, got 1.",
    )
    if cfg.probe_folds > 1:
        need(
            cfg.probe_size >= cfg.probe_folds,
            f"probe_folds: {cfg.probe_folds} folds need at least {cfg.probe_folds} probe "
            f"images, got probe_size={cfg.probe_size}; lower probe_folds or raise probe_size.",
        )
    for name in ("lr", "base_lr", "min_lr", "warmup_lr", "weight_decay", "grad_clip", "mixup", "cutmix"):
        need(getattr(cfg, name) >= 0, f"{name}: must be a number >= 0, got {getattr(cfg, name)}.")
    need(cfg.resolved_lr > 0, "lr: must be > 0 (or 0 with base_lr > 0 for the scaling rule).")
    for name in ("drop_path", "smoothing", "reprob", "hflip"):
        need(0 <= getattr(cfg, name) <= 1, f"{name}: must be a number in [0, 1], got {getattr(cfg, name)}.")
    need(0 < cfg.crop_pct <= 1, f"crop_pct: must be in (0, 1], got {cfg.crop_pct}.")
    need(cfg.amp in AMP_MODES, f"amp: unknown mode {cfg.amp!r}; choose one of {', '.join(AMP_MODES)}.")
    need(cfg.sched in SCHEDULES, f"sched: unknown schedule {cfg.sched!r}; choose one of {', '.join(SCHEDULES)}.")
    need(
        cfg.data_backend in get_args(DataBackend),
        f"data_backend: choose {' or '.join(get_args(DataBackend))}, got {cfg.data_backend!r}.",
    )
    need(
        cfg.data_backend == "timm" or cfg.dataset in ("imagefolder", "imagenet100"),
        f"data_backend: dali reads JPEG folders (imagefolder, imagenet100), not dataset={cfg.dataset}; use data_backend=timm.",
    )
    need(
        cfg.data_backend == "timm" or cfg.auto_augment.strip() in ("", "none") or cfg.auto_augment.strip().startswith("rand"),
        f"auto_augment: data_backend=dali runs RandAugment specs only (rand-m9-mstd0.5-inc1) or none, not {cfg.auto_augment!r}.",
    )
    need(
        not (cfg.sched_on_updates and cfg.sched == "plateau"),
        "sched_on_updates: plateau steps once per epoch, on the validation accuracy; set sched_on_updates=false with sched=plateau.",
    )
    need(cfg.probe_precision in ("float32", "float64"), f"probe_precision: choose float64 or float32, got {cfg.probe_precision!r}.")
    need(0 < cfg.model_ema_decay < 1, f"model_ema_decay: must be a number in (0, 1), got {cfg.model_ema_decay}.")
    need(cfg.probe_weights in ("model", "ema"), f"probe_weights: choose model or ema, got {cfg.probe_weights!r}.")
    need(cfg.probe_weights == "model" or cfg.model_ema, "probe_weights: ema needs model_ema=true (there is no weight average to measure).")
    _check_timm_names(cfg, need)
    need(cfg.alarm_action in ("warn", "stop"), f"alarm_action: choose warn or stop, got {cfg.alarm_action!r}.")
    alarm_rules.parse(cfg.alarms)  # a ConfigError naming the rule that does not parse
    device = cfg.device.lower()
    ok_device = device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())
    need(ok_device, f"device: unknown device {cfg.device!r}; choose {DEVICES_HELP}.")
    if cfg.mixup > 0 or cfg.cutmix > 0:
        need(cfg.batch_size % 2 == 0, f"batch_size: mixup/cutmix need an even batch size, got {cfg.batch_size}.")
    try:
        epochs = cfg.checkpoint_epoch_set()
    except ValueError:
        raise ConfigError(
            f"checkpoint_epochs: expected epochs separated by commas (e.g. 0,10,last), 'all' or 'none', got {cfg.checkpoint_epochs!r}."
        ) from None
    bad = sorted(e for e in epochs if not 0 <= e <= cfg.epochs)
    need(not bad, f"checkpoint_epochs: epochs {bad} are outside 0..{cfg.epochs} (epochs={cfg.epochs}).")
    try:
        epochs = _epoch_set(cfg.feature_epochs, cfg.epochs)
    except ValueError:
        raise ConfigError(
            f"feature_epochs: expected auto, all, none or epochs separated by commas (e.g. 0,10,last), got {cfg.feature_epochs!r}."
        ) from None
    bad = sorted(e for e in epochs if not 0 <= e <= cfg.epochs)
    need(not bad, f"feature_epochs: epochs {bad} are outside 0..{cfg.epochs} (epochs={cfg.epochs}).")


def resolve(preset: str = "demo", **overrides: Any) -> TrainConfig:
    """The config of `preset` with `overrides` applied and every value checked.

    Overrides may be typed values or strings (as MLflow and argparse pass them); None or "" leaves
    the preset's value. Unknown keys and wrong types raise ConfigError naming the parameter.
    """
    preset = "demo" if preset in (None, "") else str(preset).strip()
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    unknown = sorted(set(overrides) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; the parameters are: {', '.join(FIELD_TYPES)}.")
    values: dict[str, Any] = {"preset": preset, **PRESETS[preset]}
    chosen = overrides.get("dataset")
    if chosen not in (None, "") and str(chosen).strip() != values.get("dataset", TrainConfig.dataset):
        # Another dataset than the preset's: the preset's values that describe its own dataset yield.
        for name in DATASET_DEPENDENT:
            values.pop(name, None)
    for name, value in overrides.items():
        if name == "preset" or value is None or (isinstance(value, str) and value.strip() == ""):
            continue  # "" is how MLflow and the CLI say "the preset's value"
        values[name] = _parse(name, value)
    cfg = TrainConfig(**values)
    _check(cfg)
    return cfg


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The settings given explicitly: None and "" (how MLflow and the CLI say "the preset's value")
    dropped."""
    return {k: v for k, v in values.items() if v is not None and not (isinstance(v, str) and not v.strip())}


def from_overrides(values: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """The one place where explicitly given settings (typed, or text from MLflow and the CLI) become
    a checked TrainConfig: the config of values["preset"] (demo if absent) with the others applied,
    and the names that were given (a resume refuses to change any but a few of them)."""
    explicit = given(values)
    return resolve(explicit.get("preset", "demo"), **{k: v for k, v in explicit.items() if k != "preset"}), set(explicit)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A config saved by `to_dict` (a checkpoint's or a run's), checked again."""
    values = dict(values)
    # Saved before the setting existed: that run's schedule stepped once per epoch, whatever its
    # preset now says (a resumed run goes on as it started).
    values.setdefault("sched_on_updates", False)
    values.setdefault("alarms", "none")  # ... and had no alarms
    return resolve(values.pop("preset", "demo"), **values)


# One line per parameter, from the fields' metadata: the --help of `tgo train`; MLproject's comments
# repeat it (tests/test_config.py checks that they agree).
HELP: dict[str, str] = {f.name: f.metadata["help"] for f in fields(TrainConfig)}

# The settings that a probe of weights trained elsewhere uses (`tgo probe`, tgo.GeometryMonitor): the
# model, the data and the probe, with the names, defaults and checks they have in training. The
# other fields are training's own and say nothing about such a run.
PROBE_FIELDS: tuple[str, ...] = (
    "preset",
    "dataset",
    "data_dir",
    "download",
    "img_size",
    "synthetic_train_size",
    "synthetic_val_size",
    "num_classes",
    "workers",
    "model",
    "patch_size",
    "depth",
    "crop_pct",
    "probe_size",
    "probe_batch_size",
    "probe_patch_tokens",
    "probe_precision",
    "probe_seed",
    "probe_folds",
    "probe_weights",
    "weight_spectra",
    "feature_epochs",
    "alarms",
    "alarm_action",
    "device",
    "experiment",
    "run_name",
)
