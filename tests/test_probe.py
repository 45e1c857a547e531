"""tgo.probe over a tiny timm ViT: sites, views, sample counts, agreement with the batch path."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tgo import spectral
from tgo.probe import ProbeResult, head_view, probe, site_names
from tgo.probeset import ProbeSet, probe_indices
from helpers import tiny_vit

N_PATCH = 16  # 32 px images, 8 px patches


def _loader(images, batch):
    return [(images[i : i + batch], torch.zeros(len(images[i : i + batch]))) for i in range(0, len(images), batch)]


def _reference_rows(model, images):
    """Every site and view gathered independently with forward hooks on the model's modules,
    in one float64 forward (so that batching cannot change the rows)."""
    model.eval()
    images = images.double()
    seen = {}
    hooks = [model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("patch_embed", o))]
    hooks.append(model.patch_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("pos_embed", i[0])))
    for k, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block_{k:02d}", o)))
    hooks.append(model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("final", o)))
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    rows = {}
    for site, x in seen.items():
        x = x.double().numpy()
        patches = x if site == "patch_embed" else x[:, 1:]
        if site != "patch_embed":
            rows[(site, "cls")] = x[:, 0]
        rows[(site, "patch")] = patches.reshape(-1, x.shape[-1])
        rows[(site, "mean")] = patches.mean(axis=1)
    return rows


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", spectral.DegenerateGeometryWarning)
        return fn(*args, **kwargs)


def test_every_site_and_view_with_the_right_sample_counts(vit, images):
    result = _quiet(probe, vit, _loader(images, 16))
    assert site_names(vit) == ["patch_embed", "pos_embed", "block_00", "block_01", "final"]
    expected = {(s, v) for s in site_names(vit) for v in ("cls", "patch", "mean")} - {("patch_embed", "cls")}
    assert set(result.geometry) == expected
    n = len(images)
    for g in result:
        assert g.n_samples == {"cls": n, "mean": n, "patch": n * N_PATCH}[g.view]
        assert g.eigenvalues.shape == (min(32, g.n_samples - 1),)
        np.testing.assert_allclose(g.singular_values, np.sqrt((g.n_samples - 1) * g.eigenvalues))
    metrics = result.metrics()
    assert len(metrics) == len(expected) * len(spectral.OBSERVABLE_NAMES)
    assert "geom/final/cls/effective_rank" in metrics and "geom/block_01/patch/alpha_r2" in metrics
    # The class token plus its position embedding is the same for every image: no variance.
    assert result.degenerate() == ["pos_embed/cls"]


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_probe_equals_the_batch_path_on_the_same_rows(precision):
    # float64 weights: the forward is then batch-invariant to 1e-15 and the rows are the same.
    vit = tiny_vit().double()
    images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = _quiet(probe, vit, _loader(images, 48), precision=precision)
    for (site, view), X in _reference_rows(vit, images).items():
        if (site, view) == ("pos_embed", "cls"):
            continue
        ref = spectral.spectra_from_matrix(X)
        got = result[(site, view)]
        if precision == "float64":
            want = spectral.observables(X)
            for name, value in want.items():
                assert got.observables[name] == pytest.approx(value, rel=1e-8, abs=1e-12), (site, view, name)
        elif site != "final":
            # float32 products about a shift, float64 totals. The final LayerNorm's output has an
            # exactly null direction that float32 products cannot resolve (tgo.accumulate says so).
            np.testing.assert_allclose(got.eigenvalues[:5], ref.eigenvalues[:5], rtol=1e-6)
            flat = spectral.spectral_flatness(ref.eigenvalues)
            assert got.observables["spectral_flatness"] == pytest.approx(flat, rel=1e-4), (site, view)


def test_batch_size_does_not_change_the_geometry(images):
    vit = tiny_vit().double()
    a = _quiet(probe, vit, _loader(images, 7), precision="float64").metrics()
    b = _quiet(probe, vit, _loader(images, 40), precision="float64").metrics()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_model_mode_and_rng_state_are_restored(vit, images):
    vit.train()
    vit.blocks[0].eval()  # a user's own choice, kept as it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    np.random.seed(5)
    np_expected = np.random.rand()
    np.random.seed(5)
    _quiet(probe, vit, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=8))
    assert torch.equal(torch.rand(3), expected)
    assert np.random.rand() == np_expected
    assert vit.training and not vit.blocks[0].training and vit.blocks[1].training


def test_patch_token_subsampling(vit, images):
    result = _quiet(probe, vit, _loader(images, 16), patch_tokens_per_image=3, seed=1)
    assert result[("block_00", "patch")].n_samples == len(images) * 3
    assert result[("block_00", "cls")].n_samples == len(images)
    again = _quiet(probe, vit, _loader(images, 16), patch_tokens_per_image=3, seed=1)
    assert again.metrics() == result.metrics()


def test_save_and_load_round_trip(vit, images, tmp_path):
    result = _quiet(probe, vit, _loader(images, 16))
    path = result.save(tmp_path / "spectra" / "epoch_0000.npz")
    loaded = ProbeResult.load(path)
    assert loaded.metrics() == result.metrics()
    for g in result:
        h = loaded[(g.site, g.view)]
        np.testing.assert_array_equal(h.eigenvalues, g.eigenvalues)
        np.testing.assert_array_equal(h.uncentered_singular_values, g.uncentered_singular_values)
        assert h.n_samples == g.n_samples and h.degenerate == g.degenerate


def test_models_without_class_token_and_with_registers():
    model = tiny_vit(class_token=False, global_pool="avg", reg_tokens=2)
    images = torch.randn(12, 3, 32, 32)
    result = _quiet(probe, model, [images])
    assert not any(view == "cls" for _, view in result.geometry)
    assert result[("block_00", "patch")].n_samples == 12 * N_PATCH  # registers are not patches


def test_bad_arguments_are_clear_errors(vit, images):
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        probe(torch.nn.Linear(3, 3), [images])
    with pytest.raises(ValueError, match="unknown site or view"):
        probe(vit, [images], sites=["block_99"])


def test_probe_subset_is_fixed_by_seed():
    a = probe_indices(1000, 100, seed=3)
    assert np.array_equal(a, probe_indices(1000, 100, seed=3))
    assert not np.array_equal(a, probe_indices(1000, 100, seed=4))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="probe_size=20 exceeds the 10 images"):
        probe_indices(10, 20, seed=0)


def test_probe_set_is_the_same_whatever_the_batch_size_and_workers(vit):
    data = torch.utils.data.TensorDataset(torch.randn(60, 3, 32, 32), torch.arange(60))
    ps = ProbeSet.from_dataset(data, 20, seed=7)
    seen, folds = [], []
    for batch_size, workers in ((3, 0), (20, 2)):
        batches = list(ps.loader(batch_size, workers))
        seen.append(torch.cat([targets for _, targets, _ in batches]))
        folds.append(torch.cat([f for _, _, f in batches]))
    assert torch.equal(seen[0], seen[1]) and seen[0].tolist() == ps.indices.tolist()
    # Each image's jackknife fold is fixed by the seed and its place, whatever the batch or workers.
    assert torch.equal(folds[0], folds[1]) and folds[0].tolist() == ps.fold_ids.tolist()
    assert np.bincount(ps.fold_ids).tolist() == [4, 4, 4, 4, 4]
    again = ProbeSet.from_dataset(data, 20, seed=7)
    assert again.fingerprint == ps.fingerprint
    data.tensors[0][int(ps.indices[4])] += 1.0
    assert ProbeSet.from_dataset(data, 20, seed=7).fingerprint != ps.fingerprint
    shards = [ps.loader(4, rank=r, world_size=3) for r in range(3)]
    covered = sorted((int(t), int(f)) for loader in shards for _, targets, fs in loader for t, f in zip(targets, fs))
    assert covered == list(zip(ps.indices.tolist(), ps.fold_ids.tolist()))  # same folds on any number of ranks


def test_jackknife_replicates_are_the_observables_without_each_fold():
    # float64 weights: the forward is batch-invariant, so the reference rows are the probe's rows.
    vit = tiny_vit().double()
    images = torch.randn(43, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ps = ProbeSet.from_dataset(torch.utils.data.TensorDataset(images, torch.zeros(43)), 43, seed=2, folds=5)
    folds = ps.fold_ids  # 5 folds of 8 images, 3 images in every replicate
    results = [_quiet(probe, vit, ps.loader(b), precision="float64", folds=5) for b in (6, 43)]
    reference = _reference_rows(vit, images[torch.as_tensor(ps.indices)])
    for (site, view), X in reference.items():
        if (site, view) == ("pos_embed", "cls"):
            continue
        per_row = np.repeat(folds, len(X) // len(folds))  # a patch view has T rows per image
        for result in results:
            got = result[(site, view)].replicates
            assert got.shape == (5, len(spectral.OBSERVABLE_NAMES))
            for k in range(5):
                want = spectral.observables(X[per_row != k])
                for j, name in enumerate(spectral.OBSERVABLE_NAMES):
                    assert got[k, j] == pytest.approx(want[name], rel=1e-8, abs=1e-12), (site, view, k, name)
    se = results[0][("final", "cls")].stderr["effective_rank"]
    assert se > 0 and se == pytest.approx(results[1][("final", "cls")].stderr["effective_rank"], rel=1e-9)
    metrics = results[0].stderr_metrics()
    assert set(metrics) == {f"geom_se/final/cls/{n}" for n in spectral.OBSERVABLE_NAMES}
    # Saved and loaded with the spectra.
    path = results[0].save(Path(tempfile.mkdtemp()) / "epoch_0001.npz")
    loaded = ProbeResult.load(path)
    np.testing.assert_array_equal(loaded[("block_00", "patch")].replicates, results[0][("block_00", "patch")].replicates)
    assert loaded.stderr_metrics() == metrics and loaded.head == ("final", "cls")
    # folds=1: no uncertainty, and nothing logged for it.
    plain = _quiet(probe, vit, ps.loader(10), folds=1)
    assert plain[("final", "cls")].replicates is None and plain.stderr_metrics() == {}


def test_an_average_pooled_model_is_measured_where_its_head_reads():
    # timm's _gap models pool the patch tokens and apply the final norm after pooling (fc_norm):
    # model.norm is the identity, and final/mean must be fc_norm(mean of tokens), what feeds the head.
    model = tiny_vit(class_token=False, global_pool="avg").double().eval()
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    images = torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(3)).double()
    result = _quiet(probe, model, [images[:11], images[11:]], folds=1)
    assert head_view(model) == ("final", "mean") and result.head == ("final", "mean")
    with torch.no_grad():
        head_input = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
    want = spectral.observables(head_input)
    got = result[("final", "mean")].observables
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-8, abs=1e-12), name
    # It is not the last block's mean (which the old final/mean was for such a model).
    assert got["effective_rank"] != pytest.approx(result[("block_01", "mean")].observables["effective_rank"], rel=1e-6)


def test_models_pooled_otherwise_are_refused_with_a_message():
    model = tiny_vit(global_pool="map")
    with pytest.raises(ValueError, match="pools by 'map'"):
        probe(model, [torch.randn(4, 3, 32, 32)])


def test_token_interaction_is_the_mean_cosine_of_distinct_patch_tokens(images):
    """TGO-II's token interaction, against numpy on the same model's tokens (a T x T cosine matrix
    per image, off-diagonal mean), and its closed form for identical tokens."""
    model = tiny_vit().double().eval()
    result = probe(model, [images[:20], images[20:]], folds=1)
    with torch.no_grad():
        final, blocks = model.forward_intermediates(images.double(), output_fmt="NLC", return_prefix_tokens=True)
    for site, tokens in (("final", final[:, 1:]), ("block_00", blocks[0][0])):
        x = tokens.numpy()
        unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
        cos = np.einsum("bid,bjd->bij", unit, unit)
        t = x.shape[1]
        expected = np.mean([(c.sum() - np.trace(c)) / (t * (t - 1)) for c in cos])
        assert result.token_interaction[site] == pytest.approx(expected, rel=1e-10), site
        assert result.token_interaction_metrics()[f"tokens/{site}/mean_cosine"] == result.token_interaction[site]
    assert set(result.token_interaction) == set(site_names(model))
    from tgo.probe import token_interaction

    same = torch.ones(3, 5, 8)  # every token of an image identical: cosine 1
    assert torch.allclose(token_interaction(same), torch.ones(3, dtype=torch.float64))
    loaded = ProbeResult.load(result.save(Path(tempfile.mkdtemp()) / "p.npz"))
    assert loaded.token_interaction == pytest.approx(result.token_interaction)


def test_token_interaction_replicates_and_kept_feature_rows_follow_the_folds():
    """Token interaction without each fold (against numpy on the same tokens), and the kept
    features' rows: their place in the probe set and their fold, saved and loaded with them."""
    model = tiny_vit().double().eval()
    images = torch.randn(23, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    ps = ProbeSet.from_dataset(torch.utils.data.TensorDataset(images, torch.zeros(23)), 23, seed=3, folds=4)
    result = _quiet(probe, model, ps.loader(5), precision="float64", folds=4, keep_features=True)
    with torch.no_grad():
        final, _ = model.forward_intermediates(images[torch.as_tensor(ps.indices)].double(), output_fmt="NLC",
                                               return_prefix_tokens=True)
    x = final[:, 1:].numpy()
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    cos = np.einsum("bid,bjd->bij", unit, unit)
    t = x.shape[1]
    per_image = np.array([(c.sum() - np.trace(c)) / (t * (t - 1)) for c in cos])
    folds = ps.fold_ids  # 4 folds of 5 images, 3 images in every replicate
    want = [per_image[folds != k].mean() for k in range(4)]
    np.testing.assert_allclose(result.token_interaction_replicates["final"], want, rtol=1e-10)
    rows = result.feature_rows
    np.testing.assert_array_equal(rows.position, np.arange(23))
    np.testing.assert_array_equal(rows.fold, folds)
    assert rows.folds == 4
    np.testing.assert_allclose(result.features[("final", "mean")].astype(float), x.mean(axis=1), rtol=2e-3, atol=2e-3)
    path = result.save_features(Path(tempfile.mkdtemp()) / "f.npz")
    loaded = ProbeResult.load_feature_rows(path)
    np.testing.assert_array_equal(loaded.fold, folds)
    assert loaded.folds == 4 and set(ProbeResult.load_features(path)) == set(result.features)
    again = ProbeResult.load(result.save(Path(tempfile.mkdtemp()) / "p.npz"))
    np.testing.assert_array_equal(again.token_interaction_replicates["final"], result.token_interaction_replicates["final"])
