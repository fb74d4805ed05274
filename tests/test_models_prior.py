"""Local contrast normalisation, the histogram branch, site input and the closed-form prior."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankcore.errors import InputError, ShapeError
from rankcore.models import AgeRegressor, BackboneConfig, CorrectionRegressor
from rankcore.models.blocks import IntensityHistogram, LocalContrastNorm
from rankcore.mri.tissue_names import POSE_FEATURES
from rankcore.train.checkpoint import load_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData
from rankcore.train.loop import train_stage, with_training_sites
from rankcore.train.predict import predict
from rankcore.train.prior import PRIOR_IGNORES, fit_histogram_prior, fit_prior, ridge_gcv

SHAPE = (20, 24, 20)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _brain(n: int, seed: int = 0) -> torch.Tensor:
    """Positive 'brain' intensities inside an ellipsoid, 0 outside: (n, 1, X, Y, Z)."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, s) for s in SHAPE]
    xx, yy, zz = torch.meshgrid(*axes, indexing="ij")
    inside = (xx**2 / 0.8 + yy**2 / 0.9 + zz**2 / 0.7) < 1
    x = 1.0 + 0.3 * torch.rand((n, 1, *SHAPE), generator=g)
    return x * inside


def test_box_sum_equals_average_pool_times_volume():
    ln = LocalContrastNorm(5)
    x = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)
    ref = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=True) * 125
    torch.testing.assert_close(ln._box(x), ref)


def test_local_norm_cancels_gain_offset_and_keeps_background_zero():
    ln = LocalContrastNorm(5, eps=1e-9)
    x = _brain(2).double()
    mask = x != 0
    y = torch.where(mask, 3.0 * x + 0.7, torch.zeros_like(x))
    out_x, out_y = ln(x), ln(y)
    torch.testing.assert_close(out_x, out_y, atol=1e-6, rtol=1e-6)
    assert bool((out_x[~mask] == 0).all())
    assert float(out_x[mask].abs().mean()) > 0.1


def test_local_norm_removes_a_smooth_field_that_global_zscoring_keeps():
    ln = LocalContrastNorm(5, eps=1e-9)
    x = _brain(1, seed=3).double()
    mask = x != 0
    ramp = torch.linspace(0.8, 1.2, SHAPE[0], dtype=torch.float64)[None, None, :, None, None]

    def zscore(t):
        v = t[mask]
        return torch.where(mask, (t - v.mean()) / v.std(), torch.zeros_like(t))

    local_change = float((ln(x * ramp) - ln(x))[mask].abs().mean())
    global_change = float((zscore(x * ramp) - zscore(x))[mask].abs().mean())
    assert local_change < 0.25 * global_change


def test_histogram_linear_binning_and_mass():
    h = IntensityHistogram(5, -2.0, 2.0)
    counts = h.counts(torch.tensor([[0.0, -2.0, -1.5, 0.5, 2.0, 5.0]]).view(1, 1, 6, 1, 1))
    torch.testing.assert_close(counts, torch.tensor([[1.5, 0.5, 0.5, 0.5, 2.0]]))
    x = torch.randn(3, 1, 6, 7, 8)
    x[:, :, :2] = 0
    c = h.counts(x)
    torch.testing.assert_close(c.sum(dim=1), torch.full((3,), 5.0))
    assert not c.requires_grad


def test_histogram_scale_standardises():
    h = IntensityHistogram(8)
    x = torch.randn(6, 1, 5, 5, 5)
    h.set_scale(h.counts(x))
    out = h(x)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(8), atol=1e-5, rtol=0)


def test_ridge_gcv_recovers_weights_and_shrinks_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    w_true = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    w, b, alpha, rmse = ridge_gcv(x, x @ w_true + 4.0 + 0.01 * rng.normal(size=200))
    np.testing.assert_allclose(w, w_true, atol=0.02)
    assert abs(b - 4.0) < 0.02 and rmse < 0.05
    w_noise, _, alpha_noise, _ = ridge_gcv(x, rng.normal(size=200))
    assert alpha_noise > alpha and np.abs(w_noise).max() < 0.2


