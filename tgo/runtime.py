"""Where training runs: processes, devices, precision and seeds (torch, numpy and the config only).

    from tgo.runtime import resolve_device
    resolve_device("auto")          # device(type='cuda', index=0) on a GPU machine, else device(type='cpu')
    resolve_device("cuda", 1)       # device(type='cuda', index=1): the GPU of local rank 1 under torchrun

Devices. `resolve_device` is the one place where a device name (auto, cpu, cuda, cuda:N or mps)
becomes a `torch.device`; it checks that the machine has it and touches nothing, so a command can
check its device before any work. `use_device` then makes it the process's current CUDA device,
once training starts on it.

Seeds. `seed_epoch` re-seeds torch, numpy and random from (run seed, epoch), so that every epoch
starts from a known RNG state; `rng_state` and `set_rng_state` save and restore the generators.
"""

from __future__ import annotations

import os
import random
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tgo.config import DEVICES_HELP, ConfigError, TrainConfig

__all__ = ["Dist", "amp_dtype", "autocast", "init_distributed", "resolve_device", "rng_state", "seed_epoch", "set_rng_state", "use_device"]


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place among the training processes: one process (the defaults), or one of
    `world` under torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the rank on this machine: which of its GPUs the process uses

    @property
    def main(self) -> bool:
        """Rank 0: the process that talks to MLflow."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (DDP, sharded validation and probe)."""
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """This process's `Dist`, with one process group joined when there are several.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them (or with WORLD_SIZE=1) this is one
    process and nothing is initialised.

    Args:
        device: the config's device name; the group talks over nccl when it names CUDA on a
            machine that has it, over gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return d


# --------------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device a device name stands for on this machine, checked, without side effects.

    Args:
        name: auto (CUDA where torch sees a GPU, else the CPU; "" means auto too), cpu, cuda,
            cuda:N or mps, in any case.
        local_rank: the process's rank on this machine; a bare "cuda" is its GPU, cuda:<local_rank>
            (0 for a single process).

    Returns:
        The device, with its index for CUDA (cuda:N), so that DDP and `use_device` get a definite GPU.

    Raises:
        ConfigError: CUDA asked for where torch sees no GPU, a GPU index this machine does not have,
            mps where it is not available, or a name that is none of the above (the message says
            which, and what to choose instead).
    """
    lowered = (name or "auto").lower()
    if lowered == "auto":
        lowered = "cuda" if torch.cuda.is_available() else "cpu"
    if lowered == "cpu":
        return torch.device("cpu")
    if lowered == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device: 'mps' is not available on this machine; use device=cpu.")
        return torch.device("mps")
    kind, colon, index = lowered.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ConfigError(f"device: {name!r} is not available here; choose {DEVICES_HELP}.")
    if not torch.cuda.is_available():
        # Checked before the index: torch.cuda.device_count() is 0 here, and the advice is the CPU.
        raise ConfigError(f"device: {name!r} asked for CUDA, but torch sees no CUDA GPU on this machine; use device=cpu (or auto).")
    gpu = int(index) if colon else local_rank
    if gpu >= torch.cuda.device_count():
        rank = "" if colon else f" (the GPU of local rank {local_rank})"
        raise ConfigError(f"device: {name!r}{rank}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    return torch.device("cuda", gpu)


def use_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (where NCCL and un-indexed CUDA tensors go);
    nothing for any other device. Called once training starts on it, not when a name is checked.

    Args:
        device: a device from `resolve_device`.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


# --------------------------------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------------------------------


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `cfg.amp` on `device`, or None for full precision.

    auto is bf16 on a GPU that supports it, fp16 on one that does not, and full precision off the
    GPU; bf16 and fp16 are taken as asked, on any device.

    Args:
        cfg: the run's config (its `amp`).
        device: the device training runs on.
    """
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, amp: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast on `device` in `amp`, or a context that changes nothing when `amp` is None.

    Args:
        device: the device the forward pass runs on.
        amp: the dtype from `amp_dtype`.
    """
    return torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()


# --------------------------------------------------------------------------------------------------
# seeds
# --------------------------------------------------------------------------------------------------


def rank0_flag(flag: bool, distributed: bool) -> bool:
    """Rank 0's `flag` on every rank (a broadcast under torch.distributed), so that a decision rank 0
    takes alone, such as an alarm's stop, is the same everywhere; `flag` as it is otherwise."""
    if not distributed:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def seed_epoch(seed: int, epoch: int) -> int:
    """Seed torch, numpy and random with one seed per (run seed, epoch): every epoch starts from a
    known RNG state, whatever ran before it (a resume, or another epoch's probe).

    Args:
        seed: the run's seed.
        epoch: the epoch about to run (0: the initial weights).

    Returns:
        The seed used, in [0, 2^31), for the generators that are seeded apart (the loader's shuffling).
    """
    s = (seed * 1_000_003 + epoch) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


def rng_state() -> dict:
    """The state of torch's (CPU and CUDA), numpy's and Python's generators, as tensors and plain
    values that a checkpoint can hold (torch.load with weights_only=True reads it back)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form (the default) of the global MT19937 generator
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore the generators from `rng_state()`'s dict (the CUDA ones where this machine has CUDA).

    Args:
        state: what `rng_state` returned, possibly through a checkpoint.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
