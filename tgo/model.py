"""The ViT, from timm, never with pretrained weights (nothing is fetched from a hub), and what makes a
timm model one tgo can probe.

tgo accepts a model by what it can do, not by its module's name: any timm model with the ViT token
layout is probed the same way, whichever file of timm defines it (vision_transformer, deit, eva, ...).
The layout, as `tgo.probe` reads it:

  - `patch_embed` makes the patch tokens, `_pos_embed` prepends the class and register tokens and
    adds the position embedding (EVA's also returns its rotary embedding, as a tuple), and every
    block of `blocks` maps one sequence [prefix tokens, patch tokens] of width `embed_dim` to
    another of the same shape; `num_prefix_tokens` says how many prefix tokens there are, the
    class token (if any) first;
  - `forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)` gives every block's
    output with the prefix tokens apart from the patch tokens, and the final-normed tokens;
  - the head is fed by the class token (global_pool "token") or by the pooled patch tokens
    (global_pool "avg"), through `forward_head(tokens, pre_logits=True)`.

`probe_gaps` checks the parts (cheap, every probe); `layout_gaps` runs two images through the model
once and checks the shapes and the head's input, which catches what the names alone cannot: a
hierarchical model (swin), one whose class token joins late (cait, xcit), DeiT's distilled models
(whose head averages the class and distillation tokens).
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import timm
import torch

from tgo.config import ConfigError, TrainConfig

POOLS = ("token", "avg")  # timm global_pool values whose head input the probe measures
FITS = (
    "tgo probes timm ViTs whose blocks all carry one sequence of class/register tokens and patch tokens of one width, "
    "e.g. vit_* (DINOv2's register models included), deit_* (not the distilled ones), eva02_* "
    "(timm.list_models('vit_*'), timm.list_models('eva*'))"
)

# The parts the probe uses, and what each is for (the message names the missing ones).
_PARTS = {
    "patch_embed": "which makes the patch tokens, the patch_embed site",
    "_pos_embed": "which prepends the class/register tokens and adds the position embedding, the pos_embed site",
    "blocks": "one sequence of transformer blocks, the block sites",
    "embed_dim": "one token width",
    "num_prefix_tokens": "the class/register token layout",
    "forward_head": "which gives the head's input",
}


def probe_gaps(model: torch.nn.Module) -> list[str]:
    """What the probe needs of a model and `model` lacks, each named with what it is for (empty: none
    is missing). Attributes and signatures only, no forward: `layout_gaps` checks the shapes."""
    gaps = [f"no {name} ({purpose})" for name, purpose in _PARTS.items() if not hasattr(model, name)]
    forward = getattr(model, "forward_intermediates", None)
    if forward is None:
        gaps.insert(0, "no forward_intermediates (timm's per-block outputs)")
    else:
        params = inspect.signature(forward).parameters
        if "return_prefix_tokens" not in params or "output_fmt" not in params:
            gaps.insert(
                0, "its forward_intermediates takes no return_prefix_tokens (the class/register tokens kept apart from the patch tokens)"
            )
    return gaps


def pooling_gap(model: torch.nn.Module) -> str | None:
    """Why the probe cannot say what feeds this model's head (None: it can)."""
    pool = getattr(model, "global_pool", "token")
    if pool not in POOLS or getattr(model, "attn_pool", None) is not None:
        return (
            f"it pools by {pool!r}: the probe measures what feeds the head of a ViT pooled by its class token or by "
            "the average of its patch tokens (global_pool 'token' or 'avg'); create it with global_pool='token' or 'avg'"
        )
    if pool == "token" and getattr(model, "cls_token", None) is None:
        return "it pools by its class token (global_pool='token') but has none (class_token=False); create it with global_pool='avg'"
    return None


def _first(x: Any) -> Any:
    """EVA's `_pos_embed` returns (tokens, rotary embedding); a ViT's returns the tokens."""
    return x[0] if isinstance(x, tuple) else x


