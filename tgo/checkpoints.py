"""Checkpoint files written by other trainers, read as a series of (epoch, weights) for the probe.

    series = find_checkpoints("output/train/20261201-vit")      # a file, a glob or a folder
    for ckpt in series.checkpoints:
        state_dict = fit_state_dict(model, load_weights(ckpt, "model"), str(ckpt.path))

The layouts people have, and what each file says of its epoch:

    layout        files                                          weights (model / ema)          epoch
    timm          checkpoint-N.pth.tar, last.pth.tar,            state_dict / state_dict_ema    `epoch`, 0-based
                  model_best.pth.tar (timm train.py's
                  CheckpointSaver; `args` an argparse Namespace)
    deit          checkpoint.pth, best_checkpoint.pth            model / model_ema              `epoch`, 0-based
    lightning     *.ckpt (ModelCheckpoint)                       state_dict under the           `epoch`, 0-based
                                                                 LightningModule's attribute
    huggingface   checkpoint-STEP/model.safetensors beside       the file / -                   trainer_state.json's
                  trainer_state.json (transformers' Trainer)                                    `epoch`, completed
    tgo           tgo's own checkpoints/last.pt                  model / ema                    `epoch`, completed
    state_dict    .pt, .pth, .bin, .safetensors of bare          the file / -                   none: the number in
                  weights (a released file, tgo's                                               the file name, or 0
                  weights_epoch_XXXX.pt)                                                        for one file

The step: tgo's epoch counts training epochs completed (0 = the initialisation). timm's, DeiT's and
Lightning's `epoch` is the 0-based index of the epoch just trained, so their `epoch=N` is step N + 1
(timm's checkpoints of `version` < 2 already counted it; a Lightning checkpoint with `global_step` 0,
saved before any update, is step 0). The Hugging Face Trainer's `epoch` already counts completed
epochs; where it is fractional (saves every N optimiser steps) the series takes `global_step`
instead and says so (`Series.unit == "steps"`). timm's `last` and `model_best` are copies of an
epoch already in the folder: checkpoints that claim the same step with the same weights are probed
once, and two different ones claiming the same step are an error.

Safety: every file is read with `torch.load(weights_only=True)`, with only `argparse.Namespace`
allowed beyond torch's own types (timm's `args`, as timm's own loader allows it). A file that needs
anything else unpickled is refused, naming what it needs, unless `trust=True` (the command's
`--trust_checkpoints`). safetensors files hold tensors only and need no trust.

Prefixes (`module.` from DDP, `_orig_mod.` from torch.compile, a LightningModule's attribute such
as `model.` or `backbone.`, transformers' timm wrapper `timm_model.`) are found by matching the
checkpoint's keys against the ViT's own and stripped (`fit_state_dict`); a checkpoint that does not
fit the model is one message listing the missing, unexpected and misshapen tensors and the settings
its tensors (and its saved `args`) say would fit.

Written here rather than taken from a library: timm's `load_state_dict` reads one file of its own
and DeiT's layouts but no epoch, no series, no Lightning or Trainer layouts and no prefix but
`module.`/`_orig_mod.`; it is used for what it covers (its prefix cleaning).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from timm.models import clean_state_dict

from tgo.errors import ConfigError

__all__ = [
    "Checkpoint",
    "Series",
    "WeightsChoice",
    "architecture",
    "find_checkpoints",
    "fit_state_dict",
    "load_weights",
    "read_file",
]

log = logging.getLogger(__name__)

Layout = Literal["timm", "deit", "lightning", "huggingface", "tgo", "state_dict"]
WeightsChoice = Literal["model", "ema"]
SUFFIXES = (".pth.tar", ".pth", ".pt", ".ckpt", ".bin", ".safetensors")
TRUST_HINT = "--trust_checkpoints (-P trust_checkpoints=true)"
# Files a trainer writes on the way to a checkpoint, never checkpoints themselves: timm's tmp.pth.tar
# (renamed to last.pth.tar once whole), its mid-epoch recovery-*, tgo's .partial writes, hidden files.
_NOT_CHECKPOINTS = re.compile(r"^(\.|tmp\.|recovery-)|\.partial$|\.tmp$")
# Where each layout keeps the model's and the EMA's weights.
_WEIGHT_KEYS: dict[str, tuple[str | None, str | None]] = {
    "timm": ("state_dict", "state_dict_ema"),
    "deit": ("model", "model_ema"),
    "lightning": ("state_dict", None),
    "tgo": ("model", "ema"),
    "huggingface": (None, None),
    "state_dict": (None, None),
}
# Keys every timm ViT has, used to find the prefix a wrapper put in front of them.
_ANCHORS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "norm.weight")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series.

    Attributes:
        path: the file (for a Hugging Face Trainer folder, its model.safetensors).
        layout: which trainer wrote it (the table in the module docstring).
        step: tgo's epoch of these weights: training epochs completed, 0 = the initialisation
            (optimiser steps where the series' unit is "steps").
        source_epoch: what the file itself says of its epoch (None for bare weights).
        copies: other files of the series holding the same weights (timm's last and model_best).
    """

    path: Path
    layout: Layout
    step: int
    source_epoch: float | None = None
    copies: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        """The name a person knows the checkpoint by: the file's, or its Trainer folder's."""
        return f"{self.path.parent.name}/{self.path.name}" if self.layout == "huggingface" else self.path.name


