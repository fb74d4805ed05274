"""rankcore.losses: closed forms against naive references, gradients, shapes and messages."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from rankcore.errors import InputError, ShapeError, SorterLengthError
from rankcore.losses import (
    BrainAgeLoss,
    SoftSpearmanLoss,
    SpearmanLoss,
    age_difference_loss,
    rank_loss,
)
from rankcore.ranks import get_tiedrank, rank

FAST = settings(max_examples=50, deadline=None)


class TinySorter(nn.Module):
    """An untrained fixed-length MLP sorter: (B, N) -> (B, N) in (0, 1), seeded weights."""

    kind = "tiny-mlp"

    def __init__(self, seq_len: int, hidden: int = 8, seed: int = 0,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        self.seq_len = seq_len
        self.net = nn.Sequential(nn.Linear(seq_len, hidden), nn.Tanh(),
                                 nn.Linear(hidden, seq_len), nn.Sigmoid())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ExactSorter(nn.Module):
    """A perfect, length-agnostic 'sorter': the exact tie-aware SoDeep ranks (no gradient)."""

    kind = "exact"
    seq_len = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_tiedrank(x, dim=-1)


def _naive_ld(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (5) literally: the mean over all N(N - 1)/2 unordered pairs i < j, O(N^2)."""
    i, j = torch.triu_indices(pred.shape[-1], pred.shape[-1], offset=1)
    terms = ((pred[..., i] - pred[..., j]) - (target[..., i] - target[..., j])) ** 2
    return terms.mean(-1)


ages = hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 12)),
                  elements=st.floats(0, 100, allow_nan=False, width=32))


# --------------------------------------------------------------------- age difference


@FAST
@given(pred=ages, data=st.data())
def test_age_difference_loss_equals_naive_pairwise_mean(pred, data):
    target = data.draw(hnp.arrays(np.float64, pred.shape, elements=st.integers(20, 90)))
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    naive = _naive_ld(p, t)
    torch.testing.assert_close(age_difference_loss(p, t, reduction="none"), naive,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(age_difference_loss(p, t), naive.mean(), rtol=1e-9, atol=1e-9)
    # and it is 2 var(e), unbiased
    torch.testing.assert_close(age_difference_loss(p[0], t[0]),
                               torch.tensor(2 * np.var(pred[0] - target[0], ddof=1),
                                            dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_age_difference_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(age_difference_loss, (p, t))
    assert torch.autograd.gradcheck(lambda a, b: age_difference_loss(a, b, "none"), (p, t))


# --------------------------------------------------------------------- rank loss


@FAST
@given(n=st.integers(2, 30), seed=st.integers(0, 2**32 - 1))
def test_rank_loss_is_alpha_times_one_minus_rr_without_ties(n, seed):
    rng = np.random.default_rng(seed)
    pred, target = rng.permutation(n).astype(float) * 1.5, rng.normal(size=n)
    target = np.unique(target)[rng.permutation(np.unique(target).size)]
    if target.size != n:  # pragma: no cover - normal draws are almost surely distinct
        return
    lr = rank_loss(torch.from_numpy(pred), torch.from_numpy(target)).item()
    rr = scipy.stats.spearmanr(pred, target).statistic
    assert lr == pytest.approx(n * (n**2 - 1) / 6 * (1 - rr), rel=1e-9, abs=1e-9)


@FAST
@given(a=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 10)),
                    elements=st.integers(0, 3)), data=st.data())
def test_rank_loss_with_ties_uses_fractional_ranks(a, data):
    b = data.draw(hnp.arrays(np.float64, a.shape, elements=st.integers(0, 3)))
    expected = ((scipy.stats.rankdata(a, axis=-1) - scipy.stats.rankdata(b, axis=-1)) ** 2).sum(-1)
    got = rank_loss(torch.from_numpy(a), torch.from_numpy(b), reduction="none")
    np.testing.assert_array_equal(got.numpy(), expected)
    assert not rank_loss(torch.from_numpy(a).requires_grad_(), torch.from_numpy(b)).requires_grad


# --------------------------------------------------------------------- SpearmanLoss


