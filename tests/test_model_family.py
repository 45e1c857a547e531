"""More of timm's ViT family: DINOv2's register models and EVA-02 are probed like a ViT (their
sites, views and weight matrices checked against the model's own tensors, read with forward hooks
and its state dict, not through the probe), and models of another layout are refused by name of
what they lack."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import timm
import torch

from helpers import sqlite_store, subprocess_env, tiny_vit
from tgo import spectral
from tgo.config import resolve
from tgo.errors import ConfigError
from tgo.model import create_model
from tgo.probe import head_view, probe, site_names
from tgo.weights import weight_spectra

SMALL = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=2, num_classes=5)
T = 16  # patch tokens: 32 px images, 8 px patches


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        return fn(*args, **kwargs)


def _residual_stream(model, images):
    """Each block's whole output (B, prefix + T, D) and the patch_embed and _pos_embed outputs,
    from forward hooks on the model's modules in one ordinary forward."""
    seen = {}
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patch_embed", o))]
    hooks += [b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block_{k:02d}", o)) for k, b in enumerate(model.blocks)]
    hooks.append(model.blocks[0].register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("pos_embed", args[0]), with_kwargs=True))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return seen


def _assert_observables(got, rows):
    want = spectral.observables(rows)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-7, abs=1e-10), name


def test_dinov2_registers_stay_out_of_the_patch_view_and_cls_is_the_class_token():
    """vit_small_patch14_reg4_dinov2 made small: 1 class token, then 4 registers, then the patches."""
    model = timm.create_model("vit_small_patch14_reg4_dinov2", **SMALL).double().eval()
    assert model.num_prefix_tokens == 5 and model.reg_token.shape[1] == 4
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = _quiet(probe, model, [images[:10], images[10:]], folds=1, keep_features=True)
    assert site_names(model) == ["patch_embed", "pos_embed", "block_00", "block_01", "final"] and head_view(model) == ("final", "cls")
    stream = {site: x.numpy() for site, x in _residual_stream(model, images).items()}
    pos = stream["pos_embed"]  # DINOv2 adds no position embedding to its prefix tokens: they are the parameters
    np.testing.assert_array_equal(pos[:, 0], np.broadcast_to(model.cls_token[0, 0].detach().numpy(), pos[:, 0].shape))
    np.testing.assert_array_equal(pos[:, 1:5], np.broadcast_to(model.reg_token[0].detach().numpy(), pos[:, 1:5].shape))
    # pos_embed/cls is the class token itself, not a register
    np.testing.assert_allclose(result.features[("pos_embed", "cls")], pos[:, 0], rtol=1e-3, atol=1e-3)
    for site in ("block_00", "block_01"):
        x = stream[site]
        patches = x[:, 5:]
        assert result[(site, "patch")].n_samples == 24 * T
        _assert_observables(result[(site, "patch")].observables, patches.reshape(-1, 32))
        _assert_observables(result[(site, "cls")].observables, x[:, 0])
        _assert_observables(result[(site, "mean")].observables, patches.mean(axis=1))
        np.testing.assert_allclose(result.features[(site, "cls")], x[:, 0], rtol=2e-3, atol=2e-3)
        with_registers = spectral.observables(x[:, 1:].reshape(-1, 32))  # what the patch view would be with them
        assert with_registers["effective_rank"] != pytest.approx(result[(site, "patch")].observables["effective_rank"], rel=1e-6)
    final = model.norm(torch.from_numpy(stream["block_01"])).detach().numpy()
    _assert_observables(result[("final", "cls")].observables, final[:, 0])
    _assert_observables(result[("final", "patch")].observables, final[:, 5:].reshape(-1, 32))


def test_eva02_sites_views_and_head_against_its_own_modules():
    """eva02_tiny_patch14_224 made small: rotary position embedding (its _pos_embed returns a tuple),
    pooled by average, fc_norm before the head."""
    model = timm.create_model("eva02_tiny_patch14_224", **SMALL).double().eval()
    assert type(model).__module__ == "timm.models.eva" and model.global_pool == "avg"
    images = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result = _quiet(probe, model, [images], folds=1)
    assert site_names(model) == ["patch_embed", "pos_embed", "block_00", "block_01", "final"] and head_view(model) == ("final", "mean")
    stream = {site: x.detach() for site, x in _residual_stream(model, images).items()}
    patch = stream["patch_embed"].numpy()
    _assert_observables(result[("patch_embed", "patch")].observables, patch.reshape(-1, 32))
    pos = patch + model.pos_embed[0, 1:].detach().numpy()  # EVA-02: the absolute position embedding of each patch
    _assert_observables(result[("pos_embed", "patch")].observables, pos.reshape(-1, 32))
    last = stream["block_01"].numpy()
    _assert_observables(result[("block_01", "patch")].observables, last[:, 1:].reshape(-1, 32))
    _assert_observables(result[("block_01", "cls")].observables, last[:, 0])
    head_input = model.fc_norm(stream["block_01"][:, 1:].mean(dim=1)).detach().numpy()  # model.norm is the identity here
    _assert_observables(result[("final", "mean")].observables, head_input)
    _assert_observables(result[("final", "cls")].observables, last[:, 0])


