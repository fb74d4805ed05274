"""Time rankcore's ranks, SRCC, Ld and soft ranks against what a user would reach for.

Run: ``python benchmarks/bench_rankcore.py [--repeat K] [--threads T]``. Not a test: it prints
Markdown tables (paste them into the README's performance section). Every comparison runs in
one process on the same inputs; each time is the best of K repeats (``time.perf_counter``),
each repeat averaging enough calls to last ~5 ms, the reference and rankcore timed in turn
within every repeat so that load on a shared machine hits both alike.
"speed-up" = reference time / our time, so > 1 means rankcore is faster.

References:
    * ``rank``: ``scipy.stats.rankdata(a, axis=-1)`` (vectorised over rows).
    * ``get_tiedrank``: ``(N + 1 - scipy.stats.rankdata(a, axis=-1)) / N``.
    * ``srcc``: a Python loop ``[spearmanr(a[i], b[i]).statistic for i in range(B)]``; scipy
      has no row-wise paired form (``spearmanr(a, b, axis=1)`` returns the full 2B x 2B
      correlation matrix instead).
    * ``age_difference_loss``: the naive pairwise mean of eq. (5), vectorised in torch as an
      N x N matrix of differences (a Python double loop would be far slower still).
    * ``soft_rank``: method ``"pav"`` against ``"pairwise"`` (only if rankcore.soft exists).
Inputs: integer ages (years, 18..90, so heavily tied), float64, seed 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import scipy
import scipy.stats
import torch

from rankcore.losses import age_difference_loss
from rankcore.metrics import srcc
from rankcore.ranks import get_tiedrank, rank

RANK_SHAPES = ((512, 128), (4096, 32), (1, 4096))
LD_SIZES = (1024, 4096)
SOFT_SIZES = (32, 128, 512, 1024, 4096)
SOFT_STRENGTH_TIMES_N = 0.1  # strength = 0.1 / N: ~1/25 of the typical gap of N(0, 1) data


def _calibrate(fn: Callable[[], object], sync: Callable[[], None],
               min_repeat_s: float) -> int:
    """Calls per repeat so that one repeat lasts about ``min_repeat_s``."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, int(min_repeat_s / once)))