@dataclass(frozen=True)
class Series:
    """The checkpoints found under one source, in step order."""

    source: str
    checkpoints: list[Checkpoint]
    unit: Literal["epochs", "steps"] = "epochs"
    notes: list[str] = field(default_factory=list)

    @property
    def layouts(self) -> list[str]:
        return sorted({c.layout for c in self.checkpoints})

    def describe(self) -> list[str]:
        """One line per checkpoint: its file, what the file says and the step it is recorded at."""
        lines = []
        for c in self.checkpoints:
            said = "no epoch of its own" if c.source_epoch is None else f"epoch {c.source_epoch:g}"
            copies = f" (same weights: {', '.join(p.name for p in c.copies)})" if c.copies else ""
            lines.append(f"{c.name} [{c.layout}, {said}] -> step {c.step}{copies}")
        return lines


# --------------------------------------------------------------------------------------------------
# reading one file
# --------------------------------------------------------------------------------------------------


def read_file(path: str | Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """The object a checkpoint file holds: a dict of tensors for safetensors, else what
    `torch.load(weights_only=True)` reads (argparse.Namespace allowed, as timm allows it).

    Args:
        path: the file.
        trust: unpickle anything the file holds (only for files you trust: unpickling runs code).
        mmap: map the tensors instead of reading them (a cheap look at the record of a large file).

    Raises:
        ConfigError: the file is not a checkpoint, is damaged, or needs unpickling without `trust`.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}).") from None
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        needs = _unsafe_globals(path) if "Weights only load failed" in str(err) else []
        if not needs:  # not a pickle of tensors and classes at all: bytes torch cannot read
            raise ConfigError(f"{path} is not a checkpoint (torch cannot read it as one: {str(err).splitlines()[0][:200]}).") from None
        raise ConfigError(
            f"{path} needs arbitrary unpickling to load (it holds {', '.join(needs)}), and "
            "unpickling a file can run any code in it, so tgo does not do it unasked. If you trust the file (you or "
            f"your own trainer wrote it), pass {TRUST_HINT}; or save the bare state dict (torch.save(model.state_dict(), ...) "
            "or safetensors) and probe that."
        ) from None
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # a file in torch's legacy (non-zip) format cannot be mapped
            return read_file(path, trust=trust, mmap=False)
        raise ConfigError(f"{path} is not a checkpoint, or is damaged or cut short ({str(err).splitlines()[0]}).") from None
    except (EOFError, OSError, ValueError) as err:
        raise ConfigError(f"{path} is not a checkpoint, or is damaged or cut short ({type(err).__name__}: {err}).") from None


def _unsafe_globals(path: Path) -> list[str]:
    """The classes a refused file would unpickle (torch's own reading of the file), for the message."""
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g != "argparse.Namespace"][:5]
    except Exception:  # noqa: BLE001 - only for the message
        return []


def _layout(obj: Any) -> Layout:
    """Which trainer wrote a loaded torch file (the module docstring's table)."""
    if not isinstance(obj, Mapping):
        return "state_dict"
    fmt = obj.get("format")
    if isinstance(fmt, str) and fmt.startswith("tgo-checkpoint"):
        return "tgo"
    if "pytorch-lightning_version" in obj or ("state_dict" in obj and "global_step" in obj):
        return "lightning"
    if isinstance(obj.get("state_dict"), Mapping):
        return "timm"
    if isinstance(obj.get("model"), Mapping):
        return "deit"
    return "state_dict"


def _own_step(obj: Any, layout: Layout) -> tuple[float | None, int | None]:
    """(what the file says of its epoch, the step that is) for a file with a record; (None, None)
    for bare weights."""
    if not isinstance(obj, Mapping) or "epoch" not in obj or layout == "state_dict":
        return None, None
    epoch = int(obj["epoch"])
    if layout == "tgo":
        return epoch, epoch
    if layout == "lightning":
        return epoch, 0 if int(obj.get("global_step", 1)) == 0 else epoch + 1
    if layout == "timm" and int(obj.get("version", 2)) < 2:  # timm before version 2 saved epoch + 1
        return epoch, epoch
    return epoch, epoch + 1


# --------------------------------------------------------------------------------------------------
# a series
# --------------------------------------------------------------------------------------------------


def _candidates(source: str) -> tuple[list[Path], list[Path]]:
    """(checkpoint files, Hugging Face Trainer folders) that `source` names: a file, a glob, a
    folder of checkpoint files, a folder of checkpoint-STEP/ folders, or one such folder."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path], []
    if path.is_dir():
        if (path / "trainer_state.json").is_file():
            return [], [path]
        entries = sorted(path.iterdir())
    else:
        entries = sorted(Path(p) for p in glob.glob(os.path.expanduser(source)))
    files = [p for p in entries if p.is_file() and p.name.endswith(SUFFIXES) and not _NOT_CHECKPOINTS.search(p.name)]
    trainer = [p for p in entries if p.is_dir() and (p / "trainer_state.json").is_file()]
    return files, trainer


def _trainer_weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{folder} has a trainer_state.json but no model.safetensors or pytorch_model.bin beside it.")


def _trainer_record(folder: Path) -> tuple[float, int]:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        return float(state["epoch"]), int(state.get("global_step", 0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{folder}/trainer_state.json is not a Trainer state with an epoch ({err}).") from None


def _number_in_name(path: Path) -> int | None:
    numbers = re.findall(r"\d+", path.name.removesuffix("".join(s for s in SUFFIXES if path.name.endswith(s))))
    return int(numbers[-1]) if numbers else None


def find_checkpoints(source: str, *, epoch: int | None = None, trust: bool = False, weights: WeightsChoice = "model") -> Series:
    """Every checkpoint under `source`, each with its step, in step order.

    Args:
        source: one file, a glob, or a folder (of checkpoint files, or of a Trainer's checkpoint-STEP/
            folders, or one such folder).
        epoch: the step of a single file that carries no epoch of its own (default 0).
        trust: let files be unpickled beyond tensors (see `read_file`).
        weights: which weights are compared when two files claim one step ("model" or "ema").

    Raises:
        ConfigError: nothing found, a file that is not a checkpoint, two different checkpoints
            claiming one step, a series of bare weights without a number in a file's name.
    """
    files, trainer_folders = _candidates(source)
    if not files and not trainer_folders:
        raise ConfigError(
            f"checkpoints: {source!r} names no checkpoint (no file ending in {', '.join(SUFFIXES)}, and no "
            "Trainer checkpoint-STEP/ folder with a trainer_state.json). Give a file, a glob in quotes or a folder."
        )
    found: list[Checkpoint] = []
    bare: list[Path] = []
    for path in files:
        obj = read_file(path, trust=trust, mmap=True)
        layout = _layout(obj)
        said, step = _own_step(obj, layout)
        if layout == "state_dict" or step is None:
            bare.append(path)
            if layout not in ("state_dict", "deit"):  # a record without an epoch: treated as bare weights
                log.info("%s has no epoch of its own; it is treated as bare weights.", path.name)
        else:
            found.append(Checkpoint(path, layout, step, said))
        del obj
    unit: Literal["epochs", "steps"] = "epochs"
    notes: list[str] = []
    if trainer_folders:
        records = {folder: _trainer_record(folder) for folder in trainer_folders}
        fractional = any(not float(e).is_integer() for e, _ in records.values())
        if fractional:  # saved every N optimiser steps: the epochs are not whole
            unit = "steps"
            notes.append("the Trainer's checkpoints fall between epochs: their steps are optimiser steps (global_step)")
        for folder, (said_epoch, global_step) in records.items():
            step = global_step if fractional else int(said_epoch)
            found.append(Checkpoint(_trainer_weights(folder), "huggingface", step, said_epoch))
        if unit == "steps" and found and any(c.layout != "huggingface" for c in found):
            raise ConfigError(f"checkpoints: {source!r} mixes Trainer checkpoints counted in optimiser steps with files counted in epochs.")
    if bare:
        if len(bare) == 1 and not found:
            found.append(Checkpoint(bare[0], "state_dict", 0 if epoch is None else epoch))
        else:
            if epoch is not None:
                raise ConfigError(
                    "epoch: --epoch gives the step of one file; this source holds several, whose steps come from their names."
                )
            for path in bare:
                number = _number_in_name(path)
                if number is None:
                    raise ConfigError(
                        f"checkpoints: {path.name} holds bare weights (no epoch of its own) and has no number in its name, "
                        "so its epoch is unknown; name the files by epoch (weights_epoch_0003.pt) or probe it alone with --epoch N."
                    )
                found.append(Checkpoint(path, "state_dict", number))
            notes.append("bare weights carry no epoch: their steps are the numbers in their file names")
    elif epoch is not None and len(found) > 1:
        raise ConfigError("epoch: --epoch gives the step of one file that carries no epoch; these files carry their own.")
    return Series(source, _merge_copies(found, trust, weights), unit, notes)


_PREFERRED = ("checkpoint-", "epoch=", "weights_epoch_")  # of several copies, the name that says the epoch


def _merge_copies(found: list[Checkpoint], trust: bool, weights: WeightsChoice) -> list[Checkpoint]:
    """One checkpoint per step: copies of the same weights (timm's last and model_best) merged into
    the one whose name says its epoch; different weights at one step are an error."""
    by_step: dict[int, list[Checkpoint]] = {}
    for c in found:
        by_step.setdefault(c.step, []).append(c)
    out = []
    for step, group in sorted(by_step.items()):
        group.sort(key=lambda c: (not c.path.name.startswith(_PREFERRED), c.path.name))
        first, others = group[0], group[1:]
        if others:
            digest = ""  # hashed only for a copy that is not a hard link of the same file (timm links where it can)
            for other in others:
                if os.path.samefile(first.path, other.path):
                    continue
                digest = digest or _digest(first, trust, weights)
                if _digest(other, trust, weights) != digest:
                    raise ConfigError(
                        f"checkpoints: {first.name} and {other.name} both claim step {step} but hold different weights; "
                        "probe them apart (one file each, with --epoch) or move one out of the folder."
                    )
            first = Checkpoint(first.path, first.layout, first.step, first.source_epoch, tuple(o.path for o in others))
        out.append(first)
    return out


def _digest(c: Checkpoint, trust: bool, weights: WeightsChoice) -> str:
    """A hash of a checkpoint's chosen weights (names, shapes, dtypes, bytes), read through mmap."""
    h = hashlib.sha256()
    for name, tensor in sorted(load_weights(c, weights, trust=trust, mmap=True).items()):
        h.update(name.encode())
        h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# the weights of one checkpoint, fitted to the model
# --------------------------------------------------------------------------------------------------


def load_weights(c: Checkpoint, weights: WeightsChoice = "model", *, trust: bool = False, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint: the model's raw weights or its EMA's.

    Raises:
        ConfigError: the EMA is asked for and the checkpoint has none.
    """
    obj = read_file(c.path, trust=trust, mmap=mmap)
    model_key, ema_key = _WEIGHT_KEYS[c.layout]
    key = model_key if weights == "model" else ema_key
    if weights == "ema" and (key is None or not isinstance(obj.get(key), Mapping)):
        raise ConfigError(f"weights: {c.name} holds no EMA weights ({c.layout} layout); use --weights model.")
    state = obj[key] if key is not None else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{c.path} holds no state dict of tensors where a {c.layout} checkpoint keeps it.")
    return dict(state)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def find_prefix(state: Mapping[str, torch.Tensor]) -> str:
    """The prefix a wrapper put before the ViT's keys ("" for none): the most common text in front
    of the keys every timm ViT has (`_ANCHORS`), with DDP's and torch.compile's wrappers included."""
    found: Counter[str] = Counter()
    for key in state:
        for anchor in _ANCHORS:
            if key == anchor or key.endswith("." + anchor):
                found[key[: len(key) - len(anchor)]] += 1
    return found.most_common(1)[0][0] if found else ""


def vit_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ViT's own keys of a checkpoint's state dict: the wrapper's prefix stripped (and only the
    keys under it kept: a LightningModule may hold a loss or a teacher beside the model), then
    DDP's `module.` and torch.compile's `_orig_mod.` (timm's clean_state_dict)."""
    return clean_state_dict(_strip(state, find_prefix(state)))


def architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What a ViT state dict's tensors say of its architecture (keys as TrainConfig's settings, and
    embed_dim): embed_dim and patch_size from the patch projection, depth from the blocks,
    num_classes from the head, img_size from the position embedding's grid (where it is square)."""
    out: dict[str, int] = {}
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        out["embed_dim"], out["patch_size"] = int(proj.shape[0]), int(proj.shape[-1])
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        out["depth"] = max(blocks) + 1
    head = state.get("head.weight")
    if head is not None and head.ndim == 2:
        out["num_classes"] = int(head.shape[0])
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "patch_size" in out:
        for prefix in (0, 1, 2, *range(3, 12)):  # class, distillation and register tokens may be inside
            side = math.isqrt(int(pos.shape[1]) - prefix) if pos.shape[1] > prefix else 0
            if side and side * side == pos.shape[1] - prefix:
                out["img_size"] = side * out["patch_size"]
                break
    return out


_WIDTHS = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge"}


def _suggestion(arch: Mapping[str, int], model: str, args: Any) -> str:
    """The settings that would fit, from the checkpoint's tensors and its saved args."""
    parts = []
    if "embed_dim" in arch:
        width = _WIDTHS.get(arch["embed_dim"])
        name = f"vit_{width}_patch{arch.get('patch_size', 16)}_224" if width else f"a ViT of width {arch['embed_dim']}"
        parts.append(f"width {arch['embed_dim']} ({name})")
    for key in ("patch_size", "depth", "img_size", "num_classes"):
        if key in arch:
            parts.append(f"{key} {arch[key]}")
    said = f"The checkpoint's tensors say: {', '.join(parts)}." if parts else ""
    saved = ""
    if args is not None:
        values = vars(args) if isinstance(args, argparse.Namespace) else dict(args) if isinstance(args, Mapping) else {}
        known = {k: values[k] for k in ("model", "img_size", "input_size", "num_classes", "patch_size", "depth") if values.get(k)}
        if known:
            saved = " Its saved args: " + ", ".join(f"{k}={v}" for k, v in known.items()) + "."
    return f"{said}{saved} Set --model (and --patch_size, --depth, --img_size, --num_classes) to match; you gave --model {model}."


def fit_state_dict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, *, model_name: str = "", args: Any = None
) -> dict:
    """`state` with its wrapper's prefix stripped, checked tensor by tensor against `model`.

    Args:
        model: the ViT the weights go into.
        state: a checkpoint's state dict (`load_weights`).
        source: the checkpoint, for the message.
        model_name: the timm name the model was built from, for the message.
        args: the checkpoint's saved training arguments (timm's and DeiT's `args`), for the message.

    Raises:
        ConfigError: one message listing the missing, unexpected and misshapen tensors and the
            settings the checkpoint's tensors (and `args`) say would fit; never torch's own error.
    """
    cleaned = vit_state_dict(state)
    own = model.state_dict()
    missing = [k for k in own if k not in cleaned]
    unexpected = [k for k in cleaned if k not in own]
    misshapen = [
        f"{k} {tuple(cleaned[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in cleaned and cleaned[k].shape != own[k].shape
    ]
    if missing or unexpected or misshapen:

        def listed(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

        problems = [
            f"{len(names)} {what} ({listed(names)})"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen (checkpoint vs model)", misshapen))
            if names
        ]
        raise ConfigError(
            f"{source} does not fit the model: {'; '.join(problems)}. " + _suggestion(architecture(cleaned), model_name or "?", args)
        )
    return cleaned


def saved_args(c: Checkpoint, *, trust: bool = False) -> Any:
    """The training arguments a checkpoint saved (timm's and DeiT's `args`, Lightning's
    `hyper_parameters`), or None."""
    if c.layout not in ("timm", "deit", "lightning"):
        return None
    obj = read_file(c.path, trust=trust, mmap=True)
    return obj.get("args", obj.get("hyper_parameters"))