def test_spearman_loss_value_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    sorter = TinySorter(6)
    pred = torch.randn(4, 6, dtype=torch.float64, generator=g) * 10 + 50
    target = torch.randint(20, 25, (4, 6), generator=g).double()  # ties
    loss = SpearmanLoss(sorter)(pred, target)
    expected = ((sorter(pred) - get_tiedrank(target, dim=-1)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    # B sequences: the mean of per-row losses (every row has N values)
    rows = torch.stack([SpearmanLoss(sorter)(pred[i], target[i]) for i in range(4)])
    torch.testing.assert_close(loss, rows.mean())
    with_l1 = SpearmanLoss(sorter, l1_weight=0.25)(pred, target)
    torch.testing.assert_close(with_l1, expected + 0.25 * (pred - target).abs().mean())


def test_spearman_loss_with_an_exact_sorter_is_normalised_rank_loss():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(3, 9, dtype=torch.float64, generator=g)
    target = torch.randn(3, 9, dtype=torch.float64, generator=g)
    loss = SpearmanLoss(ExactSorter())(pred, target)
    torch.testing.assert_close(loss, rank_loss(pred, target) / 9**3)
    assert SpearmanLoss(ExactSorter())(target, target).item() == 0.0


def test_spearman_loss_gradcheck_and_gradient_reaches_pred():
    g = torch.Generator().manual_seed(3)
    loss_fn = SpearmanLoss(TinySorter(5), l1_weight=0.1)
    pred = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randn(2, 5, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda p: loss_fn(p, target), (pred,))
    no_l1 = SpearmanLoss(TinySorter(5))
    no_l1(pred, target).backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all())
    assert pred.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradient_reaches_pred_through_an_untrained_library_sorter(kind):
    from rankcore.sorters import build_sorter

    torch.manual_seed(0)
    sorter = build_sorter(kind, seq_len=8, hidden_size=8, num_layers=1)
    pred = (torch.randn(8) * 10 + 60).requires_grad_()
    target = torch.tensor([60.0, 61, 61, 70, 45, 45, 45, 80])
    SpearmanLoss(sorter)(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_spearman_loss_refuses_broadcasting_and_length_one_rows():
    loss_fn = SpearmanLoss(ExactSorter())
    with pytest.raises(ShapeError, match="same shape"):
        loss_fn(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ShapeError, match=r"squeeze\(-1\)"):
        loss_fn(torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ShapeError, match="0-d"):
        loss_fn(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(InputError, match="`pred` must be a tensor"):
        loss_fn(np.zeros(4), torch.zeros(4))
    with pytest.raises(InputError, match="`x` must be finite"):
        loss_fn(torch.zeros(3), torch.tensor([1.0, float("nan"), 2.0]))


def test_fixed_length_sorter_names_both_lengths():
    loss_fn = SpearmanLoss(TinySorter(8))
    with pytest.raises(SorterLengthError, match=r"length 8 only, got length 5"):
        loss_fn(torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    with pytest.raises(ShapeError):  # SorterLengthError is a ShapeError (a ValueError)
        loss_fn(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))


def test_spearman_loss_keeps_sorter_in_eval_mode_and_validates_arguments():
    sorter = TinySorter(4)
    loss_fn = SpearmanLoss(sorter)
    loss_fn.train()
    assert loss_fn.training and not sorter.training
    with pytest.raises(InputError, match=r"`sorter` must be a torch\.nn\.Module"):
        SpearmanLoss(lambda x: x)
    with pytest.raises(InputError, match="`l1_weight`"):
        SpearmanLoss(sorter, l1_weight=-1)
    bad = TinySorter(4)
    bad.seq_len = 0
    with pytest.raises(InputError, match=r"`sorter\.seq_len`"):
        SpearmanLoss(bad)


# --------------------------------------------------------------------- SoftSpearmanLoss


@pytest.mark.parametrize("method", ["pav", "pairwise"])
def test_soft_spearman_gradient_is_exact_with_the_scale_held_fixed(method):
    """The loss standardises pred with its DETACHED std, so its autograd gradient is that of
    the same objective with the scale frozen at the current point. Soft ranks are shift- and
    scale-equivariant, so that objective is g(p) = MSE(soft_rank(p, strength * std0) / N, ...):
    gradcheck g numerically in float64 and check the loss's gradient equals g's.
    (A plain gradcheck of the loss would count the std's own variation, which it excludes.)"""
    from rankcore.soft import soft_rank

    g = torch.Generator().manual_seed(4)
    pred = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 6), generator=g).double()
    loss_fn = SoftSpearmanLoss(method=method, strength=0.7, l1_weight=0.05)
    std0 = pred.detach().std(dim=-1, keepdim=True)

    def frozen_scale(p):
        total = 0.0
        for i in range(p.shape[0]):  # one strength per row: strength * std0[i]
            soft = soft_rank(p[i], method=method, strength=0.7 * std0[i].item())
            total = total + ((soft - rank(target[i])) ** 2).sum() / 6**2
        return total / p.numel() + 0.05 * (p - target).abs().mean()

    assert torch.autograd.gradcheck(frozen_scale, (pred,))
    (grad_loss,) = torch.autograd.grad(loss_fn(pred, target), pred)
    (grad_frozen,) = torch.autograd.grad(frozen_scale(pred), pred)
    torch.testing.assert_close(grad_loss, grad_frozen, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn(pred, target), frozen_scale(pred))


@pytest.mark.parametrize("method", ["pav", "pairwise"])
def test_soft_spearman_is_scale_free_and_tends_to_exact_rank_loss(method):
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 10, dtype=torch.float64, generator=g)
    target = torch.randint(20, 30, (3, 10), generator=g).double()
    loss_fn = SoftSpearmanLoss(method=method, strength=0.5)
    torch.testing.assert_close(loss_fn(pred * 12.0 + 40.0, target), loss_fn(pred, target))
    # at a small strength it is the exact normalised rank loss, the scale of SpearmanLoss
    sharp = SoftSpearmanLoss(method=method, strength=1e-4)(pred, target)
    exact = ((rank(pred, dim=-1) - rank(target, dim=-1)) ** 2).mean() / 10**2
    torch.testing.assert_close(sharp, exact, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exact, SpearmanLoss(ExactSorter())(pred, target))


