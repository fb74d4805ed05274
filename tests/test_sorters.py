"""rankcore.sorters: families, input normalisation, sampler, evaluation suite, checkpoints."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from scipy.stats import rankdata

from rankcore.errors import CheckpointError, InputError, ShapeError, SorterLengthError
from rankcore.sorters import (
    CONVENTION,
    FAMILIES,
    SORTER_KINDS,
    SequenceSampler,
    build_sorter,
    fixed_eval_set,
    load_sorter,
    normalize_sequences,
    save_sorter,
)
from rankcore.sorters.sampler import CONTINUOUS_FAMILIES, has_ties

N = 12  # the length fixed-length sorters are built for in these tests
SMALL = {
    "lstm": {"hidden_size": 8, "head_dim": 4},
    "gru": {"hidden_size": 8},
    "cnn": {"channels": 8, "num_blocks": 2},
    "pairwise": {"hidden_size": 8},
}
AGNOSTIC = [k for k in SORTER_KINDS if k != "lstm"]


def make(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_sorter(kind, seq_len=N, **SMALL[kind])


def scipy_target(x: torch.Tensor) -> np.ndarray:
    """Tie-aware SoDeep ranks from scipy: (N + 1 − R)/N along the last dim."""
    a = x.detach().cpu().double().numpy()
    n = a.shape[-1]
    return (n + 1 - rankdata(a, axis=-1, method="average")) / n


# --- families ---------------------------------------------------------------------------------

def test_kinds_listed():
    assert set(SORTER_KINDS) == {"lstm", "gru", "cnn", "pairwise"}


@pytest.mark.parametrize("kind", SORTER_KINDS)
def test_attributes(kind):
    s = make(kind)
    assert s.kind == kind
    assert s.convention == CONVENTION == "sodeep_desc_norm"
    assert s.seq_len == (N if kind == "lstm" else None)
    assert s.sizes == {**build_sorter(kind, seq_len=N).sizes, **SMALL[kind]}


@pytest.mark.parametrize("kind", SORTER_KINDS)
@pytest.mark.parametrize("shape", [(N,), (3, N), (2, 3, N)])
def test_forward_backward_shapes(kind, shape):
    s = make(kind)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 10 + 50)
    x.requires_grad_(True)
    out = s(x)
    assert out.shape == shape
    assert torch.isfinite(out).all()
    (out * torch.linspace(-1, 1, N)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in s.parameters())


@pytest.mark.parametrize("kind", SORTER_KINDS)
def test_batched_equals_row_by_row(kind):
    s = make(kind).eval()
    x = torch.randn(4, N, generator=torch.Generator().manual_seed(2))
    rows = torch.stack([s(r) for r in x])
    torch.testing.assert_close(s(x), rows, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", SORTER_KINDS)
def test_input_scale_invariance_raw_ages_vs_zscored(kind):
    """Issue 4 §0: raw ages in years and the same ages z-scored give the same ranks."""
    s = make(kind).eval()
    gen = torch.Generator().manual_seed(3)
    ages = torch.round(20 + 70 * torch.rand(5, N, generator=gen, dtype=torch.float64))
    z = (ages - ages.mean(-1, keepdim=True)) / ages.std(-1, keepdim=True)
    tiny = ages * 1e-4 - 3.0
    with torch.no_grad():
        ref = s(z.float())
        torch.testing.assert_close(s(ages.float()), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(s(tiny.float()), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(s(ages), ref, atol=1e-5, rtol=0)  # float64 input


def test_normalize_sequences_properties():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 7 + 3
    z = normalize_sequences(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(6, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(z.std(-1, unbiased=False), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(normalize_sequences(1e-3 * x - 1e3), z, atol=1e-6, rtol=0)
    const = torch.full((2, 5), 1e6, requires_grad=True)
    out = normalize_sequences(const)
    assert torch.equal(out, torch.zeros(2, 5))
    out.sum().backward()
    assert torch.isfinite(const.grad).all()


@pytest.mark.parametrize("kind", SORTER_KINDS)
@pytest.mark.parametrize("value", [0.0, 47.0, -1e6])
def test_constant_sequence_no_nan(kind, value):
    s = make(kind)
    x = torch.full((2, N), value, requires_grad=True)
    out = s(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_pairwise_permutation_equivariant_and_tie_exact():
    s = make("pairwise").eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=gen)
    x[:, 7] = x[:, 3]  # a tie
    perm = torch.randperm(40, generator=gen)
    with torch.no_grad():
        out = s(x)
        torch.testing.assert_close(s(x[:, perm]), out[:, perm], atol=1e-6, rtol=0)
        # tied inputs get exactly the same prediction; predictions sum to (N + 1)/2
        assert torch.equal(out[:, 7], out[:, 3])
        torch.testing.assert_close(out.sum(-1), torch.full((3,), 41 / 2))


_PAIRWISE = make("pairwise", seed=21).eval()


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.integers(-5, 5), min_size=2, max_size=30),
       log_scale=st.floats(-3, 3), shift=st.floats(-10, 10), seed=st.integers(0, 2**16))
def test_pairwise_properties_on_tied_integers(values, log_scale, shift, seed):
    """Heavy ties: tied inputs get equal outputs, outputs sum to (N + 1)/2, invariant under
    affine maps and equivariant under permutations."""
    x = torch.tensor(values, dtype=torch.float64)
    n = x.numel()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a = 10.0**log_scale
    with torch.no_grad():
        out = _PAIRWISE(x)
        same = x.unsqueeze(0) == x.unsqueeze(1)
        assert torch.equal(same & (out.unsqueeze(0) == out.unsqueeze(1)), same)
        assert abs(float(out.sum()) - (n + 1) / 2) < 1e-4
        torch.testing.assert_close(_PAIRWISE(a * x + shift * a), out, atol=1e-5, rtol=0)
        torch.testing.assert_close(_PAIRWISE(x[perm]), out[perm], atol=1e-6, rtol=0)


def test_pairwise_constant_sequence_gets_exact_average_rank():
    s = make("pairwise")
    out = s(torch.full((7,), 3.0))
    torch.testing.assert_close(out, torch.full((7,), 4 / 7))  # (N + 1)/(2N)


@pytest.mark.parametrize("kind", AGNOSTIC)
@pytest.mark.parametrize("n", [1, 8, 128])
def test_length_agnostic_families_accept_any_length(kind, n):
    s = make(kind)
    with torch.no_grad():
        out = s(torch.randn(2, n))
    assert out.shape == (2, n) and torch.isfinite(out).all()


def test_lstm_refuses_other_length():
    s = make("lstm")
    with pytest.raises(SorterLengthError, match=rf"seq_len {N}.*length 7"):
        s(torch.randn(2, 7))


@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.zeros(3, 0)])
def test_forward_rejects_bad_shapes(bad):
    with pytest.raises(ShapeError):
        make("gru")(bad)


def test_forward_rejects_nonfinite_and_non_tensor():
    s = make("pairwise")
    with pytest.raises(InputError, match="`x` must be finite"):
        s(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(InputError, match="`x` must be a tensor"):
        s([1.0, 2.0])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "transformer"}, "`kind` must be one of"),
    ({"kind": "lstm"}, "`seq_len` must be given"),
    ({"kind": "lstm", "seq_len": 1}, "`seq_len` must be an integer >= 2"),
    ({"kind": "gru", "seq_len": 0}, "`seq_len` must be a positive integer or None"),
    ({"kind": "gru", "width": 3}, "unknown width"),
    ({"kind": "gru", "hidden_size": 0}, "`hidden_size` must be a positive integer"),
    ({"kind": "gru", "hidden_size": 2.5}, "`hidden_size` must be a positive integer"),
    ({"kind": "cnn", "kernel_size": 4}, "`kernel_size` must be odd"),
])
def test_build_sorter_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        build_sorter(**kwargs)


# --- sampler ----------------------------------------------------------------------------------

def test_sampler_deterministic_and_streams_independent():
    a = SequenceSampler(7, 16, 32)
    x0, t0 = a.batch(3)
    x1, t1 = SequenceSampler(7, 16, 32).batch(3)
    assert torch.equal(x0, x1) and torch.equal(t0, t1)
    assert not torch.equal(x0, a.batch(4)[0])
    assert not torch.equal(x0, SequenceSampler(7, 16, 32, worker=1).batch(3)[0])
    assert not torch.equal(x0, SequenceSampler(8, 16, 32).batch(3)[0])
    it = a.iterate(3)
    assert torch.equal(next(it)[0], x0) and torch.equal(next(it)[0], a.batch(4)[0])
    assert torch.equal(next(iter(a))[0], a.batch(0)[0])


def test_sampler_targets_equal_scipy_exactly():
    s = SequenceSampler(11, 24, 256, dtype=torch.float64)
    for step in range(3):
        x, t = s.batch(step)
        assert t.dtype == torch.float64 and t.shape == x.shape == (256, 24)
        np.testing.assert_array_equal(t.numpy(), scipy_target(x))


def test_sampler_float32_targets_match_scipy():
    x, t = SequenceSampler(12, 33, 128).batch(0)
    assert x.dtype == t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), scipy_target(x), rtol=0, atol=1e-7)


def test_sampler_tie_coverage():
    x, _ = SequenceSampler(13, 32, 1024).batch(0)
    frac = has_ties(x).double().mean().item()
    assert 0.4 < frac < 0.9  # both tied and tie-free sequences are common
    x, _ = SequenceSampler(13, 32, 256, tie_prob=0.0, families=CONTINUOUS_FAMILIES).batch(0)
    assert has_ties(x).double().mean().item() < 0.05
    x, _ = SequenceSampler(13, 32, 256, tie_prob=1.0, families=CONTINUOUS_FAMILIES).batch(0)
    assert has_ties(x).double().mean().item() > 0.9


def test_sampler_age_family_is_age_like():
    x, _ = SequenceSampler(14, 64, 128, families=["age"], affine_prob=0.0).batch(0)
    assert x.min() >= 18 and x.max() <= 90
    half_years = torch.equal(torch.round(x * 2), x * 2)
    assert half_years and has_ties(x).all()


def test_sampler_scales_vary_widely():
    x, _ = SequenceSampler(15, 32, 512).batch(0)
    spread = x.std(-1)
    spread = spread[spread > 0]
    assert spread.max() / spread.min() > 1e4


def test_sampler_variable_lengths():
    s = SequenceSampler(16, [8, 16, 32], 4)
    lengths = {s.batch(i)[0].shape[-1] for i in range(30)}
    assert lengths == {8, 16, 32}


def test_sampler_every_family_draws():
    for family in FAMILIES:
        x, t = SequenceSampler(17, 10, 16, families=[family]).batch(0)
        assert x.shape == (16, 10) and torch.isfinite(x).all()
        np.testing.assert_allclose(t.numpy(), scipy_target(x), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seed": -1}, "`seed`"),
    ({"seq_len": 0}, "`seq_len`"),
    ({"seq_len": []}, "`seq_len`"),
    ({"batch_size": 0}, "`batch_size`"),
    ({"families": ["cauchy"]}, "`families`"),
    ({"families": {"normal": 0.0}}, "`families`"),
    ({"tie_prob": 1.5}, "`tie_prob`"),
    ({"dtype": torch.int64}, "`dtype`"),
])
def test_sampler_validation(kwargs, match):
    args = {"seed": 0, "seq_len": 8, "batch_size": 4, **kwargs}
    with pytest.raises(InputError, match=match):
        SequenceSampler(**args)


def test_fixed_eval_set():
    cells = fixed_eval_set(3, (8, 40), rows=16)
    again = fixed_eval_set(3, (40,), rows=16)
    same = [c for c in cells if c.seq_len == 40]
    assert len(same) == len(again)
    for a, b in zip(same, again):
        assert (a.family, a.ties) == (b.family, b.ties) and torch.equal(a.x, b.x)
    assert {(c.family, c.ties) for c in cells if c.seq_len == 8} == (
        {(f, True) for f in FAMILIES} | {(f, False) for f in (*CONTINUOUS_FAMILIES, "age")})
    for c in cells:
        assert c.x.shape == c.target.shape == (16, c.seq_len)
        assert bool(has_ties(c.x).all()) if c.ties else not bool(has_ties(c.x).any())
        np.testing.assert_allclose(c.target.numpy(), scipy_target(c.x), rtol=0, atol=1e-7)
    with pytest.raises(InputError, match="`seq_lens`"):
        fixed_eval_set(0, (1,))


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SORTER_KINDS)
def test_save_load_round_trip(tmp_path, kind):
    s = make(kind, seed=9)
    path = tmp_path / "sub" / f"{kind}.safetensors"
    card = save_sorter(path, s, {"steps": 5, "seed": 9, "metrics": {"srcc": 0.99}})
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert not list(path.parent.glob("*.tmp"))
    side = json.loads(path.with_suffix(".json").read_text())
    assert side == card
    assert side["kind"] == kind and side["convention"] == CONVENTION
    assert side["seq_len"] == s.seq_len and side["sizes"] == s.sizes
    assert side["steps"] == 5 and side["metrics"] == {"srcc": 0.99}
    assert side["library_version"]
    loaded = load_sorter(path, seq_len=N)
    assert not loaded.training and loaded.card == card and loaded.kind == kind
    x = torch.randn(3, N)
    with torch.no_grad():
        assert torch.equal(loaded(x), s.eval()(x))


def test_load_fixed_length_with_other_seq_len(tmp_path):
    path = tmp_path / "lstm.safetensors"
    save_sorter(path, make("lstm"))
    with pytest.raises(SorterLengthError, match=rf"trained for seq_len {N}, got 64"):
        load_sorter(path, seq_len=64)
    save_sorter(tmp_path / "gru.safetensors", make("gru"))
    assert load_sorter(tmp_path / "gru.safetensors", seq_len=64).seq_len is None
    with pytest.raises(InputError, match="`seq_len`"):
        load_sorter(path, seq_len=0)
    with pytest.raises(InputError, match="`map_location`"):
        load_sorter(path, map_location="nowhere")


def _rewrite_card(path, **changes):
    """Rewrite a sorter file's embedded card (weights untouched) and drop its sidecar."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        card = json.loads(f.metadata()["brainrank_card"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    card.update(changes)
    save_file(tensors, str(path), metadata={"brainrank_card": json.dumps(card)})
    path.with_suffix(".json").unlink(missing_ok=True)


