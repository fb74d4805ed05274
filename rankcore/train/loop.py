"""The per-worker training loop of one cascade stage, as plain functions.

:func:`train_stage` runs in-process (``world=None``) or on each worker of a multi-worker job
(``world`` from :mod:`rankcore.train.dist`; the Ray Train launcher passes one). Every worker
is given the SAME data and the same seed: each epoch's shuffled order of global batches is
therefore identical on all workers, and worker r takes the r-th slice of every global batch.
The ranking terms are computed on the global batch (a differentiable all-gather of the
predictions and targets), so with W workers the objective is the single-process one; only
batch-norm statistics are per worker.

Randomness: the model is initialised from ``seed``; each epoch's shuffle and flips come from a
generator seeded with (seed, epoch), and dropout from the global RNG re-seeded with
(seed, epoch, rank) at the start of the epoch (the caller's global RNG state is restored on
exit). Resuming from the checkpoint of epoch e therefore continues exactly as the
uninterrupted run would, and two runs with the same seed give identical weights on CPU.

No Ray and no ``torch.distributed`` import happens here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankcore.errors import InputError, TrainingError
from rankcore.train.bn_refresh import refresh_batch_norm
from rankcore.train.checkpoint import (
    build_stage_model,
    latest_checkpoint,
    library_versions,
    load_stage_model,
    read_checkpoint,
    save_stage_model,
    write_checkpoint,
)
from rankcore.train.config import TrainConfig
from rankcore.train.data import SubjectData, as_subject_data
from rankcore.train.objective import build_objective, rank_convention
from rankcore.train.predict import evaluate, flip_lr, forward_batch, predict_sharded
from rankcore.train.prior import fit_prior
from rankcore.train.schedule import Progress
from rankcore.train.shares import (
    epoch_shares,
    loss_and_norms,
    objective_record,
    prepare_rank_weight,
    share_text,
)
from rankcore.train.start import score_start, with_training_inputs, with_training_sites

__all__ = ["Report", "StageResult", "resolve_device", "train_stage", "with_training_inputs",
           "with_training_sites"]

log = logging.getLogger("rankcore.train")

#: ``report(metrics, checkpoint)``: called on every worker after every epoch; ``checkpoint`` is
#: the epoch folder on rank 0 and None elsewhere.
Report = Callable[[dict[str, Any], Path | None], None]


@dataclass
class StageResult:
    """What :func:`train_stage` returns.

    Attributes:
        model: the trained model (best validation epoch, or the last without validation) in
            eval mode, on the training device.
        history: one metrics dict per epoch run, after the starting point's (``epoch`` -1:
            validation metrics of the prior alone, when there is validation data).
        best_epoch: 0-based epoch whose weights ``model`` holds; -1 for the starting point
            (the prior alone; for stage 2, no correction).
        out_dir: the stage folder (``model.safetensors`` + ``card.json`` on rank 0).
        card: the final card.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    out_dir: Path
    card: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` without CUDA -> InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("`device` must be 'cpu' or 'auto' on a machine without CUDA, "
                         "got 'cuda'")
    return torch.device(name)


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63 - 1)


@contextlib.contextmanager
def _runtime(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Threads, deterministic algorithms and the global RNG for the run; restored on exit."""
    threads = torch.get_num_threads()
    # On CPU the kernels used here are deterministic for a fixed thread count already, and
    # torch.use_deterministic_algorithms imports torch._inductor (~6 s): only CUDA needs it.
    strict = config.deterministic and device.type == "cuda"
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            if config.num_threads is not None:
                torch.set_num_threads(config.num_threads)
            if strict:
                torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            torch.set_num_threads(threads)
            if strict:
                torch.use_deterministic_algorithms(det, warn_only=det_warn)


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter],
                    device: torch.device) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "adam":
        kwargs["amsgrad"] = True
    try:  # the fused kernel is >50x faster on CPU for these small models (torch >= 2.4)
        return cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kwargs)


def _validate(stage: int, config: TrainConfig, train: SubjectData, val: SubjectData | None,
              world: Any) -> None:
    if stage not in (1, 2):
        raise InputError(f"`stage` must be 1 or 2, got {stage!r}")
    train.require_ages("train_data")
    if val is not None:
        val.require_ages("val_data")
    world_size = 1 if world is None else world.world_size
    if config.batch_size % world_size:
        raise InputError(f"`batch_size` must be a multiple of the number of workers "
                         f"({world_size}), got {config.batch_size}")
    if len(train) < config.batch_size:
        raise InputError(f"`train_data` must hold at least one full batch: {len(train)} "
                         f"subject(s) < batch_size {config.batch_size}")
    if float(np.std(train.ages)) == 0.0:
        raise InputError(f"`train_data` ages must vary (all are {train.ages[0]:g}): there is "
                         "nothing to rank or regress")
    if stage == 2:
        for name, d in (("train_data", train), ("val_data", val)):
            if d is not None and d.stage1 is None:
                raise InputError(f"stage 2 needs stage-1 estimates in `{name}`: attach them "
                                 "with SubjectData.with_stage1 (out-of-fold predictions of "
                                 "cross_fit_stage1 for the training data)")


def _prepare_out_dir(out_dir: Path, resume: bool | str | Path, is_main: bool) -> bool:
    """Check ``out_dir``; create it on the main rank. Returns True if it was created here."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"`out_dir` must be a folder, got the file {str(out_dir)!r}")
    if resume is False and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"`out_dir` {str(out_dir)!r} is not empty: choose an empty folder "
                         "or pass resume=True to continue the run it holds")
    created = not out_dir.exists()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    return created


def train_stage(stage: int, config: TrainConfig | dict[str, Any], train_data: Any,
                val_data: Any = None, *, out_dir: str | Path, report: Report | None = None,
                world: Any = None, resume: bool | str | Path = False) -> StageResult:
    """Train one cascade stage and write its checkpoints and final model into ``out_dir``.

    Args:
        stage: 1 (image -> age) or 2 (image + stage-1 estimate -> corrected age; the data
            must carry stage-1 estimates, see :meth:`SubjectData.with_stage1`).
        config: a :class:`TrainConfig` or its dict form.
        train_data: a :class:`SubjectData`, a ``rankcore.cache.VolumeDataset`` or a dict
            ``{"images": (N, X, Y, Z), "ages": (N,), ...}``. Every worker gets the same data.
        val_data: the same kinds, or None (no early stopping; the last epoch is kept).
        out_dir: the stage folder (see rankcore.train.checkpoint for its layout). Must be
            empty or absent unless ``resume``.
        report: called on every worker after each epoch with (metrics, epoch folder or None).
        world: None for one process, else a :class:`rankcore.train.dist.World`.
        resume: False; True to continue from ``out_dir``'s latest checkpoint (a finished
            stage is loaded and returned as is); or the path of an epoch folder.

    Returns:
        A :class:`StageResult`.

    Raises:
        InputError: unusable data (no ages, fewer subjects than one batch, stage 2 without
            stage-1 estimates), a sorter that cannot rank ``batch_size`` values, a non-empty
            ``out_dir`` without ``resume``. Raised before anything is written.
        TrainingError: the loss became NaN or inf; the message names the epoch and step, and
            the last good checkpoint stays in ``out_dir``.
    """
    config = TrainConfig.from_dict(config)
    train = as_subject_data(train_data, "train_data")
    val = None if val_data is None else as_subject_data(val_data, "val_data")
    _validate(stage, config, train, val, world)
    config = with_training_inputs(config, train, val)
    objective = build_objective(config)
    device = resolve_device(config.device)
    rank, world_size = (0, 1) if world is None else (world.rank, world.world_size)
    is_main = rank == 0
    out_dir = Path(out_dir)
    created = _prepare_out_dir(out_dir, resume, is_main)
    if resume is not False and (out_dir / "card.json").is_file():
        model, card = load_stage_model(out_dir, map_location=device)
        return StageResult(model, card["history"], card["best_epoch"], out_dir, card)
    try:
        with _runtime(config, device):
            return _run(stage, config, train, val, objective, device, out_dir, report, world,
                        resume, rank, world_size)
    except BaseException:
        # Nothing useful was written: leave no trace of a folder this call created.
        if is_main and created and not (out_dir / "latest.json").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run(stage, config, train, val, objective, device, out_dir, report, world, resume,
         rank, world_size) -> StageResult:
    is_main = rank == 0
    torch.manual_seed(config.seed)
    model = build_stage_model(stage, config.backbone, config.cascade)
    model.set_age_scale(float(np.mean(train.ages)), float(np.std(train.ages)))
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = _make_optimizer(config, list(model.parameters()), device)
    objective = objective.to(device)
    prior_info: dict[str, Any] = {}
    progress, history, start_epoch = Progress.start(config), [], 0
    best_state: dict[str, torch.Tensor] | None = None
    resumes: list[int] = []

    ckpt = latest_checkpoint(out_dir) if resume is True else (
        Path(resume) if resume is not False else None)
    if ckpt is not None:
        state, opt_state, card, best_state = read_checkpoint(ckpt)
        model.load_state_dict(state)
        optimizer.load_state_dict(opt_state)
        progress = Progress.from_dict(card["progress"])
        history, start_epoch = list(card["history"]), card["epoch"] + 1
        if best_state is None:  # the checkpoint's own epoch is the best one
            best_state = {k: v.clone() for k, v in state.items()}
        resumes = [*card.get("resumes", []), card["epoch"]]
        log.info("stage %d: resumed from %s (epoch %d)", stage, ckpt, card["epoch"] + 1)
        if progress.should_stop(config, val is not None):  # it had stopped early already
            start_epoch = config.epochs

    if ckpt is None:  # a resumed model has its prior in its buffers already
        prior_info = fit_prior(model, train, device, config.eval_batch_size,
                               per_site=config.site_prior, fit=config.model != "network")
        if val is not None:  # the starting point is epoch -1: an epoch must beat it
            start, best_state = score_start(stage, model, config, val, world)
            progress.update(config, -1, start["val_mae"])
            history.append(start)
        if config.model == "prior":
            model.zero_residual()
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if config.model == "prior":  # nothing to train: the prior alone (stage 2: no correction)
        start_epoch = config.epochs
    calibration = prepare_rank_weight(objective, config, model, train, world,
                                      card.get("objective") if ckpt is not None else None)
    net = model if world is None else world.wrap_model(model)
    base_card = {
        "stage": stage, "model": type(model).__name__, "train_config": config.to_dict(),
        "backbone": config.backbone.to_dict(), "cascade": config.cascade.to_dict(),
        "rank_convention": rank_convention(config), "versions": library_versions(),
        "n_train": len(train), "n_val": 0 if val is None else len(val),
        "train_ids": list(train.participant_ids),
        "val_ids": [] if val is None else list(val.participant_ids),
        "world_size": world_size, "resumes": resumes, "histogram_prior": prior_info,
        "age_scale": {"mean": float(model.age_mean), "std": float(model.age_std)},
        "objective": objective_record(config, objective, calibration),
    }
    local = config.batch_size // world_size
    n_steps = len(train) // config.batch_size
    last_good: Path | None = ckpt
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        lr = progress.lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        order = torch.randperm(len(train), generator=gen).numpy()
        flips = (torch.rand(len(train), generator=gen) < 0.5).numpy() & config.flip
        torch.manual_seed(_epoch_seed(config.seed, epoch, rank))
        net.train()
        sums: dict[str, float] = {}
        for step in range(n_steps):
            glob = order[step * config.batch_size:(step + 1) * config.batch_size]
            mine = glob[rank * local:(rank + 1) * local]
            batch = train.batch(mine, device, net)
            image = flip_lr(batch["image"], torch.from_numpy(flips[mine]).to(device))
            if config.channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=config.amp and device.type == "cuda"):
                pred = forward_batch(net, batch, image)
            pred, target = pred.float(), batch["age"]
            if world is not None:
                pred, target = world.all_gather(pred), world.all_gather(target)
            bad = None if bool(torch.isfinite(pred.detach()).all()) else "the predictions"
            if bad is None:
                total, parts = loss_and_norms(objective, pred, target)
                if not math.isfinite(float(total.detach())):
                    parts_text = {k: round(float(v), 4) for k, v in parts.items()}
                    bad = f"the loss ({float(total.detach())}; parts {parts_text})"
            if bad is not None:
                kept = (f"the last good checkpoint is {str(last_good)!r}" if last_good
                        else "no checkpoint was written")
                raise TrainingError(f"stage {stage}: {bad} became NaN or inf at epoch "
                                    f"{epoch + 1}, step {step + 1}; {kept}. Lower `lr` or "
                                    "check the inputs.")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["mae"] = sums.get("mae", 0.0) + float((pred.detach() - target).abs().mean())
        train_seconds = time.perf_counter() - t0
        if config.bn_refresh:
            refresh_batch_norm(model, train, device, config.bn_refresh,
                               config.eval_batch_size, _epoch_seed(config.seed, epoch))
        metrics: dict[str, Any] = {"epoch": epoch, "lr": lr}
        metrics.update({f"train_{k}": v / n_steps for k, v in sums.items()})
        metrics.update(epoch_shares(metrics, objective))
        if val is not None:
            vpred = predict_sharded(model, val, world, batch_size=config.eval_batch_size,
                                    flip_tta=config.flip_tta,
                                    channels_last=config.channels_last, amp=config.amp)
            n_bad = int((~np.isfinite(np.asarray(vpred, dtype=np.float64))).sum())
            if n_bad:
                kept = (f"the last good checkpoint is {str(last_good)!r}" if last_good
                        else "no checkpoint was written")
                raise TrainingError(f"stage {stage}: the validation predictions became NaN or "
                                    f"inf at epoch {epoch + 1} ({n_bad} of {len(vpred)}); "
                                    f"{kept}. Lower `lr` or check the validation inputs.")
            metrics.update({f"val_{k}": v for k, v in evaluate(vpred, val.ages).items()})
            score = metrics["val_mae"]
        else:
            score = metrics["train_total"]
        if not math.isfinite(score):
            raise TrainingError(f"stage {stage}: the validation MAE became {score} at epoch "
                                f"{epoch + 1}; the last good checkpoint is {str(last_good)!r}")
        if progress.update(config, epoch, score) or val is None:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        metrics["seconds"] = time.perf_counter() - t0
        # training throughput of the whole job (all workers), validation excluded
        metrics["samples_per_s"] = n_steps * config.batch_size / max(train_seconds, 1e-9)
        history.append(metrics)
        path = None
        if is_main:
            card = dict(base_card, history=history, progress=progress.to_dict())
            path = write_checkpoint(out_dir, epoch, model, optimizer, card,
                                    None if progress.best_epoch == epoch else best_state)
            last_good = path
        log.info(_log_line(stage, config, metrics))
        if report is not None:
            report(dict(metrics), path)
        if progress.should_stop(config, val is not None):
            log.info("stage %d: early stop after epoch %d (best val MAE %.3f at epoch %d)",
                     stage, epoch + 1, progress.best_mae, progress.best_epoch + 1)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    best_epoch = progress.best_epoch if val is not None else (
        -1 if config.model == "prior" else epoch)
    card = dict(base_card, history=history, best_epoch=best_epoch,
                epochs_run=sum(1 for m in history if m["epoch"] >= 0),
                progress=progress.to_dict())
    if is_main:
        save_stage_model(out_dir, model, card)
    return StageResult(model.eval(), history, best_epoch, out_dir, card)


def _log_line(stage: int, config: TrainConfig, m: dict[str, Any]) -> str:
    line = (f"stage {stage} epoch {m['epoch'] + 1}/{config.epochs}: loss {m['train_total']:.3f} "
            f"(regression {m['train_regression']:.3f}, rank {m['train_rank']:.4f}, "
            f"diff {m['train_diff']:.3f}) train MAE {m['train_mae']:.2f}")
    if "val_mae" in m:
        line += f" | val MAE {m['val_mae']:.2f} SRCC {m['val_srcc']:.3f}"
    line += share_text(m)
    return line + f" | lr {m['lr']:.2e} {m['seconds']:.1f}s ({m['samples_per_s']:.1f} samples/s)"
