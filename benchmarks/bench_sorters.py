"""Accuracy and cost of every rank surrogate (issue 4 §2), printed as Markdown, in one run.

Surrogates: the shipped learned sorters (``rankcore/sorters/pretrained``: the length-agnostic
``pairwise`` and SoDeep's fixed-length ``lstm`` at 16, 32, 64), any extra sorter files given
with ``--sorter`` (e.g. ``gru`` / ``cnn`` runs of ``brainrank pretrain-sorter``), the
training-free soft ranks of ``rankcore.soft`` (``pav`` and ``pairwise`` at a few strengths, in
standard deviations, applied as SoftSpearmanLoss applies them) and exact ranks.

On the fixed accuracy suite (``rankcore.sorters.evaluation.accuracy_suite``: N = 8 … 256, every
generator family, with and without ties) it reports mean |rank error|/N, Spearman between the
surrogate's and the exact ranks, and gradient agreement (cosine with the smoothed exact
objective's gradient; see the evaluation module), then the forward+backward time of the
ranking loss on one mini-batch of N predictions (one sequence, as SpearmanLoss ranks a batch)
at N = 32, 128, 1024.

    python benchmarks/bench_sorters.py [--rows 64] [--grad-rows 16] [--sorter FILE ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from rankcore.ranks import get_tiedrank
from rankcore.sorters import load_sorter
from rankcore.sorters.evaluation import (
    FD_SCALE,
    NOISE,
    SUITE_LENGTHS,
    Surrogate,
    accuracy_suite,
    evaluate_surrogate,
    exact_surrogate,
    fd_self_agreement,
    soft_surrogate,
    sorter_surrogate,
    summarize,
)
from rankcore.sorters.shipped import list_pretrained, load_pretrained

SOFT = [("pav", 0.01), ("pav", 0.05), ("pav", 0.2), ("pairwise", 0.01), ("pairwise", 0.05),
        ("pairwise", 0.2)]
TIMING_LENGTHS = (32, 128, 1024)


def _surrogates(extra: list[str]) -> list[Surrogate]:
    out = []
    for name in list_pretrained():
        s = load_pretrained(name)
        out.append(sorter_surrogate(s, f"{name} ({s.card['steps']} steps)"))
    for path in extra:
        s = load_sorter(path)
        out.append(sorter_surrogate(s, f"{Path(path).stem} ({s.card.get('steps')} steps)"))
    out += [soft_surrogate(m, st) for m, st in SOFT]
    out.append(exact_surrogate())
    return out


def _fmt(v: float, digits: int = 4) -> str:
    return "—" if math.isnan(v) else f"{v:.{digits}f}"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _time_loss(s: Surrogate, n: int, repeats: int = 5) -> float:
    """Median seconds of forward+backward of the surrogate's MSE loss on (1, N)."""
    gen = torch.Generator().manual_seed(n)
    y = 20 + 70 * torch.rand(1, n, generator=gen)
    y = torch.round(y)                                            # integer ages: ties
    target = get_tiedrank(y, dim=-1)
    p0 = y + 5 * torch.randn(1, n, generator=gen)
    times = []
    for k in range(repeats + 1):
        p = p0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        loss = (s.ranks(p) - target).square().mean()
        loss.backward()
        if k:                                                     # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="sequences per suite cell (64)")
    ap.add_argument("--grad-rows", type=int, default=16,
                    help="rows per cell for gradient agreement (16)")
    ap.add_argument("--sorter", action="append", default=[], metavar="FILE",
                    help="extra sorter file to include (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = accuracy_suite(SUITE_LENGTHS, rows=args.rows)
    surrogates = _surrogates(args.sorter)
    t0 = time.perf_counter()
    scores = {s.name: evaluate_surrogate(s, suite, grad_rows=args.grad_rows) for s in surrogates}
    eval_s = time.perf_counter() - t0
    header = ["surrogate", *[f"N={n}" for n in SUITE_LENGTHS]]

    def rows(metric: str, fmt) -> list[list[str]]:
        out = []
        for s in surrogates:
            cells = []
            for n in SUITE_LENGTHS:
                if not s.accepts(n):
                    cells.append("n/a")
                    continue
                cells.append(fmt(metric, summarize(scores[s.name], seq_len=n, ties=True),
                                 summarize(scores[s.name], seq_len=n, ties=False),
                                 summarize(scores[s.name], seq_len=n)))
            out.append([s.name, *cells])
        return out

    print(f"## Rank surrogates: accuracy suite (rows/cell {args.rows}, "
          f"{len(suite)} cells; torch {torch.__version__}, {args.threads} thread(s))\n")
    print(_table("Spearman between surrogate and exact ranks — tied / tie-free sequences",
                 header, rows("spearman", lambda m, t, f, a: f"{_fmt(t[m])} / {_fmt(f[m])}")))
    print()
    print(_table("Mean |rank error| / N — tied / tie-free sequences", header,
                 rows("rank_error", lambda m, t, f, a: f"{_fmt(t[m])} / {_fmt(f[m])}")))
    print()
    ceiling = [_fmt(float(fd_self_agreement(torch.cat(
        [c.x[:args.grad_rows] for c in suite if c.seq_len == n])).mean()), 3)
        for n in SUITE_LENGTHS]
    grad_rows = rows("grad_cosine",
                     lambda m, t, f, a: f"{_fmt(a[m], 3)} ({_fmt(a['grad_norm'], 3)})")
    grad_rows.append(["*two independent FD estimates (noise; ≈ ceiling²)*", *ceiling])
    print(_table(f"Gradient agreement: cosine with the smoothed exact gradient (σ = {FD_SCALE} "
                 f"std, predictions = targets + {NOISE} std noise) — (‖∇‖·std)", header,
                 grad_rows))
    print()
    timing = []
    for s in surrogates:
        if not s.differentiable:
            continue
        timing.append([s.name, *[f"{1e3 * _time_loss(s, n):.2f}" if s.accepts(n) else "n/a"
                                 for n in TIMING_LENGTHS]])
    print(_table("Forward + backward of the ranking loss on one mini-batch of N predictions, "
                 "ms (median of 5)", ["surrogate", *[f"N={n}" for n in TIMING_LENGTHS]],
                 timing))
    print(f"\n(accuracy suite evaluated in {eval_s:.0f} s)")


if __name__ == "__main__":
    main()
