"""Models: shapes, parameter counts, the sex branch, the bounded correction, no collapse of
stage 2 onto stage-1 bins, the fused asymmetric convolution, channels-last equivalence."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from rankcore.errors import InputError, ShapeError
from rankcore.models import (
    AgeRegressor,
    BackboneConfig,
    Cascade,
    CascadeConfig,
    CorrectionRegressor,
    ScaleDense,
    count_parameters,
    discretise,
)
from rankcore.models.blocks import AsymConv3d

SHAPE = (18, 22, 14)  # asymmetric, so a swapped axis cannot pass


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n: int, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, *shape, generator=g)


def _documented_count(obj) -> int:
    m = re.search(r"([\d,]+) parameters", obj.__doc__)
    return int(m.group(1).replace(",", ""))


def test_default_parameter_counts_match_docstrings():
    n1 = count_parameters(AgeRegressor())
    n2 = count_parameters(CorrectionRegressor())
    assert n1 == _documented_count(AgeRegressor) == _documented_count(BackboneConfig)
    assert n2 == _documented_count(CorrectionRegressor)
    assert 10_000 < n1 < 500_000  # small enough for CPU, far from the reference's ~100 M


def test_shapes_on_asymmetric_volume():
    torch.manual_seed(0)
    x = _images(3)
    cfg = BackboneConfig()
    feats = ScaleDense(cfg)(x)
    assert feats.shape == (3, cfg.stem_channels + sum(cfg.growth) + cfg.hist_bins)
    m1, m2 = AgeRegressor(cfg), CorrectionRegressor(cfg)
    assert m1(x).shape == (3,)
    assert m2(x, torch.tensor([30.0, 40.0, 50.0])).shape == (3,)
    final, base, corr = m2.forward_parts(x, torch.tensor([30.0, 40.0, 50.0]))
    assert final.shape == base.shape == corr.shape == (3,)
    torch.testing.assert_close(final, base + corr)


def test_bad_inputs_are_refused():
    m = AgeRegressor()
    with pytest.raises(ShapeError, match="image"):
        m(torch.randn(2, *SHAPE))
    with pytest.raises(ShapeError, match="sex"):
        m(_images(2), torch.zeros(3))
    with pytest.raises(ShapeError, match="stage1"):
        CorrectionRegressor()(_images(2), torch.zeros(2, 1))
    with pytest.raises(InputError, match="growth"):
        BackboneConfig(growth=())
    with pytest.raises(InputError, match="stem_kernel"):
        BackboneConfig(stem_kernel=4)
    with pytest.raises(InputError, match="dropout"):
        BackboneConfig(dropout=1.5)
    with pytest.raises(InputError, match="max_correction"):
        CascadeConfig(max_correction=0)
    with pytest.raises(InputError, match="bin_width"):
        CascadeConfig(bin_width=-5)
    with pytest.raises(InputError, match="unknown"):
        BackboneConfig.from_dict({"widths": [1]})
    with pytest.raises(InputError, match="age scale"):
        m.set_age_scale(40.0, 0.0)


def test_config_round_trip():
    cfg = BackboneConfig(growth=(4, 6), stem_channels=5)
    assert BackboneConfig.from_dict(cfg.to_dict()) == cfg
    c = CascadeConfig(bin_width=5.0, max_correction=3.0)
    assert CascadeConfig.from_dict(c.to_dict()) == c


def test_fused_asymmetric_conv_equals_sum_of_branches():
    torch.manual_seed(1)
    conv = AsymConv3d(3, 4).double()
    x = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64)
    ref = (F.conv3d(x, conv.cube, padding=1)
           + F.conv3d(x, conv.line_x, padding=(1, 0, 0))
           + F.conv3d(x, conv.line_y, padding=(0, 1, 0))
           + F.conv3d(x, conv.line_z, padding=(0, 0, 1)))
    torch.testing.assert_close(conv(x), ref)
    conv(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())


def test_sex_branch_changes_output_and_can_be_disabled():
    torch.manual_seed(0)
    m = AgeRegressor().eval()
    torch.nn.init.normal_(m.head[-1].weight)  # a fresh model's residual is zero: give it one
    x = _images(4)
    male, female = torch.ones(4), -torch.ones(4)
    assert not torch.allclose(m(x, male), m(x, female))
    torch.testing.assert_close(m(x, None), m(x, torch.zeros(4)))
    m0 = AgeRegressor(BackboneConfig(sex_features=0)).eval()
    torch.testing.assert_close(m0(x, male), m0(x, female))
    assert count_parameters(m0) < count_parameters(m)


def test_age_scale_unstandardises_output():
    torch.manual_seed(0)
    m = AgeRegressor().eval()
    with torch.no_grad():
        m.head[-1].weight.zero_()
        m.head[-1].bias.fill_(0.5)
    m.set_age_scale(60.0, 10.0)
    torch.testing.assert_close(m(_images(2)), torch.full((2,), 65.0))
    assert {"age_mean", "age_std"} <= set(m.state_dict())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    x = _images(3)
    for m in (AgeRegressor(), CorrectionRegressor()):
        out = m(x) if isinstance(m, AgeRegressor) else m(x, torch.tensor([20.0, 50.0, 80.0]))
        out.sum().backward()
        missing = [n for n, p in m.named_parameters() if p.grad is None]
        assert not missing


def test_correction_is_bounded():
    torch.manual_seed(0)
    m = CorrectionRegressor(cascade=CascadeConfig(max_correction=4.0)).eval()
    with torch.no_grad():
        m.head[-1].weight.mul_(1e4)  # saturate the tanh
        m.head[-1].bias.fill_(1e3)
    s1 = torch.tensor([30.0, 45.0, 70.0, 81.0])
    final, _base, corr = m.forward_parts(_images(4), s1)
    assert torch.all(corr.abs() <= 4.0)
    assert torch.all((final - s1).abs() <= 4.0)
    assert corr.abs().max() > 3.9  # the bound is actually reached, not a smaller cap


def test_discretise_rounds_to_bins():
    s = torch.tensor([41.0, 42.4, 43.0, 47.6, 2.4])
    torch.testing.assert_close(discretise(s, 5.0), torch.tensor([40.0, 40.0, 45.0, 50.0, 0.0]))
    assert discretise(s, None) is s


def _spread_within_bin(model: CorrectionRegressor, x: torch.Tensor, s1: torch.Tensor) -> float:
    final, base, _ = model.forward_parts(x, s1)
    assert torch.unique(base).numel() == 1  # every subject in the same stage-1 bin
    return float(final.std())


#: The reference's backbone (no local normalisation, no histogram, batch norm): there the
#: image-dependent target below is the mean intensity; with the defaults (which normalise the
#: mean away) it is the share of dark voxels, which the histogram branch sees.
REFERENCE = BackboneConfig(local_norm=0, hist_bins=0, norm="batch")


def _darkened(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = _images(n, seed=seed)
    share = torch.linspace(0.05, 0.4, n)
    for i in range(n):
        dark = torch.rand(x.shape[2:], generator=g) < share[i]
        x[i, 0][dark] = -2.5 + 0.1 * x[i, 0][dark]
    return x, share


@pytest.mark.parametrize("bin_width", [None, 5.0])
@pytest.mark.parametrize("backbone", ["reference", "default"])
def test_stage2_does_not_collapse_onto_stage1_bin(bin_width, backbone):
    """Images that share a stage-1 bin must get different stage-2 outputs (reference defect)."""
    torch.manual_seed(0)
    config = REFERENCE if backbone == "reference" else BackboneConfig()
    model = CorrectionRegressor(config, cascade=CascadeConfig(bin_width=bin_width))
    model.set_age_scale(50.0, 15.0)
    if backbone == "reference":
        x = _images(8, seed=3)
        signal = x.mean(dim=(1, 2, 3, 4))
    else:
        x, signal = _darkened(8, seed=3)
        model.backbone.histogram.set_scale(model.backbone.histogram_counts(x))
    s1 = torch.full((8,), 41.0) if bin_width is None else torch.tensor(
        [40.0, 41.0, 42.0, 39.0, 38.0, 41.5, 40.5, 42.4])
    model.eval()
    with torch.no_grad():
        assert _spread_within_bin(model, x, s1) > 1e-3  # a random stage 2
    # A few training steps towards image-dependent targets keep (and grow) the spread.
    target = 40.0 + 6.0 * (signal - signal.mean()) / signal.std()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        loss = F.mse_loss(model(x, s1), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        spread = _spread_within_bin(model, x, s1)
        corr = torch.corrcoef(torch.stack([model(x, s1), target]))[0, 1]
    assert spread > 0.1
    assert corr > 0.5  # the correction follows the image, not only the bin


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = AgeRegressor().eval()
    x = _images(2)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last_3d)
    out = m_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cascade_chains_the_stages():
    torch.manual_seed(0)
    s1, s2 = AgeRegressor().eval(), CorrectionRegressor().eval()
    x, sex = _images(3), torch.tensor([1.0, -1.0, 0.0])
    final, first = Cascade(s1, s2)(x, sex)
    torch.testing.assert_close(first, s1(x, sex))
    torch.testing.assert_close(final, s2(x, s1(x, sex), sex))
