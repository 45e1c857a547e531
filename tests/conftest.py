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


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _restore_mlflow_environment():
    """MLflow 3's set_experiment / set_tracking_uri write os.environ; keep tests from leaking them."""
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
