import os

import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


def tiny_vit(seed: int = 0, **kwargs):
    """A 2-block ViT (32 px, 8 px patches -> 16 patch tokens, width 32) built through timm."""
    import timm

    torch.manual_seed(seed)
    options = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    options.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**options)


@pytest.fixture
def vit():
    return tiny_vit()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 3, 32, 32, generator=g)
