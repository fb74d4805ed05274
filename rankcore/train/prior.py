"""The closed-form part of stage 1: a ridge prior on the intensity histogram, the tabular
features and the site.

With ``hist_bins > 0`` or tabular features (``BackboneConfig.features``) the stage-1 model
(:class:`rankcore.models.AgeRegressor`) predicts

    age = age_mean + age_std · (prior(h, t, site) + head(CNN features, h, t, sex, site))

where h is the standardised histogram, t the standardised tabular features (a missing value
reads as the training mean) and ``prior`` a linear map of (h, t) per site that gives the
head-pose features (:data:`PRIOR_IGNORES`, the entries of the subject-to-template affine)
a zero weight, fitted here in
closed form on the training subjects before the first epoch (ridge regression, penalty chosen
by generalised cross-validation; per site, a blend of the pooled model and the site's own,
see :func:`fit_site_priors`). The head's last layer starts at zero, so training begins at the
prior and the network learns a residual; the training loop scores that starting point on the
validation subjects as epoch -1, and early stopping keeps it unless an epoch beats it
(:mod:`rankcore.train.loop`). Stage 2 gets the same input standardisation and no prior (it
corrects stage 1, which already holds it).

Everything here is deterministic and identical on every worker (all workers hold the same
training data), so multi-worker runs need no communication for it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from rankcore.errors import InputError
from rankcore.models.backbone import AgeRegressor
from rankcore.mri.tissue_names import POSE_FEATURES
from rankcore.train.data import SubjectData

__all__ = ["ALPHAS", "MIN_SITE_SUBJECTS", "PRIOR_IGNORES", "fit_histogram_prior", "fit_prior",
           "fit_site_priors", "ridge_gcv", "ridge_loo"]

log = logging.getLogger("rankcore.train")

#: Ridge penalties tried (features are standardised, so these are relative to n).
ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 31))
#: Tabular features the prior never reads (weight 0): the head's pose in the scanner
#: (``rankcore.mri.tissue_names.POSE_FEATURES``): they carry no anatomy, only noise for the
#: ridge to fit (the network's head still reads them).
PRIOR_IGNORES = frozenset(POSE_FEATURES)
#: Fewest training subjects of a site for it to get its own ridge (blended with the pooled one).
MIN_SITE_SUBJECTS = 10


def ridge_gcv(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHAS
              ) -> tuple[np.ndarray, float, float, float]:
    """Ridge regression of ``y`` (N,) on ``x`` (N, P) with an unpenalised intercept.

    The penalty is the one of ``alphas`` with the lowest generalised cross-validation error
    (computed for all of them from one SVD).

    Returns:
        (weights (P,), intercept, chosen alpha, its GCV root-mean-square error).
    """
    w, b, alpha, rmse, _ = ridge_loo(x, y, alphas)
    return w, b, alpha, rmse


def ridge_loo(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHAS
              ) -> tuple[np.ndarray, float, float, float, np.ndarray]:
    """:func:`ridge_gcv` plus the exact leave-one-out residuals (N,) of the chosen fit
    (``resid_i / (1 - H_ii)``, the intercept included in the hat matrix ``H``)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc
    n = len(y)
    best = None
    for alpha in alphas:
        d = s * s / (s * s + alpha)
        resid = yc - u @ (d * uty)
        dof = d.sum()
        gcv = float(np.mean(resid**2) / max(1.0 - dof / n, 1e-6) ** 2)
        if best is None or gcv < best[1]:
            best = (alpha, gcv, d, resid)
    alpha, gcv, d, resid = best
    w = vt.T @ (s / (s * s + alpha) * uty)
    leverage = (u * u) @ d + 1.0 / n
    loo = resid / np.maximum(1.0 - leverage, 1e-6)
    return w, float(y_mean - x_mean @ w), float(alpha), float(np.sqrt(gcv)), loo


def _blend_weight(pooled: np.ndarray, own: np.ndarray) -> float:
    """The weight l in [0, 1] minimising the sum of squares of (1 - l)·pooled + l·own."""
    diff = own - pooled
    denom = float(diff @ diff)
    if denom <= 1e-12:
        return 0.0
    return float(np.clip(-(pooled @ diff) / denom, 0.0, 1.0))


