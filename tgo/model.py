"""The ViT, from timm, never with pretrained weights (nothing is fetched from a hub)."""

from __future__ import annotations

from typing import Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from tgo.config import ConfigError, TrainConfig


def create_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """timm.create_model(cfg.model, pretrained=False) at cfg.img_size with num_classes outputs.

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
    module = timm.models.model_entrypoint(cfg.model).__module__  # e.g. timm.models.vision_transformer
    if not module.endswith(("vision_transformer", "deit")):
        raise ConfigError(f"model: {cfg.model} ({module}) is not a timm VisionTransformer; tgo probes ViTs (vit_*, deit_*).")
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except (TypeError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"model: cannot build {cfg.model} with {kwargs}: {err}") from None
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "_pos_embed"):
        raise ConfigError(f"model: {cfg.model} is not a timm VisionTransformer; tgo probes ViTs (vit_*).")
    patch = cast(VisionTransformer, model).patch_embed.patch_size[0]  # a timm VisionTransformer (or DeiT's subclass), checked above
    if cfg.img_size % patch:
        raise ConfigError(f"img_size: {cfg.img_size} is not a multiple of the patch size {patch}.")
    return model
