"""The GPU benchmark, prepared to run in one go (at most 8 minutes on one data-centre GPU).

Prints, each alone on a line (lines starting with # give the figures behind them):
  timm_images_per_s: eager X compiled Y
        the anchor: a plain training step of timm's ViT-S/16 at 224 px (timm's AdamW, bf16 autocast,
        cross-entropy, batch 256, synthetic images already on the device), eager and torch.compile'd
  tgo_over_timm_throughput: eager X compiled Y
        tgo's own loop (`tgo.train.train_one_epoch` of a Setup from `tgo.train.build`: the same
        model, batch, optimiser and images, probe off) over the anchor (target >= 1.0)
  probe_over_inference_gpu: device X host Y
        tgo's probe (tgo1's settings: all 44 site/views, float64 products, K = 5 jackknife folds)
        over 1000 images at 224 px / bare bf16 inference of the same images; the eigendecompositions
        on the device (eigensolver="torch", what "auto" picks on a GPU) and on the host (numpy)
        (target <= 1.3)
  probe_share_tgo1_gpu: X
        the probe's share of a tgo1 epoch from these per-image costs: 126,689 training images at
        batch 256 (tgo1's recipe: mixup, cutmix, EMA, drop path), 5,000 validation images, one probe
        of 1000 images (target <= 0.01)
  peak_memory_gb_batch256: X
        peak GPU memory of tgo's eager loop at batch 256 (torch.cuda.max_memory_allocated)
  checkpoint_stall_s: X
        how long tgo's loop waits for an epoch's checkpoint (tgo1's: model, EMA, AdamW state): the
        snapshot to the host, then the submit to the background writer, and its join at the next
        epoch's submit (on the CPU, where tgo writes in line, the whole write)
  train_ddp_nccl: ok
        one smoke epoch of `train_ddp` (torchrun --nproc_per_node 1, device cuda), then tgo's
        distributed pieces (the probe's all-reduced accumulators and kept features, a DDP step) in
        an NCCL process group of one: at WORLD_SIZE=1 tgo itself joins no process group, and two
        processes cannot share one GPU under NCCL, so this is what one GPU can check

    python benchmarks/gpu.py                          # on a GPU: the figures above
    python benchmarks/gpu.py --device cpu --quick     # the same lines on the CPU, tiny sizes (a minute or two)

Every figure is measured in a try block of its own: one that fails prints `failed (...)` on its
line and the rest still run. --quick: a 2-block ViT-Tiny at 32 px, batch 16, a probe of 64 images.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TGO1_TRAIN, TGO1_VAL, TGO1_PROBE, TGO1_BATCH = 126_689, 5_000, 1_000, 256


@dataclass(frozen=True)
class Sizes:
    """What the benchmark measures at: the full GPU sizes, or --quick's tiny ones."""

    model: dict  # timm.create_model / TrainConfig model settings
    img: int
    batch: int
    classes: int
    warmup: int  # untimed steps (compilation, cuDNN/cuBLAS autotuning)
    steps: int  # timed steps
    probe_images: int
    probe_batch: int
    rounds: int  # alternations of bare inference and the probes


FULL = Sizes(dict(model="vit_small_patch16_224"), 224, 256, 100, 5, 25, 1000, 250, 3)
QUICK = Sizes(dict(model="vit_tiny_patch16_224", patch_size=8, depth=2), 32, 16, 10, 2, 3, 64, 32, 1)


def say(line: str) -> None:
    print(line, flush=True)


