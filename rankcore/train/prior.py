"""The closed-form part of stage 1: a ridge prior on the intensity histogram and the site.

A small CNN trained on a few hundred subjects memorises spatial detail before it finds the
global signal of grey-matter loss, while a linear model on the histogram of locally
normalised intensities plus the site finds it at once. With ``hist_bins > 0`` the stage-1
model (:class:`rankcore.models.AgeRegressor`) therefore predicts

    age = age_mean + age_std · (prior(h, site) + head(CNN features, h, sex, site))

where h is the standardised histogram and ``prior`` a linear map fitted here, in closed form,
on the training subjects before the first epoch (ridge regression, penalty chosen by
generalised cross-validation). The head's last layer starts near zero, so training begins at
the prior and the network learns what the histogram misses; early stopping on the validation
MAE keeps the prior alone if the network never improves on it. Stage 2 gets the same
histogram standardisation and no prior (it corrects stage 1, which already holds it).

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
from rankcore.train.data import SubjectData

__all__ = ["ALPHAS", "fit_histogram_prior", "ridge_gcv"]

log = logging.getLogger("rankcore.train")

#: Ridge penalties tried (features are standardised, so these are relative to n).
ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 31))


def ridge_gcv(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHAS
              ) -> tuple[np.ndarray, float, float, float]:
    """Ridge regression of ``y`` (N,) on ``x`` (N, P) with an unpenalised intercept.

    The penalty is the one of ``alphas`` with the lowest generalised cross-validation error
    (computed for all of them from one SVD).

    Returns:
        (weights (P,), intercept, chosen alpha, its GCV root-mean-square error).
    """
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
            best = (alpha, gcv)
    alpha, gcv = best
    w = vt.T @ (s / (s * s + alpha) * uty)
    return w, float(y_mean - x_mean @ w), float(alpha), float(np.sqrt(gcv))


@torch.no_grad()
def fit_histogram_prior(model: nn.Module, data: SubjectData, device: torch.device,
                        batch_size: int = 32) -> dict[str, Any]:
    """Standardise ``model``'s histogram branch on ``data`` and, for a stage-1 model, fit its
    ridge prior (see the module doc). A model without a histogram branch is left as is.

    Returns:
        What was fitted, for the card: ``{}`` without a histogram branch, else the number of
        subjects and, for stage 1, the ridge penalty and the prior's GCV RMSE in years.
    """
    backbone = getattr(model, "backbone", None)
    if backbone is None or getattr(backbone, "histogram", None) is None:
        return {}
    counts = []
    for start in range(0, len(data), batch_size):
        batch = data.batch(np.arange(start, min(start + batch_size, len(data))), device)
        counts.append(backbone.histogram_counts(batch["image"]).cpu())
    counts = torch.cat(counts)
    bad = np.flatnonzero(~torch.isfinite(counts).all(dim=1).numpy())
    if len(bad):
        ids = [data.participant_ids[i] for i in bad[:3]]
        raise InputError(f"{len(bad)} training image(s) hold NaN or inf voxels (e.g. {ids}); "
                         "re-ingest them or drop them")
    backbone.histogram.set_scale(counts.to(backbone.histogram.mean.device))
    info: dict[str, Any] = {"n": len(data)}
    if not isinstance(model, AgeRegressor):
        return info
    hist = ((counts - backbone.histogram.mean.cpu()) / backbone.histogram.std.cpu()).double()
    parts = [hist.numpy()]
    if model.config.sites:
        parts.append(model.site_codes(data.sites).double().numpy())
    x = np.concatenate(parts, axis=1)
    mean, std = float(model.age_mean), float(model.age_std)
    y = (np.asarray(data.ages, dtype=np.float64) - mean) / std
    w, b, alpha, rmse = ridge_gcv(x, y)
    model.prior_weight.copy_(torch.from_numpy(w).to(model.prior_weight))
    model.prior_bias.fill_(b)
    info.update({"alpha": alpha, "gcv_rmse_years": rmse * std})
    log.info("stage 1: histogram prior fitted on %d subjects (ridge alpha %.3g, GCV RMSE "
             "%.2f y)", len(data), alpha, rmse * std)
    return info
