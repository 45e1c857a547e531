"""The training step as a GPU runs it, checked on the CPU: no host read per step, torch.compile
with everything around the step, the optimiser's implementation, the per-update schedule."""

import math
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import tgo
from tgo import train
from tgo.config import resolve
from tgo.errors import TrainingError

# The ways a host reads a tensor's values: on a GPU each waits until the device has done everything queued.
HOST_READS = ("item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__format__")
# Whose reads count: tgo's loop and what timm does around the step (mixup, loss, EMA, schedule).
# torch's own are not the loop's (its optimisers' step counters are host tensors on every device;
# torchvision's transforms run in the loader on host images).
AROUND_THE_STEP = (Path(tgo.__file__).parent, Path(__import__("timm").__file__).parent)


def _setup(**overrides) -> train.Setup:
    """The smoke preset cut to one block on the CPU, with `overrides`."""
    return train.build(resolve("smoke", device="cpu", depth=1, **overrides))


def _host_reads_in_an_epoch(monkeypatch, steps: int) -> int:
    s = _setup(synthetic_train_size=8 * steps, batch_size=8, mixup=0.8, grad_clip=1.0, model_ema=True)
    assert len(s.train_loader) == steps
    count = 0

    def counted(original):
        def read(self, *args, **kwargs):
            nonlocal count
            caller = Path(sys._getframe(1).f_code.co_filename)
            count += any(caller.is_relative_to(root) for root in AROUND_THE_STEP)
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
        train.train_one_epoch(s, 1)
    return count


def test_an_epoch_reads_the_device_a_fixed_number_of_times_whatever_its_steps(monkeypatch):
    # Each read is a wait for the GPU: one per step (loss.item(), the bar, the finiteness check)
    # kept the device idle while the host prepared the next step.
    assert train.HOST_READ_EVERY > 16  # both epochs fit in one window of the loop's reads
    few, many = _host_reads_in_an_epoch(monkeypatch, 4), _host_reads_in_an_epoch(monkeypatch, 16)
    assert few == many, f"host reads grow with the steps: {few} in 4 steps, {many} in 16"
    assert few <= 3


def test_a_non_finite_loss_stops_within_a_window_and_names_its_own_step(monkeypatch):
    every, bad = 3, 4  # reads after steps 3, 6, 9; the loss of step 4 (0-based) is NaN
    monkeypatch.setattr(train, "HOST_READ_EVERY", every)
    s = _setup(synthetic_train_size=80, batch_size=8)  # 10 steps
    loss_fn, steps = s.loss_fn, []

    def poisoned(logits, targets):
        steps.append(len(steps))
        loss = loss_fn(logits, targets)
        return loss * math.nan if len(steps) == bad + 1 else loss

    s.loss_fn = poisoned
    with pytest.raises(TrainingError) as err:
        train.train_one_epoch(s, 1)
    assert str(err.value).startswith(f"non-finite training loss (nan) at epoch 1, after {8 * bad} images.")
    assert "last good checkpoint" in str(err.value)
    assert bad < len(steps) <= bad + every  # stopped at the first read after it, not at the epoch's end


def test_adamw_is_fused_on_cuda_and_left_to_torchs_default_on_the_cpu():
    from timm.optim import create_optimizer_v2

    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    assert train.optimizer_kwargs("adamw", cuda) == train.optimizer_kwargs("Adam", cuda) == {"fused": True}
    assert train.optimizer_kwargs("lookahead_adamw", cuda) == {"fused": True}  # timm's AdamW inside Lookahead
    assert train.optimizer_kwargs("sgd", cuda) == train.optimizer_kwargs("lamb", cuda) == {}  # torch picks foreach itself
    assert train.optimizer_kwargs("adamw", cpu) == {}
    # What the set-up makes for a CUDA device: the kwargs reach torch's AdamW through timm.
    s = _setup()
    fused, *_ = train._optimisation(s.cfg, s.model, torch.device("cuda"), None, len(s.train_loader))
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"] is True
    # The CPU keeps the default implementation, and the fused one computes the same updates.
    assert s.optimizer.defaults["fused"] is None and s.optimizer.defaults["foreach"] is None
    weights = []
    for extra in ({}, {"fused": True}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05, **extra)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 6)).square().mean().backward()
            opt.step()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)