def measured(name: str, fn: Callable[[], str]) -> None:
    """Print `name: <fn()>`, or `name: failed (...)` with the traceback on stderr."""
    try:
        say(f"{name}: {fn()}")
    except Exception as err:  # noqa: BLE001 - one figure failing must not cost the others
        traceback.print_exc()
        say(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds `fn()` takes, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def amp_of(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU, as tgo's amp=auto; full precision on the CPU (as tgo runs there)."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device):
    amp = amp_of(device)
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def synthetic_batch(sizes: Sizes, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(sizes.batch, 3, sizes.img, sizes.img, generator=g)
    targets = torch.randint(0, sizes.classes, (sizes.batch,), generator=g)
    return images.to(device), targets.to(device)


# --------------------------------------------------------------------------------------------------
# training throughput: the timm anchor and tgo's loop
# --------------------------------------------------------------------------------------------------


def timm_rate(sizes: Sizes, device: torch.device, compiled: bool) -> float:
    """Images per second of a plain timm training step (the anchor)."""
    import timm
    from timm.optim import create_optimizer_v2

    torch.manual_seed(0)
    options = {k: v for k, v in sizes.model.items() if k != "model"}
    model = timm.create_model(sizes.model["model"], pretrained=False, num_classes=sizes.classes, img_size=sizes.img, **options).to(device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=5e-4, weight_decay=0.05)
    forward = torch.compile(model) if compiled else model
    images, targets = synthetic_batch(sizes, device)
    model.train()

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def steps(n: int) -> None:
        for _ in range(n):
            step()

    timed(device, lambda: steps(sizes.warmup))
    return sizes.batch * sizes.steps / timed(device, lambda: steps(sizes.steps))


def tgo_setup(sizes: Sizes, device: torch.device, *, compiled: bool = False, recipe: bool = False):
    """A Setup from tgo.train.build: the anchor's model, batch, optimiser and loss (plain
    cross-entropy, no mixup, no EMA) with the probe off, or with `recipe` tgo1's own training
    recipe (label smoothing, mixup, cutmix, EMA, drop path 0.1); its training loader replaced by
    the anchor's images, already on the device."""
    from tgo.config import resolve
    from tgo.train import build

    plain = dict(smoothing=0.0, mixup=0.0, cutmix=0.0, model_ema=False, drop_path=0.0, repeated_aug=0)
    cfg = resolve(
        "tgo1",
        **({} if recipe else plain),
        **sizes.model,
        dataset="synthetic",
        num_classes=sizes.classes,
        img_size=sizes.img,
        batch_size=sizes.batch,
        synthetic_train_size=sizes.batch,
        synthetic_val_size=8,
        probe_every=0,
        weight_spectra=False,
        workers=0,
        device=str(device),
        amp="bf16" if device.type == "cuda" else "off",
        compile=compiled,
        system_metrics=False,
    )
    return build(cfg)


def tgo_rate(s, sizes: Sizes) -> float:
    """Images per second of tgo's train_one_epoch over the anchor's batch (warm-up epoch first)."""
    from tgo.train import train_one_epoch

    batch = synthetic_batch(sizes, s.device)
    s.train_loader = [batch] * sizes.warmup
    timed(s.device, lambda: train_one_epoch(s, 1))
    s.train_loader = [batch] * sizes.steps
    return sizes.batch * sizes.steps / timed(s.device, lambda: train_one_epoch(s, 2))


# --------------------------------------------------------------------------------------------------
# the probe beside bare inference
# --------------------------------------------------------------------------------------------------


def probe_costs(model: torch.nn.Module, sizes: Sizes, device: torch.device) -> dict[str, float]:
    """Seconds for bare bf16 inference and for tgo's probe (tgo1's settings) over the same images,
    eigendecompositions on the device and on the host; medians over `rounds` alternations, after
    one untimed round of each."""
    from tgo.config import resolve
    from tgo.probe import probe_model

    cfg = resolve("tgo1", data_dir="unused")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(sizes.probe_images, 3, sizes.img, sizes.img, generator=g).to(device)
    batches = [(images[i : i + sizes.probe_batch], torch.zeros(0)) for i in range(0, sizes.probe_images, sizes.probe_batch)]
    model.eval()

    @torch.no_grad()
    def infer() -> None:
        with autocast(device):
            for x, _ in batches:
                model(x)

    def probe(solver: str) -> Callable[[], object]:
        return lambda: probe_model(model, batches, cfg, device, eigensolver=solver)

    runs = {"inference": infer, "device": probe("torch"), "host": probe("numpy")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate views at initialisation
        for fn in runs.values():
            timed(device, fn)
        for _ in range(sizes.rounds):
            for name, fn in runs.items():
                times[name].append(timed(device, fn))
    return {name: statistics.median(t) for name, t in times.items()}


def eigen_floor(device: torch.device, dim: int, count: int) -> dict[str, float]:
    """Seconds for `count` float64 eigendecompositions of dim x dim symmetric matrices: numpy one at
    a time on the host, and torch.linalg.eigvalsh of the stack on `device` (with the transfers)."""
    import numpy as np

    from tgo.accumulate import batched_eigvalsh

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * dim, dim))
    mats = [x.T @ x / len(x)] * count
    batched_eigvalsh(mats[:2], device)  # the solver's first call initialises it
    host = timed(device, lambda: [np.linalg.eigvalsh(m) for m in mats])
    dev = timed(device, lambda: batched_eigvalsh(mats, device))
    return {"host": host, "device": dev}


# --------------------------------------------------------------------------------------------------
# the rest of an epoch: weight spectra, kept features, the checkpoint
# --------------------------------------------------------------------------------------------------


def weight_costs(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Seconds of the weight spectra's SVDs batched on the device and one by one on the host, and
    of WeightWatcher's alpha (its own SVDs and power-law fits, the same whichever path)."""
    from tgo import weights

    mats = weights.matrices(model)
    weights.singular_values(mats, batched=True)  # the solver's first call initialises it
    return {
        "device": timed(device, lambda: weights.singular_values(mats, batched=True)),
        "host": timed(device, lambda: weights.singular_values(mats, batched=False)),
        "weightwatcher": timed(device, lambda: weights.weightwatcher_alphas(model)),
    }


def similarity_cost(dim: int, images: int, sites: int) -> float:
    """Seconds of the kept features' similarity and intrinsic dimension at a kept epoch (host, numpy)."""
    import numpy as np

    from tgo.similarity import feature_metrics

    rng = np.random.default_rng(0)
    names = ["patch_embed", "pos_embed", *[f"block_{i:02d}" for i in range(sites - 3)], "final"]
    features = {
        (s, v): rng.normal(size=(images, dim)).astype(np.float16)
        for s in names
        for v in ("cls", "mean")
        if s != "patch_embed" or v == "mean"
    }
    start = time.perf_counter()
    feature_metrics(features, features)
    return time.perf_counter() - start


def checkpoint_stall(s, sizes: Sizes, workdir: Path) -> tuple[float, float]:
    """(stall, write): the seconds tgo's loop spends on one epoch's checkpoint (the snapshot, the
    submit, and the join at the next epoch's submit), and the seconds the write itself took (its
    time/checkpoint_s), in a local MLflow store as tgo's run writes it."""
    from tgo import tracking
    from tgo.recording import EpochCommitter, cpu_copy
    from tgo.train import _checkpoint, train_one_epoch

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    run_id = tracking.start_run("bench-gpu").info.run_id
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    committer = EpochCommitter(run_id, str(scratch), background=s.device.type != "cpu")  # as tgo.train decides
    batch = synthetic_batch(sizes, s.device)
    s.train_loader = [batch] * sizes.steps
    metrics: dict[str, float] = {"train/loss": 1.0}
    stall = 0.0
    for epoch in (1, 2):
        train_one_epoch(s, epoch)  # the epoch the write overlaps
        sync(s.device)
        start = time.perf_counter()
        committer.wait()  # what the next submit joins first
        if epoch == 2:
            stall += time.perf_counter() - start
            break
        checkpoint = _checkpoint(s, epoch, metrics, run_id)
        if committer.background:
            checkpoint = cpu_copy(checkpoint)
        committer.submit(epoch, 2, checkpoint, None, None, metrics)
        stall += time.perf_counter() - start
    write = tracking.MlflowClient().get_metric_history(run_id, "time/checkpoint_s")[0].value
    tracking.end_run("FINISHED")
    return stall, write


# --------------------------------------------------------------------------------------------------
# train_ddp on NCCL
# --------------------------------------------------------------------------------------------------


def ddp_smoke(workdir: Path) -> str:
    """One smoke epoch of train_ddp under torchrun on the GPU, then `nccl_check` in a group of one."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/ddp.db", "OMP_NUM_THREADS": "4", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    train = [str(ROOT / "entrypoints" / "train.py"), "--preset", "smoke", "--epochs", "1", "--device", "cuda", "--experiment", "bench-ddp"]
    check = [str(Path(__file__).resolve()), "--nccl-check"]
    for label, cmd in (("train_ddp", [*torchrun, *train]), ("the NCCL check", [*torchrun, *check])):
        proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=240)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return f"failed (rc {proc.returncode} from {label}: {last})"
    return "ok"


def nccl_check() -> None:
    """Under torchrun: an NCCL group of this one process, tgo's probe with its sums all-reduced and
    its kept features gathered over the group, and a DDP training step."""
    import torch.distributed as dist
    from timm.models.vision_transformer import VisionTransformer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tgo.probe import probe

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    try:
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).to(device)
        images = torch.randn(16, 3, 32, 32, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            here = probe(model, [images], folds=5, keep_features=True, distributed=False)
            group = probe(model, [images], folds=5, keep_features=True, distributed=True)
        key = ("final", "cls")
        assert abs(group[key].observables["effective_rank"] - here[key].observables["effective_rank"]) < 1e-9
        assert group.features[key].shape == here.features[key].shape
        ddp = DDP(model, device_ids=[device.index])
        F.cross_entropy(ddp(images), torch.zeros(16, dtype=torch.long, device=device)).backward()
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check that every line prints")
    parser.add_argument("--nccl-check", action="store_true", help=argparse.SUPPRESS)  # the child of train_ddp_nccl
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this checkout's tgo, whatever else is installed
    if args.nccl_check:
        nccl_check()
        return
    from tgo.runtime import resolve_device

    device = resolve_device(args.device)
    sizes = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="tgo-bench-gpu-"))
    os.chdir(workdir)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    say(
        f"# {name}; torch {torch.__version__}; {sizes.model['model']} at {sizes.img} px, batch {sizes.batch}{' (--quick)' if args.quick else ''}"
    )
    wall = time.perf_counter()

    rates: dict[str, float] = {}

    def anchor() -> str:
        rates["timm_eager"] = timm_rate(sizes, device, compiled=False)
        rates["timm_compiled"] = timm_rate(sizes, device, compiled=True)
        return f"eager {rates['timm_eager']:.0f} compiled {rates['timm_compiled']:.0f}"

    measured("timm_images_per_s", anchor)

    peak: dict[str, float] = {}

    def tgo_loop() -> str:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rates["tgo_eager"] = tgo_rate(tgo_setup(sizes, device), sizes)
        if device.type == "cuda":
            peak["eager"] = torch.cuda.max_memory_allocated(device) / 2**30
        rates["tgo_compiled"] = tgo_rate(tgo_setup(sizes, device, compiled=True), sizes)
        say(f"# tgo images/s: eager {rates['tgo_eager']:.0f} compiled {rates['tgo_compiled']:.0f}")
        return f"eager {rates['tgo_eager'] / rates['timm_eager']:.3f} compiled {rates['tgo_compiled'] / rates['timm_compiled']:.3f}"

    measured("tgo_over_timm_throughput", tgo_loop)
    measured(
        "peak_memory_gb_batch256",
        lambda: f"{peak['eager']:.1f}" + (f" (--quick: batch {sizes.batch})" if args.quick else "") if peak else "skipped (no CUDA)",
    )

    recipe = tgo_setup(sizes, device, recipe=True)  # tgo1's training recipe, for the epoch's share and its checkpoint
    costs: dict[str, float] = {}

    def probe_ratio() -> str:
        rates["tgo1_recipe"] = tgo_rate(recipe, sizes)
        say(f"# tgo1 recipe (label smoothing, mixup, cutmix, EMA, drop path 0.1), eager: {rates['tgo1_recipe']:.0f} images/s")
        costs.update(probe_costs(recipe.model, sizes, device))
        say(
            f"# seconds over {sizes.probe_images} images: {'bf16' if device.type == 'cuda' else 'float32'} inference {costs['inference']:.3f}, probe with the "
            f"eigendecompositions on the device {costs['device']:.3f}, on the host {costs['host']:.3f}"
        )
        floor = eigen_floor(device, int(recipe.model.embed_dim), 528)
        say(
            f"# 528 float64 eigendecompositions of the probe (44 site/views x 6 x 2): host {floor['host']:.2f} s, device {floor['device']:.2f} s"
        )
        return f"device {costs['device'] / costs['inference']:.3f} host {costs['host'] / costs['inference']:.3f}"

    measured("probe_over_inference_gpu", probe_ratio)

    def probe_share() -> str:
        per_image_val = costs["inference"] / sizes.probe_images  # bf16 inference, as validation runs
        train = TGO1_TRAIN / rates["tgo1_recipe"]
        probe_s = costs["device"] * TGO1_PROBE / sizes.probe_images  # per image: scaled to 1000 in --quick
        epoch = train + TGO1_VAL * per_image_val + probe_s
        say(
            f"# tgo1 epoch estimate: {epoch:.0f} s (train {train:.0f} s, validation {TGO1_VAL * per_image_val:.1f} s, probe {probe_s:.1f} s)"
        )
        return f"{probe_s / epoch:.4f}"

    measured("probe_share_tgo1_gpu", probe_share)

    def weights_and_features() -> None:
        w = weight_costs(recipe.model, device)
        say(
            f"# weight spectra SVDs: batched on the device {w['device']:.2f} s, one by one on the host {w['host']:.2f} s; WeightWatcher's alpha {w['weightwatcher']:.2f} s"
        )
        sim = similarity_cost(int(recipe.model.embed_dim), sizes.probe_images, len(recipe.model.blocks) + 3)
        say(f"# kept features' similarity and intrinsic dimension at a kept epoch (host): {sim:.2f} s")

    try:
        weights_and_features()
    except Exception:  # noqa: BLE001 - context lines only
        traceback.print_exc()

    def stall() -> str:
        stalled, write = checkpoint_stall(recipe, sizes, workdir)
        where = "background write" if device.type != "cpu" else "written in line on the CPU"
        return f"{stalled:.3f} (the write itself {write:.2f} s, {where})"

    measured("checkpoint_stall_s", stall)
    measured("train_ddp_nccl", lambda: ddp_smoke(workdir) if device.type == "cuda" else "skipped (no CUDA)")
    say(f"# wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