def test_eva_weight_spectra_name_separate_q_k_v_and_swiglu_matrices():
    """EVA-02 CLIP's layout (separate q/k/v projections, SwiGLU with fc1_g and fc1_x): each matrix
    gets its own weights/<kind>/<site>/... keys, its singular values those of the model's tensor."""
    model = timm.create_model("eva02_base_patch16_clip_224", **SMALL)
    spectra = weight_spectra(model)
    kinds = ["q_proj", "k_proj", "v_proj", "proj", "fc1_g", "fc1_x", "fc2"]
    assert list(spectra.observables) == ["patch_embed/patch_embed", *[f"block_{b:02d}/{k}" for b in (0, 1) for k in kinds], "final/head"]
    keys = spectra.metrics()
    state = model.state_dict()
    for block in (0, 1):
        for kind in kinds:
            part = "attn" if kind.endswith("proj") else "mlp"
            s = np.linalg.svd(state[f"blocks.{block}.{part}.{kind}.weight"].double().numpy(), compute_uv=False)
            key = f"weights/{kind}/block_{block:02d}/stable_rank"
            assert keys[key] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9), key
            assert f"weights/{kind}/block_{block:02d}/effective_rank" in keys
    # a ViT's matrices keep their keys
    assert "weights/qkv/block_00/stable_rank" in weight_spectra(tiny_vit()).metrics()


def test_kept_features_have_no_cls_where_the_model_has_only_registers():
    """A model without a class token but with registers: a register is not its class token."""
    model = tiny_vit(class_token=False, global_pool="avg", reg_tokens=2)
    result = _quiet(probe, model, [torch.randn(12, 3, 32, 32)], folds=1, keep_features=True)
    assert {view for _, view in result.features} == {"mean"}
    assert not any(view == "cls" for _, view in result.geometry)


@pytest.mark.parametrize(
    ("model", "missing"),
    [
        ("resnet18", "no patch_embed"),
        ("convit_tiny", "no _pos_embed"),
        ("xcit_nano_12_p16_224", "forward_intermediates takes no return_prefix_tokens"),
        ("deit_tiny_distilled_patch16_224", "its head is not fed by the class token alone"),
        ("vit_base_patch16_siglip_224", "it pools by 'map'"),
    ],
)
def test_other_models_are_refused_naming_what_they_lack(model, missing):
    with pytest.raises(ConfigError, match=f"model: tgo cannot probe {model} .*{missing}"):
        create_model(resolve("smoke", model=model, depth=1), 4)


def test_the_family_builds_on_the_smoke_preset():
    for name in ("eva02_tiny_patch14_224", "vit_small_patch14_reg4_dinov2", "vit_tiny_patch16_224"):
        model = create_model(resolve("smoke", model=name), 4)
        assert len(model.blocks) == 2 and model.patch_embed.patch_size == (8, 8), name


def test_tgo_train_refuses_swin_with_one_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tgo", "train", "--preset", "smoke", "--model", "swin_tiny_patch4_window7_224"],
        env=subprocess_env(sqlite_store(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tgo: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tgo cannot probe swin_tiny_patch4_window7_224 (timm.models.swin_transformer.SwinTransformer)" in lines[0]
    assert "no _pos_embed" in lines[0] and "no blocks" in lines[0] and "return_prefix_tokens" in lines[0]


@pytest.mark.slow
def test_tgo_train_eva02_on_the_smoke_preset(tmp_path):
    """`tgo train --model eva02_tiny_patch14_224` trains and probes every epoch, weight spectra too,
    its head view final/mean (EVA-02 pools by average)."""
    from mlflow.tracking import MlflowClient

    uri = sqlite_store(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tgo", "train", "--preset", "smoke", "--model", "eva02_tiny_patch14_224", "--epochs", "1",
         "--weight_spectra", "true", "--run_name", "eva"],
        env=subprocess_env(uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["tgo.model"] == "eva02_tiny_patch14_224"
    assert run.data.tags["tgo.head_view"] == "final/mean"
    client = MlflowClient(uri)
    for key in ("geom/final/mean/effective_rank", "geom_se/final/mean/effective_rank", "geom/block_01/patch/effective_rank",
                "geom/block_00/cls/stable_rank", "weights/qkv/block_01/stable_rank", "weights/fc1/block_00/effective_rank"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1], key
