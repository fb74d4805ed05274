"""Gradient shares of the objective's terms: the default objective against the reference preset.

On batches of N predicted ages (true ages uniform integers in [20, 80], predictions = truth +
Gaussian error of SD ``--error-sd`` years), for every objective below: the norm of each
weighted term's gradient with respect to the predictions, ‖w_k ∂L_k/∂ŷ‖₂, averaged over
``--batches`` batches, and each term's share of the summed norms (the definition of
:mod:`rankcore.train.shares`). Rows:

* default: :class:`rankcore.train.TrainConfig` as shipped (soft pairwise Spearman, the default
  w_rank, w_diff = 0);
* reference preset (MSE + 10(S + 1·Ld)) with the default surrogate, with the former default
  (soft PAV at strength 0.25) and with the shipped ``pairwise`` sorter;
* ``rank_share`` s: w_rank calibrated for a Spearman share s on CALIBRATION_BATCHES other
  batches (as training does on the initial predictions), then measured on these: the
  difference from s is the calibration's sampling error.

Usage::

    .venv/bin/python benchmarks/bench_shares.py [--n 16 --error-sd 6 --batches 200]

Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rankcore.train import TrainConfig
from rankcore.train.objective import build_objective
from rankcore.train.shares import (
    CALIBRATION_BATCHES,
    TERMS,
    calibrate_rank_weight,
    loss_and_norms,
    shares,
)


def batches(n: int, count: int, error_sd: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` batches of ``n``: predictions and true ages, (count, n) float32, years."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(20, 81, (count, n), generator=g).float()
    return target + error_sd * torch.randn(count, n, generator=g), target


def measure(config: TrainConfig, pred: torch.Tensor, target: torch.Tensor,
            calib: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """(w_rank, mean weighted gradient norm per term) of ``config``'s objective."""
    objective = build_objective(config)
    if config.rank_share is not None:
        calibrate_rank_weight(objective, calib[0].reshape(-1), calib[1].reshape(-1),
                              config.rank_share, pred.shape[1])
    sums = dict.fromkeys(TERMS, 0.0)
    for p, t in zip(pred, target):
        p = p.clone().requires_grad_(True)
        _, parts = loss_and_norms(objective, p, t)
        for k in TERMS:
            sums[k] += float(parts[f"gnorm_{k}"])
    return objective.weights["rank"], {k: v / len(pred) for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="batch size N (16)")
    ap.add_argument("--error-sd", type=float, default=6.0, help="prediction error SD, years (6)")
    ap.add_argument("--batches", type=int, default=200, help="batches averaged (200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pred, target = batches(args.n, args.batches, args.error_sd, args.seed)
    calib = batches(args.n, CALIBRATION_BATCHES, args.error_sd, args.seed + 1)
    default = TrainConfig(batch_size=args.n)
    rows = [
        ("default (soft pairwise 0.05)", default),
        ("reference preset, soft pairwise 0.05", default.replace(objective_preset="reference")),
        ("reference preset, soft pav 0.25 (former `train` default)",
         default.replace(objective_preset="reference", soft_method="pav", soft_strength=0.25)),
        ("reference preset, shipped pairwise sorter (former `pipeline` default)",
         default.replace(objective_preset="reference", rank_loss="sorter", sorter="pairwise")),
        ("reference preset, no rank term (MSE + 10·Ld)",
         default.replace(objective_preset="reference", rank_loss="none")),
    ]
    rows += [(f"rank_share {s:g} (calibrated, soft pairwise 0.05)", default.replace(rank_share=s))
             for s in (0.0, 0.03, 0.1, 0.3)]
    print(f"\n## Gradient shares w.r.t. the predictions: N = {args.n}, error SD "
          f"{args.error_sd:g} y, mean over {args.batches} batches\n")
    print("| objective | w_rank | w_diff | ‖∇ regression‖ | ‖∇ w_rank·S‖ | ‖∇ w_diff·Ld‖ | "
          "share regression | share S | share Ld |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, config in rows:
        w_rank, norms = measure(config, pred, target, calib)
        share = shares(norms)
        w_diff = config.objective_weights()[1]
        print(f"| {name} | {w_rank:.4g} | {w_diff:g} | {norms['regression']:.3f} | "
              f"{norms['rank']:.4g} | {norms['diff']:.3f} | {100 * share['regression']:.1f} % | "
              f"{100 * share['rank']:.2g} % | {100 * share['diff']:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