@pytest.mark.parametrize(("changes", "match"), [
    ({"kind": "transformer"}, "kind 'transformer'"),
    ({"convention": "ascending"}, "rank convention 'ascending'"),
    ({"sizes": {"hidden_size": 9}}, "do not fit"),
    ({"sizes": {"bogus": 1}}, "cannot be built"),
    ({"format": "other/9"}, "format"),
])
def test_load_rejects_bad_cards(tmp_path, changes, match):
    path = tmp_path / "s.safetensors"
    save_sorter(path, make("gru"))
    _rewrite_card(path, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_sorter(path)


def test_load_rejects_tampered_weights(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sorter(path, make("pairwise"))
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # flip a bit in the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest"):
        load_sorter(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle", "no_card"])
def test_load_rejects_corrupt_files(tmp_path, damage):
    path = tmp_path / "s.safetensors"
    save_sorter(path, make("cnn"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "pickle":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    else:
        save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError):
        load_sorter(path)


def test_load_rejects_mismatched_sidecar_and_missing_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_sorter(path, make("gru"))
    side = json.loads(path.with_suffix(".json").read_text())
    side["kind"] = "cnn"
    path.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="disagrees"):
        load_sorter(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sorter(tmp_path / "missing.safetensors")


def test_save_validation(tmp_path):
    s = make("gru")
    with pytest.raises(InputError, match=r"`path` must end in \.safetensors"):
        save_sorter(tmp_path / "s.pt", s)
    with pytest.raises(InputError, match="`card` must not contradict"):
        save_sorter(tmp_path / "s.safetensors", s, {"kind": "lstm"})
    with pytest.raises(InputError, match="JSON-serialisable"):
        save_sorter(tmp_path / "s.safetensors", s, {"loss": float("nan")})
    with pytest.raises(InputError, match="`sorter`"):
        save_sorter(tmp_path / "s.safetensors", torch.nn.Linear(2, 2))
    assert not list(tmp_path.iterdir())