@torch.no_grad()
def layout_gaps(model: torch.nn.Module, img_size: int) -> list[str]:
    """What is not the ViT token layout in one forward of two random images (img_size px, drawn from
    a private generator: the global RNG is untouched, and the model's train/eval flags are put back):

      - `patch_embed` runs once and gives T tokens of width D = embed_dim;
      - `_pos_embed` of them gives P + T tokens (P = num_prefix_tokens);
      - `forward_intermediates` gives one (patch (T), prefix (P)) pair of width D per block, and
        P + T final tokens;
      - in a model pooled by its class token, `forward_head(pre_logits=True)` is that class token
        (the probe's final/cls); otherwise D features (its final/mean).

    Call it after `probe_gaps` and `pooling_gap` have found nothing."""
    vit: Any = model  # the attributes probe_gaps found, untyped in torch's Module
    param = next(model.parameters())
    images = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    captured: list[torch.Tensor] = []
    hook = vit.patch_embed.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        final, blocks = vit.forward_intermediates(images, output_fmt="NLC", return_prefix_tokens=True)
        dim, n_prefix = int(vit.embed_dim), int(vit.num_prefix_tokens)
        if len(captured) != 1 or not torch.is_tensor(captured[0]) or captured[0].shape[-1] != dim:
            return [f"its patch_embed does not give one set of tokens of width embed_dim={dim} (a non-token-sequence model)"]
        n_patch = captured[0][0].numel() // dim
        tokens = (2, n_prefix + n_patch, dim)
        gaps = []
        pos = _first(vit._pos_embed(captured[0]))
        if not torch.is_tensor(pos) or tuple(pos.shape) != tokens:
            gaps.append(f"its _pos_embed does not give {n_prefix} prefix + {n_patch} patch tokens")
        shapes = [tuple(t.shape for t in b) if isinstance(b, tuple) else (b.shape,) for b in blocks]
        want = ((2, n_patch, dim), (2, n_prefix, dim)) if n_prefix else ((2, n_patch, dim),)
        if len(shapes) != len(vit.blocks) or any(s != want for s in shapes):
            gaps.append(
                f"its blocks do not all carry {n_prefix} prefix + {n_patch} patch tokens of width {dim} "
                "(a hierarchical model, or blocks that differ)"
            )
        if not torch.is_tensor(final) or tuple(final.shape) != tokens:
            gaps.append(f"its final tokens are not {n_prefix} prefix + {n_patch} patch tokens of width {dim}")
        if gaps:
            return gaps
        head_input = vit.forward_head(final, pre_logits=True)
        if not torch.is_tensor(head_input) or tuple(head_input.shape) != (2, dim):
            return [f"its forward_head(pre_logits=True) does not give {dim} features per image"]
        if getattr(model, "global_pool", "token") == "token" and not torch.allclose(head_input, final[:, 0]):
            return [
                "its head is not fed by the class token alone (forward_head(pre_logits=True) is not final/cls: "
                "e.g. DeiT's distillation token averaged in, or an fc_norm after token pooling)"
            ]
        return []
    finally:
        hook.remove()
        for module, mode in modes:
            module.training = mode


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """timm.create_model(cfg.model, pretrained=False) at cfg.img_size with num_classes outputs, once
    it is found to be a model tgo can probe (`probe_gaps`, `pooling_gap`, `layout_gaps`; a
    ConfigError naming what is missing otherwise).

    patch_size and depth, when set (> 0), override the architecture's own (the smoke preset uses
    a 2-block ViT with 8 px patches); drop_path is the stochastic depth rate.
    """
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=num_classes, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
    if cfg.patch_size:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.depth:
        kwargs["depth"] = cfg.depth
    if not timm.is_model(cfg.model):
        raise ConfigError(f"model: {cfg.model!r} is not a timm model; e.g. vit_small_patch16_224 (timm.list_models('vit_*')).")
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except (TypeError, AssertionError, RuntimeError, ValueError) as err:
        as_defined = _as_defined(cfg.model)
        if as_defined is not None and (gaps := probe_gaps(as_defined)):
            raise ConfigError(f"model: tgo cannot probe {cfg.model} ({_kind(as_defined)}): {'; '.join(gaps)}. {FITS}.") from None
        raise ConfigError(f"model: cannot build {cfg.model} with {kwargs}: {str(err) or type(err).__name__}") from None
    gaps = probe_gaps(model)
    pooling = None if gaps else pooling_gap(model)
    if not gaps and not pooling:
        patch = getattr(cast(Any, model).patch_embed, "patch_size", None)
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        if isinstance(patch, int) and cfg.img_size % patch:
            raise ConfigError(f"img_size: {cfg.img_size} is not a multiple of the patch size {patch}.")
        gaps = layout_gaps(model, cfg.img_size)
    if gaps or pooling:
        raise ConfigError(f"model: tgo cannot probe {cfg.model} ({_kind(model)}): {'; '.join(gaps or [str(pooling)])}. {FITS}.")
    return model


def _kind(model: torch.nn.Module) -> str:
    """The model's class as its module spells it: timm.models.swin_transformer.SwinTransformer."""
    return f"{type(model).__module__}.{type(model).__name__}"


def _as_defined(name: str) -> torch.nn.Module | None:
    """The model as timm defines it, weightless (on the meta device), or None where that cannot be
    built either. A model that cannot be built with tgo's img_size, patch_size or depth (a CNN, a
    model with per-stage depths) is most likely no ViT: this copy says what it lacks, which is more
    use than the build's error."""
    try:
        return timm.create_model(name, pretrained=False, device="meta")
    except (TypeError, AssertionError, RuntimeError, ValueError, NotImplementedError):
        return None
