"""Local contrast normalisation, the histogram branch, site input and the closed-form prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankcore.errors import InputError, ShapeError
from rankcore.models import AgeRegressor, BackboneConfig, CorrectionRegressor
from rankcore.models.blocks import IntensityHistogram, LocalContrastNorm
from rankcore.train.checkpoint import load_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData
from rankcore.train.loop import train_stage, with_training_sites
from rankcore.train.predict import predict
from rankcore.train.prior import fit_histogram_prior, ridge_gcv

SHAPE = (20, 24, 20)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
                {"sites": "ab"}, {"sites": ("a", "")}):
        with pytest.raises(InputError):
            BackboneConfig(**bad)
    c = BackboneConfig(local_norm=7, hist_bins=16, sites=("s1", "s2"))
    assert BackboneConfig.from_dict(c.to_dict()) == c


def test_site_codes_and_shape_checks():
    m = AgeRegressor(BackboneConfig(growth=(4,), sites=("a", "b", "c")))
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
    assert fit_histogram_prior(s2, train, torch.device("cpu")) == {"n": 60}
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