def fit_site_priors(hist: np.ndarray, codes: np.ndarray | None, y: np.ndarray,
                    per_site: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The prior's linear models: one per known site (one in all without sites).

    A pooled ridge on the histogram and the site codes comes first (GCV penalty). With
    ``per_site``, each site with at least :data:`MIN_SITE_SUBJECTS` subjects also gets a ridge
    on its own subjects, and its model is ``(1 - l)·pooled + l·own`` with the weight l in
    [0, 1] that minimises the blend's exact leave-one-out error on that site's subjects: a
    site whose own fit does not predict its held-out subjects better keeps (nearly) the pooled
    model, so a small site cannot get a wild one. Why: the sites' tissue contrasts differ, so
    the same histogram means different ages at different sites; on three simulated cohorts
    the blend took the prior from MAE 4.69 / 5.78 / 4.85 y to 4.40 / 5.48 / 4.62 y.

    Args:
        hist: standardised prior inputs (N, P) (histogram, then tabular features).
        codes: site codes (N, S) (one-hot; an unknown site's row is uniform) or None.
        y: standardised ages (N,).
        per_site: False keeps the pooled model for every site.

    Returns:
        (weights (max(S, 1), P), biases (max(S, 1),), what was fitted for the card).
    """
    n_sites = 0 if codes is None else codes.shape[1]
    x = hist if codes is None else np.concatenate([hist, codes], axis=1)
    w, b, alpha, rmse, loo = ridge_loo(x, y)
    p = hist.shape[1]
    weights = np.repeat(w[None, :p], max(n_sites, 1), axis=0)
    biases = b + (w[p:] if n_sites else np.zeros(1))
    info: dict[str, Any] = {"alpha": alpha, "gcv_rmse": rmse}
    if not n_sites or not per_site:
        return weights, biases, info
    sites = []
    for k in range(n_sites):
        rows = np.flatnonzero(codes[:, k] == 1.0)
        entry: dict[str, Any] = {"n": len(rows), "weight": 0.0}
        if len(rows) >= MIN_SITE_SUBJECTS:
            w_k, b_k, alpha_k, _, loo_k = ridge_loo(hist[rows], y[rows])
            lam = _blend_weight(loo[rows], loo_k)
            weights[k] = (1 - lam) * weights[k] + lam * w_k
            biases[k] = (1 - lam) * biases[k] + lam * b_k
            entry.update(weight=lam, alpha=alpha_k,
                         loo_rmse_pooled=float(np.sqrt(np.mean(loo[rows] ** 2))),
                         loo_rmse_blend=float(np.sqrt(np.mean(
                             ((1 - lam) * loo[rows] + lam * loo_k) ** 2))))
        sites.append(entry)
    info["sites"] = sites
    return weights, biases, info


@torch.no_grad()
def fit_prior(model: nn.Module, data: SubjectData, device: torch.device,
              batch_size: int = 32, per_site: bool = True, fit: bool = True) -> dict[str, Any]:
    """Standardise ``model``'s histogram and tabular inputs on ``data`` and, for a stage-1
    model with ``fit``, fit its prior on them (:func:`fit_site_priors`; see the module doc).

    Args:
        model: a stage-1 or stage-2 model.
        data: the training subjects (their ``feature_names`` must be the model's
            ``config.features``).
        device: where the histogram counts are computed.
        batch_size: subjects per histogram batch.
        per_site: see :func:`fit_site_priors`.
        fit: False only standardises (the prior stays zero: "network only").

    Returns:
        What was fitted, for the card: ``{}`` without histogram or tabular inputs, else the
        number of subjects, the inputs and, when fitted, the pooled ridge penalty, the pooled
        prior's GCV RMSE in years, the features it gave a zero weight (``ignored_features``)
        and, per site, its subjects and blend weight.

    Raises:
        InputError: NaN or inf voxels in a training image, or features named otherwise than
            the model's.
    """
    backbone = getattr(model, "backbone", None)
    config = getattr(model, "config", None)
    if backbone is None or config is None or not config.prior_inputs:
        return {}
    if tuple(data.feature_names) != tuple(config.features):
        raise InputError(f"`data` feature names must be the model's {list(config.features)}, "
                         f"got {list(data.feature_names)}")
    parts = []
    if backbone.histogram is not None:
        counts = []
        for start in range(0, len(data), batch_size):
            rows = np.arange(start, min(start + batch_size, len(data)))
            counts.append(data.batch(rows, device, model)["hist_counts"].cpu())
        counts = torch.cat(counts)
        bad = np.flatnonzero(~torch.isfinite(counts).all(dim=1).numpy())
        if len(bad):
            ids = [data.participant_ids[i] for i in bad[:3]]
            raise InputError(f"{len(bad)} training image(s) hold NaN or inf voxels (e.g. "
                             f"{ids}); re-ingest them or drop them")
        backbone.histogram.set_scale(counts.to(backbone.histogram.mean.device))
        h = backbone.histogram
        parts.append(((counts - h.mean.cpu()) / h.std.cpu()).double())
    if config.features:
        backbone.set_feature_scale(data.features)
        feats = torch.from_numpy(np.asarray(data.features, dtype=np.float64))
        parts.append(backbone.standardise_features(feats, len(data), feats).cpu())
    info: dict[str, Any] = {"n": len(data), "histogram_bins": config.hist_bins,
                            "features": list(config.features)}
    ignored = [f for f in config.features if f in PRIOR_IGNORES]
    if not isinstance(model, AgeRegressor) or not fit:
        return info
    x = torch.cat(parts, dim=1).numpy()
    used = np.ones(x.shape[1], dtype=bool)
    used[x.shape[1] - len(config.features):] = [f not in PRIOR_IGNORES for f in config.features]
    codes = model.site_codes(data.sites).double().numpy() if config.sites else None
    mean, std = float(model.age_mean), float(model.age_std)
    y = (np.asarray(data.ages, dtype=np.float64) - mean) / std
    fitted_weights, biases, fitted = fit_site_priors(x[:, used], codes, y, per_site)
    weights = np.zeros((fitted_weights.shape[0], x.shape[1]))
    weights[:, used] = fitted_weights
    model.prior_weight.copy_(torch.from_numpy(weights).to(model.prior_weight))
    model.prior_bias.copy_(torch.from_numpy(biases).to(model.prior_bias))
    info.update({"alpha": fitted["alpha"], "gcv_rmse_years": fitted["gcv_rmse"] * std,
                 "ignored_features": ignored})
    if "sites" in fitted:
        info["sites"] = {name: entry for name, entry in zip(config.sites, fitted["sites"])}
    log.info("stage 1: prior fitted on %d subjects, %d histogram bins + %d features (ridge "
             "alpha %.3g, GCV RMSE %.2f y%s)", len(data), config.hist_bins,
             len(config.features), fitted["alpha"], fitted["gcv_rmse"] * std,
             "".join(f"; {k} blend {v['weight']:.2f}" for k, v in info.get("sites", {}).items()))
    return info


def fit_histogram_prior(model: nn.Module, data: SubjectData, device: torch.device,
                        batch_size: int = 32, per_site: bool = True) -> dict[str, Any]:
    """:func:`fit_prior` (the name it had when the prior read only the histogram)."""
    return fit_prior(model, data, device, batch_size, per_site)
