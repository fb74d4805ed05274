"""The learned network's inputs and the prior as epoch -1: multi-channel images, tabular
features in batches, the prior and the head, standardised head inputs, the model choice
(prior / network / both), and a model that refuses data with other channels or features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcore.errors import InputError, ShapeError
from rankcore.models import AgeRegressor, BackboneConfig, CorrectionRegressor, ScaleDense
from rankcore.train import SubjectData, TrainConfig, predict, train_stage
from rankcore.train.prior import fit_prior

SHAPE = (12, 14, 10)  # asymmetric, so a swapped axis cannot pass
SMALL = {"stem_channels": 4, "growth": (4, 4), "hist_bins": 8, "hist_window": 3,
         "head_hidden": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cohort(n: int, seed: int, channels: int = 1, n_features: int = 0) -> SubjectData:
    """Blobs whose size grows with age (channel 0) plus noise channels, and tabular features
    of which the first is age plus noise (NaN for every fifth subject)."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(20, 80, n)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")).astype(float)
    centre = (np.asarray(SHAPE)[:, None, None, None] - 1) / 2
    images = rng.normal(0, 0.3, (n, channels, *SHAPE)).astype(np.float32)
    for i, a in enumerate(ages):
        r = (0.2 + 0.25 * (a - 20) / 60) * np.asarray(SHAPE)[:, None, None, None]
        images[i, 0] += (((grid - centre) / r) ** 2).sum(0) <= 1
    feats = None
    if n_features:
        feats = rng.normal(0, 1, (n, n_features))
        feats[:, 0] = ages + rng.normal(0, 3, n)
        feats[::5, 0] = np.nan
    return SubjectData.from_tensors(images, ages, sex=rng.choice([-1.0, 1.0], n),
                                    participant_ids=[f"s{seed}-{i}" for i in range(n)],
                                    features=feats)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cpu", "seed": 0,
            "backbone": BackboneConfig(**SMALL)}
    base.update(kw)
    return TrainConfig.from_dict(base)


# ---- data ----------------------------------------------------------------------------------

def test_multichannel_tensors_and_features_travel_in_batches():
    data = _cohort(10, 0, channels=3, n_features=2)
    assert data.channels == 3 and data.shape == SHAPE
    assert data.channel_names == ("intensity", "channel-1", "channel-2")
    assert data.feature_names == ("feature-0", "feature-1")
    sub = data.subset([7, 0, 5])
    b = sub.batch(np.arange(3))
    assert b["image"].shape == (3, 3, *SHAPE)
    assert b["features"].shape == (3, 2) and b["features"].dtype == torch.float32
    np.testing.assert_array_equal(b["features"].numpy(),
                                  data.features[[7, 0, 5]].astype(np.float32))
    assert torch.isnan(b["features"][[1, 2], 0]).all()  # subjects 0 and 5 miss feature 0
    assert sub.with_stage1([1.0, 2.0, 3.0]).feature_names == data.feature_names
    no_feats = _cohort(4, 0).batch(np.arange(2))["features"]
    assert no_feats.shape == (2, 0)


def test_bad_features_are_refused():
    img = np.zeros((4, *SHAPE), np.float32)
    with pytest.raises(ShapeError, match="`features`"):
        SubjectData.from_tensors(img, np.arange(4.0), features=np.zeros((3, 2)))
    with pytest.raises(InputError, match="`features`"):
        SubjectData.from_tensors(img, np.arange(4.0), features=np.full((4, 1), np.inf))
    with pytest.raises(ShapeError, match="`feature_names`"):
        SubjectData.from_tensors(img, np.arange(4.0), features=np.zeros((4, 2)),
                                 feature_names=["a", "a"])
    with pytest.raises(ShapeError, match="`channel_names`"):
        SubjectData.from_tensors(img, np.arange(4.0), channel_names=["a", "b"])