def _lrs_per_update(monkeypatch, **overrides) -> list[list[float]]:
    """The lr each optimiser update of epochs 1-3 ran at (4 updates an epoch, probe off)."""
    s = _setup(epochs=3, warmup_epochs=2, lr=1e-3, warmup_lr=1e-6, min_lr=1e-6, synthetic_train_size=64, batch_size=16, synthetic_val_size=8,
               probe_every=0, **overrides)
    seen: list[float] = []
    step = s.optimizer.step
    monkeypatch.setattr(s.optimizer, "step", lambda *a, **k: (seen.append(s.optimizer.param_groups[0]["lr"]), step(*a, **k))[1])
    out = []
    for epoch in (1, 2, 3):
        train.run_epoch(s, epoch)
        out.append(seen[:])
        seen.clear()
    return out


def test_the_schedule_steps_per_update_or_per_epoch(monkeypatch):
    peak, start, low = 1e-3, 1e-6, 1e-6

    def cosine(t: float, length: float) -> float:  # timm's cosine without a warm-up prefix
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / length))

    # Per update (demo, smoke): the warm-up rises within epoch 1 (8 updates over 2 epochs).
    per_update = _lrs_per_update(monkeypatch, sched_on_updates=True)
    expected = [start + k * (peak - start) / 8 for k in range(8)] + [cosine(k, 12) for k in range(8, 12)]
    assert sum(per_update, []) == pytest.approx(expected, rel=1e-9)
    # Per epoch (tgo1, DeiT's): epoch 1 runs at warmup_lr throughout.
    per_epoch = _lrs_per_update(monkeypatch, sched_on_updates=False)
    assert per_epoch == [[start] * 4, [pytest.approx(start + (peak - start) / 2)] * 4, [pytest.approx(cosine(2, 3))] * 4]


def test_the_presets_step_their_schedule_as_documented():
    assert resolve("demo").sched_on_updates and resolve("smoke").sched_on_updates
    assert not resolve("tgo1", data_dir="/x").sched_on_updates  # DeiT steps per epoch
    from tgo.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="sched_on_updates: plateau steps once per epoch"):
        resolve("demo", sched="plateau")
    saved = resolve("demo").to_dict()
    del saved["sched_on_updates"]  # a run saved before the setting existed stepped per epoch
    assert from_dict(saved).sched_on_updates is False


@pytest.mark.slow
def test_compiled_training_matches_eager_with_ema_mixup_clipping_probe_and_resume(store, tmp_path):
    # About 45 s on a 2-core CPU with a cold inductor cache (its compile), 15 s warm.
    settings = dict(preset="smoke", depth=1, epochs=2, model_ema=True, mixup=0.8, grad_clip=1.0, device="cpu", experiment="compile")
    eager = train.run(**settings, run_name="eager")

    def stop(epoch, _):
        if epoch == 1:
            raise train.StopTraining("interrupted for the test")

    with pytest.raises(train.StopTraining):  # compiled epoch 1 (the probe's hooks on the bare model at epochs 0 and 1)
        train.run(**settings, compile=True, run_name="compiled", epoch_callback=stop)
    (stopped,) = mlflow.search_runs(experiment_names=["compile"], filter_string="attributes.run_name = 'compiled'", output_format="list")
    compiled = train.run(preset="smoke", resume=stopped.info.run_id, compile=True)  # compiled again, from its checkpoint
    client = MlflowClient()
    for key in ("train/loss", "train/acc1", "val/loss", "val_ema/loss", "geom/final/cls/effective_rank"):
        a = {m.step: m.value for m in client.get_metric_history(eager.run_id, key)}
        b = {m.step: m.value for m in client.get_metric_history(compiled.run_id, key)}
        assert sorted(b) == sorted(a) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-6), (key, step)
    path = mlflow.artifacts.download_artifacts(run_id=compiled.run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"].keys() == ckpt["ema"].keys() and not any("_orig_mod" in k for k in ckpt["model"])