def test_config_validation_and_round_trip():
    for bad in ({"local_norm": 4}, {"local_norm": 1}, {"hist_bins": 1}, {"sites": ("a", "a")},
                {"sites": "ab"}, {"sites": ("a", "")}, {"hist_pool": 0}, {"hist_window": 4},
                {"hist_window": 1}, {"hist_pool": True}):
        with pytest.raises(InputError):
            BackboneConfig(**bad)
    c = BackboneConfig(local_norm=7, hist_bins=16, hist_pool=2, hist_window=5,
                       sites=("s1", "s2"))
    assert BackboneConfig.from_dict(c.to_dict()) == c


def test_config_saved_before_the_histogram_grid_keeps_its_histogram():
    old = BackboneConfig(input_pool=2, local_norm=5).to_dict()
    del old["hist_pool"], old["hist_window"]
    c = BackboneConfig.from_dict(old)
    assert (c.hist_pool, c.hist_window) == (2, 5)
    m = AgeRegressor(BackboneConfig(growth=(4,), input_pool=2, local_norm=5, hist_pool=2,
                                    hist_window=5))
    x = _brain(2)
    # the legacy layout reads the CNN's pooled, normalised input: same counts either way
    torch.testing.assert_close(m.backbone.histogram_counts(x),
                               m.backbone.histogram.counts(
                                   m.backbone.local_norm(m.backbone.input_pool(x))))


