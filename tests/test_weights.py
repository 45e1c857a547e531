"""tgo.weights against closed forms and against WeightWatcher on the same small model."""

import numpy as np
import pytest
import torch

from helpers import tiny_vit
from tgo.weights import matrices, matrix_name, matrix_observables, weight_spectra


def test_a_matrix_with_known_singular_values():
    rng = np.random.default_rng(0)
    s = np.array([4.0, 2.0, 1.0, 1.0])
    u, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(5, 4)))
    w = u @ np.diag(s) @ v.T  # 6 x 5, rank 4
    sv = torch.linalg.svdvals(torch.from_numpy(w)).numpy()
    assert sv[:4] == pytest.approx(s, abs=1e-12) and sv[4] == pytest.approx(0, abs=1e-12)
    obs = matrix_observables(sv)
    assert obs["stable_rank"] == pytest.approx((16 + 4 + 1 + 1) / 16)
    p = s / s.sum()
    assert obs["effective_rank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-6)


def test_matrix_names_follow_the_probes_sites():
    assert matrix_name("blocks.3.attn.qkv.weight") == "block_03/qkv"
    assert matrix_name("blocks.11.mlp.fc2.weight") == "block_11/fc2"
    assert matrix_name("patch_embed.proj.weight") == "patch_embed/patch_embed"
    assert matrix_name("head.weight") == "final/head"
    assert matrix_name("blocks.0.norm1.weight") is None and matrix_name("blocks.0.attn.qkv.bias") is None
    names = list(matrices(tiny_vit()))
    assert names == ["patch_embed/patch_embed", "block_00/qkv", "block_00/proj", "block_00/fc1", "block_00/fc2",
                     "block_01/qkv", "block_01/proj", "block_01/fc1", "block_01/fc2", "final/head"]


def test_against_weightwatcher_on_the_same_model():
    import weightwatcher

    model = tiny_vit(embed_dim=64, num_heads=2, num_classes=10)
    result = weight_spectra(model)
    details = weightwatcher.WeightWatcher(model=model).analyze(plot=False, randomize=False, mp_fit=False)
    theirs = {matrix_name(f"{r.longname}.weight"): r for r in details.itertuples()}
    for name, obs in result.observables.items():
        if name.startswith("patch_embed"):
            continue  # a convolution: WeightWatcher splits it into its k x k slices, tgo reshapes it whole
        ww = theirs[name]
        assert obs["alpha"] == pytest.approx(ww.alpha, rel=1e-9), name
        assert obs["stable_rank"] == pytest.approx(ww.stable_rank, rel=1e-6), name  # computed here from tgo's own SVD
        assert result.singular_values[name][0] == pytest.approx(ww.sv_max, rel=1e-6), name
    keys = result.metrics()
    assert "weights/qkv/block_00/alpha" in keys and "weights/head/final/stable_rank" in keys
    assert all(np.isfinite(v) for v in keys.values())
    assert all(k in keys for name, obs in result.observables.items() for o, v in obs.items() if np.isfinite(v)
               for k in [f"weights/{name.split('/')[1]}/{name.split('/')[0]}/{o}"])


@pytest.mark.slow
def test_a_training_run_logs_weight_spectra_and_token_interaction(smoke_run, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from tgo import tracking

    result = smoke_run.result  # preset="smoke", epochs=1, weight_spectra=True
    client = MlflowClient()
    for key in ("weights/qkv/block_00/alpha", "weights/fc2/block_01/stable_rank", "weights/head/final/effective_rank",
                "tokens/final/mean_cosine", "tokens/patch_embed/mean_cosine", "time/weights_s"):
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [0, 1], key
    # The logged singular values are those of the kept weights of that epoch (an independent SVD).
    folder = tmp_path / "dl"
    values = np.load(tracking.download(result.run_id, "geometry/weights/epoch_0001.npz", folder))
    state = tracking.load_checkpoint(tracking.download(result.run_id, "checkpoints/weights_epoch_0001.pt", folder))
    expected = torch.linalg.svdvals(state["blocks.1.mlp.fc1.weight"].double()).numpy()
    np.testing.assert_allclose(values["block_01__fc1"], expected, rtol=1e-10)
    stable = (expected**2).sum() / expected[0] ** 2
    assert client.get_run(result.run_id).data.metrics["weights/fc1/block_01/stable_rank"] == pytest.approx(stable)
    assert mlflow.get_run(result.run_id).data.tags["tgo.kind"] == "train"
