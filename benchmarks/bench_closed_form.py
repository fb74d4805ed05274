"""Closed-form baselines on a cache's stored features, next to the network (prints a table).

Usage::

    python benchmarks/bench_closed_form.py CACHE [--cohort COHORT] [--network METRICS_JSON]

``CACHE`` is an ingested cache with tissue features and a ``split`` column (``test`` rows
are held out; every other row is training). Every baseline is fitted on the training rows
only; its ridge penalty is chosen by ``--folds``-fold cross-validation on the training rows
(never on test), and the cross-validated MAE on the training rows is printed next to the
test scores. Rows:

1. the shipped prior, as the training loop fits it (``rankcore.train.prior.fit_prior`` with
   the default ``TrainConfig``: 24-bin histogram of the locally normalised intensity plus
   the tissue features but the head-pose ones (``PRIOR_IGNORES``), per-site blend; its
   penalty by GCV as in training); (1a) the same fit reading the pose features too (the
   prior before they were left out);
2. ridge on the tissue and regional features (``tissue_features``) + site one-hot;
3. (2) + site x feature interactions (each site its own slopes, shrunk by the same penalty);
4. (3) + the squares of the standardised features;

and (2)-(4) again with the prior's histogram added. Test metrics: MAE with a percentile
bootstrap interval, SRCC, MAE / irreducible floor (with ``--cohort``, the simulator's
truth.tsv gives the floor on the test subjects). ``--network`` reads an evaluation's
metrics.json (``brainrank evaluate``) of a model trained on the same cache and adds its row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rankcore.cache import VolumeDataset
from rankcore.report.metrics_table import metric_block
from rankcore.train.checkpoint import build_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData
from rankcore.train.prior import PRIOR_IGNORES, fit_prior, fit_site_priors
from rankcore.train.start import with_training_inputs

#: Ridge penalties tried by cross-validation (the design's columns are standardised).
ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 33))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Columns standardised by the training rows' finite values; NaN -> 0 (the mean)."""
    mean = np.nanmean(train, axis=0)
    std = np.nanstd(train, axis=0, ddof=1)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    return [np.nan_to_num((a - mean) / std, nan=0.0) for a in (train, *others)]