def test_histogram_on_its_own_grid_is_flip_invariant_and_can_be_passed_in():
    cfg = BackboneConfig(growth=(4,), input_pool=2, local_norm=3, hist_pool=1, hist_window=5,
                         hist_bins=12)
    m = AgeRegressor(cfg).eval()
    x = _brain(3, seed=4) * (1 + torch.linspace(0, 1, SHAPE[0]))[None, None, :, None, None]
    counts = m.backbone.histogram_counts(x)
    assert counts.shape == (3, 12)
    # computed on the full grid (hist_pool 1), not on the CNN's pooled input
    pooled = m.backbone.histogram.counts(LocalContrastNorm(5)(F.avg_pool3d(x, 2, ceil_mode=True)))
    assert not torch.allclose(counts, pooled, atol=1e-3)
    torch.testing.assert_close(m.backbone.histogram_counts(x.flip(2)), counts, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(m(x, None, None, counts), m(x))
        with pytest.raises(ShapeError):
            m(x, None, None, counts[:, :5])


def test_batches_carry_histogram_counts_computed_once_per_subject(monkeypatch):
    cfg = BackboneConfig(growth=(4,), local_norm=3, hist_pool=1, hist_window=5, hist_bins=8)
    s1, s2 = AgeRegressor(cfg), CorrectionRegressor(cfg)
    data = _hist_data(10, 5)
    calls = []
    real = type(s1.backbone).histogram_counts

    def counting(self, image):
        calls.append(len(image))
        return real(self, image)

    monkeypatch.setattr(type(s1.backbone), "histogram_counts", counting)
    b = data.batch(np.array([3, 1, 4]), model=s1)
    torch.testing.assert_close(b["hist_counts"], real(s1.backbone, b["image"]))
    assert "hist_counts" not in data.batch(np.array([3]))
    # a view (fold, stage-2 data) and the other stage reuse them; only new subjects count
    view = data.subset(np.array([1, 3, 4, 9])).with_stage1(np.full(4, 50.0))
    b2 = view.batch(np.array([0, 1, 2, 3]), model=s2)
    assert calls == [3, 1]
    torch.testing.assert_close(b2["hist_counts"][:3], b["hist_counts"][[1, 0, 2]])
    # a histogram of another configuration is computed for itself
    other = AgeRegressor(BackboneConfig(growth=(4,), local_norm=3, hist_pool=1, hist_window=3,
                                        hist_bins=8))
    data.batch(np.array([3]), model=other)
    assert calls == [3, 1, 1]
    # a pickled copy (a Ray worker's) starts with an empty memo of its own
    copy = pickle.loads(pickle.dumps(data))
    copy.batch(np.array([3, 1]), model=s1)
    assert calls == [3, 1, 1, 2]


def test_site_codes_and_shape_checks():
    m = AgeRegressor(BackboneConfig(growth=(4,), sites=("a", "b", "c")))
    torch.nn.init.normal_(m.head[-1].weight)  # a fresh model's residual is zero: give it one
    codes = m.site_codes(["b", "zz", "n/a"])
    torch.testing.assert_close(codes[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(codes[1], torch.full((3,), 1 / 3))
    x = _brain(3)
    with pytest.raises(ShapeError):
        m(x, None, torch.zeros(3, 2))
    m.eval()
    # None = every site unknown = the average code
    torch.testing.assert_close(m(x, None, None), m(x, None, m.site_codes(["?"] * 3)))
    # the site changes the prediction
    assert not torch.allclose(m(x, None, m.site_codes(["a"] * 3)),
                              m(x, None, m.site_codes(["c"] * 3)))


def _hist_data(n: int, seed: int) -> SubjectData:
    """Age encoded in the intensity distribution: older = more dark voxels."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 80, n)
    x = _brain(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i, age in enumerate(ages):
        dark = (torch.rand(SHAPE, generator=g) < (age - 10) / 100) & (x[i, 0] != 0)
        x[i, 0][dark] *= 0.5
    sites = [f"site{i % 2}" for i in range(n)]
    return SubjectData.from_tensors(x[:, 0], ages, sites=sites)


def test_prior_fits_in_closed_form_and_the_model_starts_at_it():
    cfg = BackboneConfig(input_pool=1, growth=(4, 4), local_norm=3, hist_bins=12,
                         sites=("site0", "site1"))
    train, test = _hist_data(60, 0), _hist_data(30, 1)
    model = AgeRegressor(cfg)
    model.set_age_scale(float(train.ages.mean()), float(train.ages.std()))
    info = fit_histogram_prior(model, train, torch.device("cpu"))
    assert info["n"] == 60 and info["gcv_rmse_years"] < 10
    pred = predict(model, test)
    mae = np.abs(pred - test.ages).mean()
    assert mae < 0.5 * np.abs(test.ages - train.ages.mean()).mean()
    # stage 2 gets the histogram scale but no prior
    s2 = CorrectionRegressor(cfg)
    info2 = fit_histogram_prior(s2, train, torch.device("cpu"))
    assert info2["n"] == 60 and "alpha" not in info2
    assert float(s2.backbone.histogram.std.min()) > 0


def test_training_records_sites_and_prior_and_reloads(tmp_path):
    train, val = _hist_data(32, 2), _hist_data(16, 3)
    config = TrainConfig(epochs=1, batch_size=8, rank_loss="none", device="cpu",
                         backbone=BackboneConfig(input_pool=1, growth=(4,), local_norm=3,
                                                 hist_bins=8))
    assert with_training_sites(config, train).backbone.sites == ("site0", "site1")
    assert with_training_sites(config.replace(site_input=False), train).backbone.sites == ()
    res = train_stage(1, config, train, val, out_dir=tmp_path / "s1")
    assert res.card["backbone"]["sites"] == ["site0", "site1"]
    assert res.card["histogram_prior"]["n"] == 32
    loaded, _ = load_stage_model(tmp_path / "s1")
    np.testing.assert_allclose(predict(loaded, val), predict(res.model, val), rtol=1e-5)


def test_cascade_computes_the_shared_histogram_once(monkeypatch):
    from rankcore.models import Cascade

    cfg = BackboneConfig(growth=(4,), local_norm=3, hist_pool=1, hist_window=5, hist_bins=8)
    s1, s2 = AgeRegressor(cfg).eval(), CorrectionRegressor(cfg).eval()
    x = _brain(2, seed=6)
    with torch.no_grad():
        ref1 = s1(x)
        ref2 = s2(x, ref1)
        calls = []
        real = type(s1.backbone).histogram_counts
        monkeypatch.setattr(type(s1.backbone), "histogram_counts",
                            lambda self, image: calls.append(1) or real(self, image))
        final, first = Cascade(s1, s2)(x)
    assert len(calls) == 1
    torch.testing.assert_close(first, ref1)
    torch.testing.assert_close(final, ref2)


def test_site_priors_blend_toward_each_sites_own_fit_and_keep_small_sites_pooled():
    from rankcore.train.prior import MIN_SITE_SUBJECTS, fit_site_priors, ridge_loo

    rng = np.random.default_rng(0)
    n, p = 240, 6
    hist = rng.normal(size=(n, p))
    # sites 0 and 1 share the subjects; site 2 has too few for a fit of its own
    site = np.where(np.arange(n) < MIN_SITE_SUBJECTS - 1, 2, np.arange(n) % 2)
    codes = np.eye(3)[site]
    # the same histogram means different ages at sites 0 and 1
    true_w = np.array([[1.0, 0.5, 0, 0, 0, 0], [0, 0, 1.0, -0.5, 0, 0], [1.0, 0.5, 0, 0, 0, 0]])
    y = np.einsum("np,np->n", hist, true_w[site]) + 0.1 * rng.normal(size=n)
    weights, biases, info = fit_site_priors(hist, codes, y)
    assert weights.shape == (3, p) and biases.shape == (3,)
    for k in (0, 1):
        assert info["sites"][k]["weight"] > 0.8
        rows = site == k
        err = np.abs(hist[rows] @ weights[k] + biases[k] - y[rows]).mean()
        assert err < 0.2
    assert info["sites"][2]["n"] < MIN_SITE_SUBJECTS and info["sites"][2]["weight"] == 0.0
    pooled, _, _ = fit_site_priors(hist, codes, y, per_site=False)
    np.testing.assert_allclose(weights[2], pooled[2])
    np.testing.assert_allclose(pooled[0], pooled[1])  # one pooled slope, per-site intercepts
    # exact leave-one-out residuals
    _, _, alpha, _, loo = ridge_loo(hist[:30], y[:30])
    keep = np.arange(1, 30)
    x0, y0 = hist[keep], y[keep]
    xm, ym = x0.mean(0), y0.mean()
    w0 = np.linalg.solve((x0 - xm).T @ (x0 - xm) + alpha * np.eye(p), (x0 - xm).T @ (y0 - ym))
    np.testing.assert_allclose(loo[0], y[0] - (ym + (hist[0] - xm) @ w0), rtol=1e-8)


def test_prior_rows_follow_the_site_code_and_old_pooled_weights_load():
    cfg = BackboneConfig(growth=(4,), hist_bins=4, sites=("a", "b"))
    m = AgeRegressor(cfg)
    with torch.no_grad():
        m.prior_weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]]))
        m.prior_bias.copy_(torch.tensor([0.5, -0.5]))
    h = torch.tensor([[1.0, 1.0, 0, 0]])
    torch.testing.assert_close(m.prior(h, m.site_codes(["a"])), torch.tensor([1.5]))
    torch.testing.assert_close(m.prior(h, m.site_codes(["b"])), torch.tensor([1.5]))
    torch.testing.assert_close(m.prior(2 * h, m.site_codes(["zz"])), torch.tensor([3.0]))
    # weights saved when the prior was one pooled model: (bins + sites,) and a scalar bias
    state = m.state_dict()
    state["prior_weight"] = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    state["prior_bias"] = torch.tensor(0.5)
    m2 = AgeRegressor(cfg)
    m2.load_state_dict(state)
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    for name, intercept in (("a", 10.0), ("b", 20.0)):
        torch.testing.assert_close(m2.prior(x, m2.site_codes([name])),
                                   torch.tensor([4.0 + intercept + 0.5]))


def test_prior_gives_the_head_pose_features_zero_weight():
    """The affine's entries (where the head lay in the scanner) never enter the prior: their
    weights are 0 and changing them does not move its prediction; other features do count."""
    rng = np.random.default_rng(4)
    n = 40
    ages = rng.uniform(20, 80, n)
    pose = rng.normal(size=(n, len(POSE_FEATURES))) + ages[:, None] / 30  # age-correlated
    signal = ages / 10 + rng.normal(scale=0.5, size=n)
    names = ("gm_fraction", *POSE_FEATURES)
    x = _brain(n, seed=4)[:, 0]
    train = SubjectData.from_tensors(x, ages, features=np.c_[signal, pose],
                                     feature_names=names)
    cfg = BackboneConfig(input_pool=1, growth=(4,), hist_bins=0, features=names)
    model = AgeRegressor(cfg)
    model.set_age_scale(float(ages.mean()), float(ages.std()))
    info = fit_prior(model, train, torch.device("cpu"))
    assert info["ignored_features"] == list(POSE_FEATURES) == sorted(PRIOR_IGNORES)
    w = model.prior_weight.numpy()
    assert np.all(w[:, 1:] == 0) and np.all(w[:, 0] != 0)
    moved = SubjectData.from_tensors(x, ages, features=np.c_[signal, pose * 5 + 3],
                                     feature_names=names)
    model.zero_residual()
    np.testing.assert_allclose(predict(model, moved), predict(model, train), rtol=1e-6)