def best_times(fns: list[Callable[[], object]], repeat: int,
               sync: Callable[[], None] | None = None,
               min_repeat_s: float = 0.005, max_total_s: float = 4.0) -> list[float]:
    """Best-of-``repeat`` seconds per call of each function in ``fns``.

    The functions are timed in turn inside every repeat (interleaved), so a burst of load on a
    shared machine hits the reference and rankcore alike; each repeat averages enough calls to
    last about ``min_repeat_s``. Stops early (after at least 3 repeats) once ``max_total_s``
    is spent, for slow references such as a Python loop of spearmanr.
    """
    sync = sync or (lambda: None)
    numbers = [_calibrate(fn, sync, min_repeat_s) for fn in fns]
    best = [float("inf")] * len(fns)
    start = time.perf_counter()
    for i in range(repeat):
        if i >= 3 and time.perf_counter() - start > max_total_s:
            break
        for k, (fn, number) in enumerate(zip(fns, numbers)):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            best[k] = min(best[k], (time.perf_counter() - t0) / number)
    return best


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _sync_for(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device == "cuda" else None


def rank_table(repeat: int) -> list[str]:
    rows = ["| op | shape (B, N) | device | reference | reference time | rankcore time "
            "| speed-up |", "|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for shape in RANK_SHAPES:
        a = rng.integers(18, 91, shape).astype(np.float64)
        b = rng.integers(18, 91, shape).astype(np.float64)
        n = shape[-1]

        def ref_rank(a=a):
            return scipy.stats.rankdata(a, axis=-1)

        def ref_tied(a=a, n=n):
            return (n + 1 - scipy.stats.rankdata(a, axis=-1)) / n

        def spearman_loop(a=a, b=b):
            return [scipy.stats.spearmanr(a[i], b[i]).statistic for i in range(a.shape[0])]

        # same answers before timing anything
        np.testing.assert_array_equal(rank(a).numpy(), ref_rank())
        np.testing.assert_allclose(srcc(a, b), spearman_loop(), atol=1e-6)
        for device in _devices():
            ta = torch.from_numpy(a).to(device)
            tb = torch.from_numpy(b).to(device)
            sync = _sync_for(device)
            cases = (
                ("rank", "rankdata(axis=-1)", ref_rank, lambda ta=ta: rank(ta)),
                ("get_tiedrank", "(N+1-rankdata)/N", ref_tied,
                 lambda ta=ta: get_tiedrank(ta, dim=-1)),
                ("srcc", "loop of spearmanr", spearman_loop, lambda ta=ta, tb=tb: srcc(ta, tb)),
            )
            for op, ref_name, ref_fn, fn in cases:
                ref_t, t = best_times([ref_fn, fn], repeat, sync)
                rows.append(f"| {op} | {shape} | {device} | {ref_name} | {fmt_time(ref_t)} "
                            f"| {fmt_time(t)} | {ref_t / t:.2f}× |")
    return rows


def ld_table(repeat: int) -> list[str]:
    rows = ["| N | device | naive pairwise O(N²) | age_difference_loss O(N) | speed-up | "
            "max rel. diff |", "|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for n in LD_SIZES:
        pred = torch.randn(n, dtype=torch.float64, generator=g) * 10 + 50
        target = torch.randint(18, 91, (n,), generator=g).double()
        for device in _devices():
            p, t = pred.to(device), target.to(device)
            sync = _sync_for(device)

            def naive(p=p, t=t, n=n):
                e = p - t
                d = (e[:, None] - e[None, :]).triu(1)
                return d.square().sum() / (n * (n - 1) / 2)

            ref_t, ours_t = best_times([naive, lambda p=p, t=t: age_difference_loss(p, t)],
                                       repeat, sync)
            rel = abs(float(naive()) - float(age_difference_loss(p, t))) / float(naive())
            rows.append(f"| {n} | {device} | {fmt_time(ref_t)} | {fmt_time(ours_t)} "
                        f"| {ref_t / ours_t:.0f}× | {rel:.1e} |")
    return rows


def soft_table(repeat: int) -> list[str]:
    if importlib.util.find_spec("rankcore.soft") is None:
        return ["(rankcore.soft is not present: soft_rank not timed)"]
    from rankcore.soft import soft_rank

    rows = [f"x ~ N(0, 1), one row of N, float64; strength = {SOFT_STRENGTH_TIMES_N} / N "
            "(small against the typical gap ~2.5 / N); error = max |soft_rank - rank|; "
            "fwd+bwd = forward + backward of sum(r · w)", "",
            "| N | device | pav fwd | pairwise fwd | pav fwd+bwd | pairwise fwd+bwd "
            "| pairwise ÷ pav (fwd+bwd) | max err pav | max err pairwise |",
            "|---|---|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for n in SOFT_SIZES:
        x0 = torch.randn(n, dtype=torch.float64, generator=g)
        w0 = torch.randn(n, dtype=torch.float64, generator=g)
        exact = rank(x0)
        strength = SOFT_STRENGTH_TIMES_N / n
        for device in _devices():
            x, w = x0.to(device), w0.to(device)
            sync = _sync_for(device)
            fwds, fwd_bwds, errs = [], [], []
            for method in ("pav", "pairwise"):
                fwds.append(lambda x=x, m=method, s=strength: soft_rank(x, method=m, strength=s))

                def fwd_bwd(x=x, w=w, m=method, s=strength):
                    xr = x.detach().requires_grad_()
                    (soft_rank(xr, method=m, strength=s) * w).sum().backward()

                fwd_bwds.append(fwd_bwd)
                r = soft_rank(x, method=method, strength=strength).cpu()
                errs.append(float((r - exact).abs().max()))
            cells = best_times(fwds, repeat, sync)
            both = best_times(fwd_bwds, repeat, sync)
            rows.append(f"| {n} | {device} | {fmt_time(cells[0])} | {fmt_time(cells[1])} "
                        f"| {fmt_time(both[0])} | {fmt_time(both[1])} | {both[1] / both[0]:.1f}× "
                        f"| {errs[0]:.1e} | {errs[1]:.1e} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="best of K repeats (30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    print(f"torch {torch.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"python {platform.python_version()}")
    print(f"torch threads: {torch.get_num_threads()}, CPU cores: {os.cpu_count()} "
          f"({platform.machine()}), CUDA: {cuda}; best of {args.repeat}; load average "
          f"{os.getloadavg()[0]:.1f} (timings on a busy machine are noisy)")
    print("\n### Exact ranks and SRCC (integer ages 18..90, heavy ties; speed-up = ref ÷ ours)\n")
    print("\n".join(rank_table(args.repeat)))
    print("\n### Age-difference loss Ld (eq. 5) over all pairs\n")
    print("\n".join(ld_table(args.repeat)))
    print("\n### soft_rank: pav vs pairwise\n")
    print("\n".join(soft_table(args.repeat)))


if __name__ == "__main__":
    main()