def design(kind: str, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Design matrix of a baseline from standardised features ``x`` (N, P) and site one-hot
    ``codes`` (N, S): "linear" = [x, codes]; "site" = + codes x x; "square" = + x**2."""
    parts = [x, codes]
    if kind in ("site", "square"):
        parts.append((codes[:, :, None] * x[:, None, :]).reshape(len(x), -1))
    if kind == "square":
        parts.append(x**2)
    return np.concatenate(parts, axis=1)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge weights and unpenalised intercept (solved in the dual when P > N)."""
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    if x.shape[1] > x.shape[0]:
        w = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(len(x)), y - ym)
    else:
        w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def _folds(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def cv_ridge(feats: np.ndarray, codes: np.ndarray, y: np.ndarray, kind: str, folds: np.ndarray,
             ) -> tuple[float, float]:
    """(best alpha, its cross-validated MAE) over ALPHAS; standardised within each fold."""
    errs = np.zeros(len(ALPHAS))
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        a, b = _standardise(feats[tr], feats[va])
        xa, xb = design(kind, a, codes[tr]), design(kind, b, codes[va])
        for j, alpha in enumerate(ALPHAS):
            w, c = ridge_fit(xa, y[tr], alpha)
            errs[j] += np.abs(xb @ w + c - y[va]).sum()
    j = int(np.argmin(errs))
    return ALPHAS[j], float(errs[j] / len(y))


def site_prior(train: np.ndarray, codes: np.ndarray, y: np.ndarray, test: np.ndarray,
               test_codes: np.ndarray) -> np.ndarray:
    """Predictions on ``test`` of the shipped prior's fit (fit_site_priors) on ``train``."""
    a, b = _standardise(train, test)
    mean, std = y.mean(), y.std()
    w, c, _ = fit_site_priors(a, codes, (y - mean) / std)
    return ((b @ w.T + c) * test_codes).sum(1) * std + mean


def cv_site_prior(feats: np.ndarray, codes: np.ndarray, y: np.ndarray, folds: np.ndarray,
                  ) -> np.ndarray:
    """Cross-validated absolute errors (N,) of the shipped prior's fit (fit_site_priors)."""
    err = np.zeros(len(y))
    for f in np.unique(folds):
        tr, va = folds != f, folds == f
        pred = site_prior(feats[tr], codes[tr], y[tr], feats[va], codes[va])
        err[va] = np.abs(pred - y[va])
    return err


def paired_interval(diff: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of paired differences (N,)."""
    rng = np.random.default_rng(seed)
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def shipped_prior(train: SubjectData, test: SubjectData) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Test predictions of the prior as training fits it, and the histogram counts
    (train, test) of its histogram branch."""
    config = with_training_inputs(TrainConfig(), train)
    model = build_stage_model(1, config.backbone, config.cascade)
    model.set_age_scale(float(np.mean(train.ages)), float(np.std(train.ages)))
    fit_prior(model, train, torch.device("cpu"), config.eval_batch_size,
              per_site=config.site_prior)
    counts = []
    for data in (train, test):
        c = [data.batch(np.arange(s, min(s + 32, len(data))), "cpu", model)["hist_counts"]
             for s in range(0, len(data), 32)]
        counts.append(torch.cat(c).double())
    bb = model.backbone
    with torch.no_grad():
        feats = torch.from_numpy(test.features)
        inputs = torch.cat([bb.histogram.standardise(counts[1]).double(),
                            bb.standardise_features(feats, len(test), feats).double()], 1)
        z = model.prior(inputs, model.site_codes(test.sites).double())
        pred = (model.age_mean.double() + model.age_std.double() * z).numpy()
    return pred, counts[0].numpy(), counts[1].numpy()


def _floor(cohort: Path, ids: tuple[str, ...]) -> float | None:
    from rankcore.mri.simulate import read_truth

    rows = {r["participant_id"]: r for r in read_truth(cohort)}
    errs = [abs(float(rows[p]["brain_age"]) - (89.0 if rows[p]["age"] == "89+"
                                                else float(rows[p]["age"]))) for p in ids]
    return float(np.mean(errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--cohort", type=Path, help="simulated cohort root (for the floor)")
    ap.add_argument("--network", type=Path, help="metrics.json of the network's evaluation")
    ap.add_argument("--model", type=Path,
                    help="the network's model folder: adds the shipped prior fitted on "
                         "exactly its training subjects (its stage-1 card's train_ids)")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=1000)
    args = ap.parse_args()
    splits = VolumeDataset(args.cache).view.splits
    train = SubjectData.from_dataset(VolumeDataset(args.cache, split=[s for s in splits
                                                                      if s != "test"]),
                                     preload=False)
    test = SubjectData.from_dataset(VolumeDataset(args.cache, split="test"), preload=False)
    sites = sorted(set(train.sites))
    codes = [np.array([[s == k for k in sites] for s in d.sites], dtype=np.float64)
             for d in (train, test)]
    y, y_test = train.ages, test.ages
    folds = _folds(len(train), args.folds, args.seed)
    floor = _floor(args.cohort, test.participant_ids) if args.cohort else None

    prior_pred, h_train, h_test = shipped_prior(train, test)
    read = [k for k, n in enumerate(train.feature_names) if n not in PRIOR_IGNORES]
    x_all = np.c_[h_train, train.features], np.c_[h_test, test.features]
    cv_shipped = cv_site_prior(np.c_[h_train, train.features[:, read]], codes[0], y, folds)
    cv_before = cv_site_prior(x_all[0], codes[0], y, folds)
    rows = [("(1) shipped prior: histogram + tissue features but pose, per-site blend",
             cv_shipped.mean(), "GCV", prior_pred),
            ("(1a) (1) reading the pose features too (the prior before)",
             cv_before.mean(), "GCV", site_prior(x_all[0], codes[0], y, x_all[1], codes[1]))]
    if args.model:
        from rankcore.train.card_info import read_split_record

        stage_card = json.loads((args.model / "stage1" / "card.json").read_text())
        ids = set(stage_card.get("train_ids") or read_split_record(
            args.model, json.loads((args.model / "card.json").read_text())).get("train", ()))
        sub = train.subset([i for i, p in enumerate(train.participant_ids) if p in ids])
        rows.append((f"(1) shipped prior, fitted on the network's {len(sub)} training "
                     f"subjects", float("nan"), "GCV", shipped_prior(sub, test)[0]))
    for hist in (False, True):
        f_tr = np.c_[h_train, train.features] if hist else train.features
        f_te = np.c_[h_test, test.features] if hist else test.features
        for num, kind, label in (("(2)", "linear", "ridge on tissue features + site"),
                                 ("(3)", "site", "(2) + site x feature"),
                                 ("(4)", "square", "(3) + squares")):
            alpha, cv = cv_ridge(f_tr, codes[0], y, kind, folds)
            a, b = _standardise(f_tr, f_te)
            xa, xb = design(kind, a, codes[0]), design(kind, b, codes[1])
            w, c = ridge_fit(xa, y, alpha)
            name = f"{num}{'h' if hist else ''} {label}{' + histogram' if hist else ''}"
            rows.append((name, cv, f"{alpha:.3g}", xb @ w + c))

    print(f"train {len(train)} subjects, test {len(test)}; {len(train.feature_names)} tissue "
          f"features, {h_train.shape[1]} histogram bins, {len(sites)} sites; alpha by "
          f"{args.folds}-fold CV on train; MAE interval: {args.boot} bootstrap resamples"
          + (f"; floor on test {floor:.2f} y" if floor else ""))
    print()
    print("| model | CV MAE on train (y) | alpha | test MAE (y) [95 % CI] | test SRCC | "
          "MAE / floor |")
    print("|---|---|---|---|---|---|")
    for name, cv, alpha, pred in rows:
        m = metric_block(pred, y_test, n_boot=args.boot, seed=args.seed)
        lo, hi = m["ci"]["mae"]
        ratio = f"{m['mae'] / floor:.2f}" if floor else "n/a"
        cv = "n/a" if np.isnan(cv) else f"{cv:.2f}"
        print(f"| {name} | {cv} | {alpha} | {m['mae']:.2f} [{lo:.2f}–{hi:.2f}] | "
              f"{m['srcc']:.3f} | {ratio} |")
    if args.network:
        m = json.loads(args.network.read_text())
        lo, hi = m["ci"]["mae"]
        ratio = f"{m['mae'] / floor:.2f}" if floor else "n/a"
        print(f"| network (evaluation {args.network.parent.name}) | n/a | n/a | "
              f"{m['mae']:.2f} [{lo:.2f}–{hi:.2f}] | {m['srcc']:.3f} | {ratio} |")

    lo, hi = paired_interval(cv_shipped - cv_before, args.boot, args.seed)
    print(f"\nMAE (1) - (1a), paired over subjects, 95 % bootstrap interval: CV on the "
          f"training subjects {(cv_shipped - cv_before).mean():+.2f} y [{lo:+.2f}, {hi:+.2f}]",
          end="")
    test_diff = np.abs(rows[0][3] - y_test) - np.abs(rows[1][3] - y_test)
    lo, hi = paired_interval(test_diff, args.boot, args.seed)
    print(f"; test {test_diff.mean():+.2f} y [{lo:+.2f}, {hi:+.2f}]")


if __name__ == "__main__":
    main()