class _Dataset:
    """The VolumeDataset contract: ``volume(i)``, and ``channels(i)`` / ``features`` when
    the cache holds tissue channels."""

    def __init__(self, n: int, tissue: bool):
        rng = np.random.default_rng(1)
        self.vols = rng.normal(size=(n, 4, *SHAPE)).astype(np.float16)
        self.ages = list(np.linspace(20, 80, n))
        self.sexes = ["M", "F"] * (n // 2)
        self.sites = ["a"] * n
        self.keys = [f"sub-{i}" for i in range(n)]
        self.tissue = tissue
        if tissue:
            self.channel_names = ("intensity", "gm", "wm", "csf")
            self.features = rng.normal(size=(n, 3))
            self.feature_names = ("gm_fraction", "wm_fraction", "csf_fraction")
        else:
            self.features = np.zeros((n, 0))
            self.feature_names = ()

    def __len__(self) -> int:
        return len(self.ages)

    def volume(self, i: int) -> np.ndarray:
        return self.vols[i, 0]

    def __getattr__(self, name: str):
        if name == "channels" and self.__dict__.get("tissue"):
            return lambda i: self.vols[i]
        raise AttributeError(name)


@pytest.mark.parametrize("preload", [True, False])
def test_dataset_channels_and_features_are_read_when_present(preload):
    ds = _Dataset(6, tissue=True)
    data = SubjectData.from_dataset(ds, preload=preload)
    assert data.channels == 4 and data.channel_names == ds.channel_names
    assert data.feature_names == ds.feature_names
    b = data.batch(np.array([4, 1]))
    np.testing.assert_allclose(b["image"].numpy(), ds.vols[[4, 1]].astype(np.float32))
    np.testing.assert_allclose(b["features"].numpy(), ds.features[[4, 1]], rtol=1e-6)
    plain = SubjectData.from_dataset(_Dataset(6, tissue=False), preload=preload)
    assert plain.channels == 1 and plain.feature_names == ()
    np.testing.assert_allclose(plain.batch(np.array([2]))["image"][0, 0].numpy(),
                               ds.vols[2, 0].astype(np.float32))


# ---- model ---------------------------------------------------------------------------------

def test_head_inputs_are_standardised():
    torch.manual_seed(0)
    cfg = BackboneConfig(**SMALL, features=("f0", "f1"))
    net = ScaleDense(cfg).train()
    data = _cohort(16, 0, n_features=2)
    net.histogram.set_scale(net.histogram_counts(data.batch(np.arange(16))["image"]))
    net.set_feature_scale(data.features)
    b = data.batch(np.arange(16))
    out = net(b["image"], features=b["features"]).detach()
    assert out.shape == (16, net.cnn_features + 8 + 2)
    cnn = out[:, :net.cnn_features]  # batch norm over subjects: zero mean, unit variance
    torch.testing.assert_close(cnn.mean(0), torch.zeros(net.cnn_features), atol=1e-5, rtol=0)
    var = cnn.var(0, unbiased=False)  # var / (var + eps): just below 1 for small variances
    assert ((var > 0.8) & (var < 1.0 + 1e-4)).all()
    hist_tab = out[:, net.cnn_features:]  # training-set statistics: zero mean here too
    torch.testing.assert_close(hist_tab.mean(0), torch.zeros(10), atol=0.1, rtol=0)
    assert (out[::5, -2] == 0).all()  # missing feature 0 reads as the mean
    one = net(b["image"][:1], features=b["features"][:1])  # one subject per worker
    assert torch.isfinite(one).all()
    layer = ScaleDense(BackboneConfig(**SMALL, feature_norm="layer")).eval()
    cnn = layer(b["image"])[:, :layer.cnn_features].detach()
    torch.testing.assert_close(cnn.mean(1), torch.zeros(16), atol=1e-5, rtol=0)


def test_stem_keeps_the_input_resolution_with_stride_one_and_pool():
    """The 3 mm layout: a stride-1 stem at the input's grid, then a max-pool of 2; the
    default 2 mm layout: a stride-2 stem; neither pools the input or normalises it locally."""
    x = torch.randn(2, 1, *SHAPE)
    fine = ScaleDense(BackboneConfig(**SMALL, stem_stride=1, stem_kernel=3, stem_pool=2))
    assert fine.stem(x).shape[2:] == SHAPE  # the stem runs at the input's resolution
    pooled = fine.stem_pool(fine.stem(x))
    assert pooled.shape[2:] == tuple((s + 1) // 2 for s in SHAPE)
    default = ScaleDense(BackboneConfig())
    assert isinstance(default.input_pool, torch.nn.Identity)
    assert isinstance(default.local_norm, torch.nn.Identity)
    assert default.stem(x).shape[2:] == tuple((s + 1) // 2 for s in SHAPE)


def test_model_refuses_other_channels_and_features():
    m = AgeRegressor(BackboneConfig(**SMALL, in_channels=2, features=("a",))).eval()
    x = torch.randn(3, 2, *SHAPE)
    assert m(x, features=torch.randn(3, 1)).shape == (3,)
    with pytest.raises(ShapeError, match=r"\(B, 2, X, Y, Z\)"):
        m(torch.randn(3, 1, *SHAPE))
    with pytest.raises(ShapeError, match="`features`"):
        m(x, features=torch.randn(3, 2))
    with pytest.raises(ShapeError, match=r"\(B, 2, X, Y, Z\)"):
        CorrectionRegressor(m.config)(torch.randn(3, 4, *SHAPE), torch.ones(3) * 40)


def test_fresh_model_predicts_its_prior_exactly():
    cfg = BackboneConfig(**SMALL, features=("feature-0",))
    train = _cohort(40, 0, n_features=1)
    m = AgeRegressor(cfg)
    m.set_age_scale(float(train.ages.mean()), float(train.ages.std()))
    info = fit_prior(m, train, torch.device("cpu"))
    assert info["features"] == ["feature-0"] and m.prior_weight.shape == (1, 9)
    assert m.prior_weight[0, -1] != 0  # the tabular feature enters the prior
    b = train.batch(np.arange(8), model=m)
    m.eval()
    feats = m.features(b["image"], b["sex"], None, b["hist_counts"], b["features"])
    end = m.backbone.out_features  # the prior reads the histogram and tabular columns
    prior = m.prior(feats[:, end - 9:end], None)
    torch.testing.assert_close(m(b["image"], b["sex"], None, b["hist_counts"], b["features"]),
                               m.age_mean + m.age_std * prior)
    with pytest.raises(InputError, match="feature names"):
        fit_prior(m, _cohort(20, 1), torch.device("cpu"))


def test_legacy_backbone_config_keeps_its_model():
    old = BackboneConfig(input_pool=2, stem_kernel=5, stem_stride=2, local_norm=7).to_dict()
    for key in ("feature_norm", "in_channels", "stem_pool", "features"):
        del old[key]  # a card written before these existed
    c = BackboneConfig.from_dict(old)
    assert (c.input_pool, c.stem_stride, c.stem_pool, c.local_norm, c.feature_norm,
            c.in_channels, c.features) == (2, 2, 1, 7, "none", 1, ())
    partial = BackboneConfig.from_dict({"growth": [4, 4]})  # today's defaults for the rest
    assert (partial.feature_norm, partial.local_norm, partial.input_pool) == ("batch", 0, 1)
    with pytest.raises(InputError, match="`feature_norm`"):
        BackboneConfig(feature_norm="instance")
    with pytest.raises(InputError, match="`model`"):
        TrainConfig(model="cnn")


# ---- training: the model choice and epoch -1 -----------------------------------------------

@pytest.fixture(scope="module")
def tabular():
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch._dynamo's import here
    return _cohort(32, 0, channels=2, n_features=2), _cohort(12, 1, channels=2, n_features=2)


def _prior_only(config: TrainConfig, train: SubjectData, data: SubjectData) -> np.ndarray:
    """Predictions of a fresh model with its prior fitted and nothing trained."""
    from rankcore.train.loop import with_training_inputs

    config = with_training_inputs(config, train)
    torch.manual_seed(config.seed)
    m = AgeRegressor(config.backbone)
    m.set_age_scale(float(np.mean(train.ages)), float(np.std(train.ages)))
    fit_prior(m, train, torch.device("cpu"))
    return predict(m, data)


def test_network_that_never_improves_is_replaced_by_the_prior(tabular, tmp_path):
    train, val = tabular
    # lr 1.0 throws every weight far off at the first step: no epoch beats the prior
    cfg = _cfg(lr=1.0, lr_schedule="none", epochs=2)
    res = train_stage(1, cfg, train, val, out_dir=tmp_path / "s1")
    assert [m["epoch"] for m in res.history] == [-1, 0, 1]
    assert all(m["val_mae"] > res.history[0]["val_mae"] for m in res.history[1:])
    assert res.best_epoch == -1 and res.card["best_epoch"] == -1
    expected = _prior_only(cfg, train, val)
    np.testing.assert_allclose(predict(res.model, val), expected, rtol=0, atol=1e-4)
    assert np.isclose(np.abs(expected - val.ages).mean(), res.history[0]["val_mae"])
    assert res.card["backbone"]["in_channels"] == 2
    assert res.card["backbone"]["features"] == ["feature-0", "feature-1"]


def test_model_choice_prior_network_both(tabular, tmp_path):
    train, val = tabular
    prior = train_stage(1, _cfg(model="prior"), train, val, out_dir=tmp_path / "p")
    assert [m["epoch"] for m in prior.history] == [-1] and prior.best_epoch == -1
    np.testing.assert_allclose(predict(prior.model, val), _prior_only(_cfg(), train, val),
                               atol=1e-4)
    net = train_stage(1, _cfg(model="network"), train, val, out_dir=tmp_path / "n")
    assert not net.model.prior_weight.any() and not net.model.prior_bias.any()
    # epoch -1 of "network" is the untrained model: the mean training age for everyone
    assert np.isclose(net.history[0]["val_mae"], np.abs(val.ages - train.ages.mean()).mean(),
                      atol=1e-4)
    both = train_stage(1, _cfg(model="both"), train, val, out_dir=tmp_path / "b")
    assert both.model.prior_weight.any()
    assert both.history[0]["val_mae"] == prior.history[0]["val_mae"]


def test_saved_model_refuses_data_with_other_channels(tabular, tmp_path):
    from rankcore.train import load_stage_model

    train, val = tabular
    train_stage(1, _cfg(epochs=1), train, val, out_dir=tmp_path / "s1")
    model, _ = load_stage_model(tmp_path / "s1")
    assert predict(model, val).shape == (len(val),)
    with pytest.raises(InputError, match="2 image channel"):
        predict(model, _cohort(4, 2, channels=1, n_features=2))
    with pytest.raises(InputError, match="tabular features"):
        predict(model, _cohort(4, 2, channels=2, n_features=1))
    with pytest.raises(InputError, match="`val_data`"):
        train_stage(1, _cfg(epochs=1), train, _cohort(8, 3, channels=1, n_features=2),
                    out_dir=tmp_path / "bad")