def test_soft_spearman_constant_prediction_is_finite():
    pred = torch.full((5,), 42.0, dtype=torch.float64, requires_grad=True)
    loss = SoftSpearmanLoss()(pred, torch.arange(5.0, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(pred.grad).all())


def test_soft_spearman_validates_arguments():
    with pytest.raises(InputError, match="`method`"):
        SoftSpearmanLoss(method="sinkhorn")
    with pytest.raises(InputError, match="`strength`"):
        SoftSpearmanLoss(strength=0.0)
    with pytest.raises(ShapeError, match="same shape"):
        SoftSpearmanLoss()(torch.zeros(4, 1), torch.zeros(4))


# --------------------------------------------------------------------- BrainAgeLoss


@pytest.mark.parametrize("regression", ["mse", "l1"])
def test_brain_age_loss_total_and_parts(regression):
    g = torch.Generator().manual_seed(6)
    pred = (torch.randn(8, dtype=torch.float64, generator=g) * 5 + 50).requires_grad_()
    target = torch.randint(40, 60, (8,), generator=g).double()
    spearman = SpearmanLoss(TinySorter(8), l1_weight=0.1)
    loss_fn = BrainAgeLoss(regression=regression, rank=spearman, rank_weight=10.0,
                           diff_weight=0.5)
    total, parts = loss_fn(pred, target)
    assert set(parts) == {"regression", "rank", "diff", "total"}
    assert all(not v.requires_grad and v.ndim == 0 for v in parts.values())
    e = pred - target
    reg = (e**2).mean() if regression == "mse" else e.abs().mean()
    # decoupled weights: w_rank · S + w_diff · Ld, no bracket
    expected = reg + 10.0 * spearman(pred, target) + 0.5 * 2 * e.var()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["total"], total.detach())
    torch.testing.assert_close(parts["diff"], age_difference_loss(pred, target).detach())
    total.backward()
    assert pred.grad.abs().sum() > 0


def test_brain_age_loss_without_rank_term_and_gradcheck():
    g = torch.Generator().manual_seed(7)
    pred = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.randn(2, 5, dtype=torch.float64, generator=g)
    loss_fn = BrainAgeLoss(rank=None, rank_weight=2.0, diff_weight=1.0)
    total, parts = loss_fn(pred, target)
    assert parts["rank"].item() == 0.0
    torch.testing.assert_close(total, ((pred - target) ** 2).mean()
                               + 1.0 * age_difference_loss(pred, target))
    # (SoftSpearmanLoss's gradient holds its scale fixed; it is checked on its own above)
    full = BrainAgeLoss(rank=SpearmanLoss(TinySorter(5), l1_weight=0.1), diff_weight=0.3)
    assert torch.autograd.gradcheck(lambda p: full(p, target)[0], (pred,))


def test_reference_preset_is_the_bracket_form():
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(12, dtype=torch.float64, generator=g) * 6 + 50
    target = torch.randint(30, 70, (12,), generator=g).double()
    soft = SoftSpearmanLoss("pairwise", 0.05)
    ref = BrainAgeLoss.reference(soft)
    assert (ref.rank_weight, ref.diff_weight, ref.regression) == (10.0, 10.0, "mse")
    total, _ = ref(pred, target)
    bracket = F.mse_loss(pred, target) + 10.0 * (soft(pred, target)
                                                 + 1.0 * age_difference_loss(pred, target))
    torch.testing.assert_close(total, bracket, rtol=1e-14, atol=0)
    half = BrainAgeLoss.reference(soft, lam=4.0, beta=0.5)
    assert (half.rank_weight, half.diff_weight) == (4.0, 2.0)
    with pytest.raises(InputError, match="`beta`"):
        BrainAgeLoss.reference(soft, beta=-1.0)


def test_zero_weight_terms_are_left_out_of_the_total_bitwise():
    g = torch.Generator().manual_seed(10)
    pred = torch.randn(16, generator=g) * 7 + 45
    target = torch.randint(20, 80, (16,), generator=g).float()
    soft = SoftSpearmanLoss("pairwise", 0.05)
    plain = BrainAgeLoss(rank=None, diff_weight=0.0)
    built = BrainAgeLoss(rank=soft, rank_weight=0.0, diff_weight=0.0)
    set_later = BrainAgeLoss(rank=soft, rank_weight=5.0, diff_weight=0.0)
    set_later.rank_weight = 0.0  # as a calibration to share 0 does
    for zero in (built, set_later):
        p0, p1 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
        (t0, parts0), (t1, parts1) = plain(p0, target), zero(p1, target)
        assert torch.equal(t0, t1)
        assert parts1["rank"] > 0 and parts0["rank"] == 0  # S is still reported as a monitor
        t0.backward()
        t1.backward()
        assert torch.equal(p0.grad, p1.grad)
    with pytest.raises(InputError, match="`rank_weight`"):
        zero.rank_weight = -0.5


def test_brain_age_loss_validates_arguments():
    with pytest.raises(InputError, match="`regression` must be one of"):
        BrainAgeLoss(regression="huber")
    with pytest.raises(InputError, match="`rank_weight`"):
        BrainAgeLoss(rank_weight=-1)
    with pytest.raises(InputError, match="`diff_weight`"):
        BrainAgeLoss(diff_weight=float("nan"))
    with pytest.raises(InputError, match="`rank` must be"):
        BrainAgeLoss(rank="spearman")
    with pytest.raises(ShapeError, match="same shape"):
        BrainAgeLoss()(torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ShapeError, match="at least 2"):
        BrainAgeLoss()(torch.zeros(1), torch.zeros(1))


# --------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_losses_run_on_cuda_and_stay_on_device():
    g = torch.Generator().manual_seed(8)
    pred = (torch.randn(4, 8, generator=g) * 5 + 50).to("cuda").requires_grad_()
    target = torch.randint(40, 60, (4, 8), generator=g).float().to("cuda")
    for loss_fn in (SpearmanLoss(TinySorter(8, dtype=torch.float32).to("cuda")),
                    SoftSpearmanLoss("pav", 0.5), SoftSpearmanLoss("pairwise", 0.5)):
        total, parts = BrainAgeLoss(rank=loss_fn)(pred, target)
        assert total.device.type == "cuda"
        assert all(v.device.type == "cuda" for v in parts.values())
        cpu_total, _ = BrainAgeLoss(rank=loss_fn.to("cpu"))(pred.detach().cpu(), target.cpu())
        torch.testing.assert_close(total.detach().cpu(), cpu_total, rtol=1e-4, atol=1e-4)
        loss_fn.to("cuda")
        pred.grad = None
        total.backward()
        assert pred.grad.device.type == "cuda" and pred.grad.abs().sum() > 0
    assert age_difference_loss(pred, target).device.type == "cuda"
    assert rank_loss(pred, target).device.type == "cuda"
    with pytest.raises(SorterLengthError):
        SpearmanLoss(TinySorter(8).to("cuda"))(pred[:, :5], target[:, :5])
