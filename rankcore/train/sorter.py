"""Sorter pretraining (issue 4 §1): the per-worker loop, in process or on a Ray Train worker.

:func:`train_sorter` is a plain function: each step every worker draws a fresh batch from its
own :class:`rankcore.sorters.SequenceSampler` stream (worker index = rank, so workers never see
the same sequences, and batch ``step`` is a pure function of ``(seed, rank, step)``, so a resumed
run continues exactly), regresses the sorter's output on tie-aware targets with L1 (SoDeep's
choice) or MSE, averages the gradients over workers (DistributedDataParallel: gloo on CPU, NCCL
on GPU) and evaluates on a fixed validation set. It runs without Ray (tests, a GPU box); on a
Ray Train worker :func:`ray_worker_loop` wires it to ``ray.train`` (imported lazily).

Smoothed targets (the remedy for vanishing gradients). Trained on exact ranks, a sorter that
can represent a step (the ``pairwise`` family does) converges to an almost hard step: its rank
error goes to 0, but the gradient of MSE(sorter(pred), ranks(target)) w.r.t. ``pred`` only
lives on near-tied pairs, and points almost anywhere (measured by the gradient agreement of
:mod:`rankcore.sorters.evaluation`). ``target_strength`` σ caps the sharpness: the target of
element i is its EXPECTED SoDeep rank when each standardised value gets independent N(0, σ²)
noise, (1/N) Σ_j Φ((z_j − z_i)/(σ√2)) + 1/(2N) (:func:`smoothed_target`): exact ranks for
σ = 0, tie-aware for every σ (tied pairs get exactly 1/2). The card records σ.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankcore.errors import InputError, TrainingError
from rankcore.ranks import get_tiedrank
from rankcore.sorters import (
    SequenceSampler,
    Sorter,
    build_sorter,
    fixed_eval_set,
    normalize_sequences,
)
from rankcore.sorters.evaluation import evaluate_surrogate, sorter_surrogate, summarize
from rankcore.train.sorter_config import SorterTrainConfig
from rankcore.train.sorter_state import latest_state, read_state, write_sorter_file, write_state

__all__ = ["VAL_SEED", "SorterTrainResult", "pretrain_sorter_local", "ray_worker_loop",
           "smoothed_target", "train_sorter"]

logger = logging.getLogger(__name__)

#: Seed of the validation set (held out from the accuracy suite's seed and the train streams).
VAL_SEED = 7
Report = Callable[[dict[str, Any], Path | None], None]


def smoothed_target(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Expected SoDeep ranks under Gaussian input noise of ``strength`` standard deviations.

    Args:
        x: (..., N) values (any unit; standardised per sequence first).
        strength: σ ≥ 0 in standard deviations of each sequence; 0 gives ``get_tiedrank``.

    Returns:
        (..., N) targets in [1/(2N), 1 + 1/(2N)] in x's dtype, summing to (N + 1)/2 per
        sequence: (1/N) Σ_j Φ((z_j − z_i)/(σ√2)) + 1/(2N). O(N²) per sequence.
    """
    if strength == 0:
        return get_tiedrank(x, dim=-1)
    n = x.shape[-1]
    z = normalize_sequences(x.detach().double())
    d = (z.unsqueeze(-2) - z.unsqueeze(-1)) / (strength * math.sqrt(2.0))  # d_ij ∝ z_j − z_i
    phi = 0.5 * torch.erfc(-d / math.sqrt(2.0))
    return (phi.mean(dim=-1) + 0.5 / n).to(x.dtype)


@dataclass
class SorterTrainResult:
    """What :func:`train_sorter` returns.

    Attributes:
        sorter: the trained sorter (unwrapped, eval mode, on the training device).
        card: the final card (complete on rank 0; other ranks get the config part only).
        history: one dict per validation pass (step, loss, lr, val metrics).
        checkpoint: the final checkpoint folder (rank 0 with a ``checkpoint_dir``), or None.
    """

    sorter: Sorter
    card: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("`device` must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    return torch.device(name)


def _lr_at(config: SorterTrainConfig, step: int) -> float:
    """Learning rate of 1-based ``step`` (cosine from lr to lr_floor·lr over the run)."""
    if config.lr_schedule == "constant" or config.steps == 1:
        return config.lr
    t = (step - 1) / (config.steps - 1)
    return config.lr * (config.lr_floor + (1 - config.lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _new_sorter(config: SorterTrainConfig) -> Sorter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_sorter(config.kind, seq_len=config.fixed_length, **config.sizes)


def _optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:  # the fused kernel is much faster on CPU for small models (torch >= 2.4)
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch / devices
        return torch.optim.Adam(params, lr=lr)


def _validation_metrics(sorter: Sorter, cells: list, *, grad_rows: int = 0
                        ) -> dict[str, float]:
    """Rank error and Spearman vs exact ranks (and gradient agreement) on ``cells``."""
    was_training = sorter.training
    sorter.eval()
    try:
        scores = evaluate_surrogate(sorter_surrogate(sorter), cells, grad_rows=grad_rows)
    finally:
        sorter.train(was_training)
    tied, free, every = summarize(scores, ties=True), summarize(scores, ties=False), \
        summarize(scores)
    out = {"rank_error": every["rank_error"], "spearman": every["spearman"],
           "rank_error_ties": tied["rank_error"], "spearman_ties": tied["spearman"],
           "spearman_no_ties": free["spearman"]}
    if grad_rows:
        out["grad_cosine"], out["grad_norm"] = every["grad_cosine"], every["grad_norm"]
    return out


def _final_validation(sorter: Sorter, config: SorterTrainConfig) -> dict[str, Any]:
    """Per-length validation with gradient agreement (recorded in the card)."""
    out: dict[str, Any] = {}
    for n in config.validation_lengths:
        cells = fixed_eval_set(VAL_SEED, (n,), rows=config.eval_rows)
        out[f"N{n}"] = _validation_metrics(sorter, cells, grad_rows=min(config.eval_rows, 16))
    return out


def _marker(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def _fail_once(config: SorterTrainConfig, step: int, rank: int, world_size: int) -> None:
    """Test hook: the last worker raises once at ``fail_at_step`` (a marker file says when)."""
    if config.fail_at_step != step or rank != world_size - 1 or config.fail_marker is None:
        return
    import pyarrow.fs as pafs

    fs, path = _marker(config.fail_marker)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(f"failed once at step {step} on rank {rank}\n".encode())
    raise RuntimeError(f"injected failure at step {step} on worker {rank} (fail_at_step test "
                       "hook)")


def _check_resume(config: SorterTrainConfig, state: dict[str, Any], where: Path) -> None:
    if state.get("config_digest") != config.digest():
        raise InputError(f"checkpoint {str(where)!r} belongs to another configuration; use "
                         "another checkpoint_dir or the original config")


def _in_sync(sorter: Sorter, world: Any) -> bool:
    """Whether every worker holds bit-identical weights (DDP must keep them so)."""
    with torch.no_grad():
        probe = torch.stack([p.detach().double().sum() for p in sorter.parameters()]
                            + [p.detach().double().square().sum() for p in sorter.parameters()])
        rows = world.all_gather(probe.unsqueeze(0))
    return bool((rows == rows[:1]).all())


def train_sorter(config: SorterTrainConfig | dict[str, Any], *,
                 checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
                 world: Any = None, report: Report | None = None) -> SorterTrainResult:
    """Pretrain a sorter; see the module docstring.

    Args:
        config: the run's configuration (or its dict).
        checkpoint_dir: where rank 0 writes a checkpoint every ``checkpoint_every`` steps and
            at the end (see :mod:`rankcore.train.sorter_state`); when it already holds one of
            this config and ``resume_from`` is None, training resumes from the newest.
        resume_from: a checkpoint folder to resume from (every rank reads it).
        world: a :class:`rankcore.train.dist.World` for multi-worker training, or None.
        report: called on EVERY rank at each checkpoint and at the end, with the latest
            metrics and (rank 0) the checkpoint folder — e.g. ``ray.train.report``.

    Returns:
        A :class:`SorterTrainResult`.

    Raises:
        InputError: bad config, or a checkpoint of another config.
        TrainingError: the loss became NaN/inf, or workers drifted apart.
    """
    config = SorterTrainConfig.from_dict(config)
    rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
    device = _resolve_device(config.device)
    if resume_from is None and checkpoint_dir is not None:
        resume_from = latest_state(checkpoint_dir)
    if resume_from is not None:
        sorter, opt_state, state = read_state(resume_from, device)
        _check_resume(config, state, Path(resume_from))
    else:
        sorter, opt_state, state = _new_sorter(config).to(device).train(), None, {}
    optimizer = _optimizer(list(sorter.parameters()), config.lr)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    start = int(state.get("step", 0))
    history: list[dict[str, Any]] = list(state.get("history", []))
    seconds = float(state.get("train_seconds", 0.0))
    card: dict[str, Any] = dict(state.get("card", {}))
    base = {"steps": config.steps, "seed": config.seed, "config": config.to_dict(),
            "config_digest": config.digest(), "workers": world_size,
            "global_batch_size": config.batch_size * world_size,
            "target_strength": config.target_strength, "loss": config.loss,
            "validation_seed": VAL_SEED}
    model = world.wrap_model(sorter) if world is not None and world_size > 1 else sorter
    sampler = SequenceSampler(config.seed, config.seq_len, config.batch_size, worker=rank,
                              device=device)
    val_cells = fixed_eval_set(VAL_SEED, tuple(sorted(set(config.seq_len))),
                               rows=config.eval_rows) if rank == 0 else []
    metrics: dict[str, Any] = dict(history[-1]) if history else {}
    last: Path | None = Path(resume_from) if resume_from is not None else None
    loss_sum, loss_count = 0.0, 0

    def checkpoint(step: int, extra: dict[str, Any]) -> Path | None:
        path = None
        if rank == 0 and checkpoint_dir is not None:
            st = {"step": step, "config_digest": config.digest(), "history": history,
                  "train_seconds": seconds, "card": {**base, **extra}}
            path = write_state(checkpoint_dir, step, sorter, optimizer, st, {**base, **extra})
        if report is not None:
            report({**metrics, "step": step}, path)
        return path

    t0 = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        x, exact = sampler.batch(step - 1)
        target = exact if config.target_strength == 0 else smoothed_target(
            x, config.target_strength)
        lr = _lr_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pred = model(x)
        diff = pred - target.to(pred.dtype)
        loss = diff.abs().mean() if config.loss == "l1" else diff.square().mean()
        if not bool(torch.isfinite(loss)):
            raise TrainingError(f"sorter loss became {float(loss)} at step {step}; lower `lr` "
                                f"(now {lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(sorter.parameters(), config.grad_clip)
        optimizer.step()
        loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
        if rank == 0 and (step % config.eval_every == 0 or step == config.steps):
            metrics = {"step": step, "loss": loss_sum / loss_count, "lr": lr,
                       **{f"val_{k}": v for k, v in _validation_metrics(sorter,
                                                                        val_cells).items()}}
            loss_sum, loss_count = 0.0, 0
            history.append(metrics)
            logger.info("sorter %s step %d/%d loss %.4g val rank_error %.4f spearman %.4f",
                        config.kind, step, config.steps, metrics["loss"],
                        metrics["val_rank_error"], metrics["val_spearman"])
        if step % config.checkpoint_every == 0 and step < config.steps:
            seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            last = checkpoint(step, {"complete": False}) or last
        _fail_once(config, step, rank, world_size)
    seconds += time.perf_counter() - t0
    sorter.eval()
    if not card.get("complete"):
        in_sync = _in_sync(sorter, world) if world is not None and world_size > 1 else True
        if not in_sync:
            raise TrainingError("workers hold different sorter weights after training "
                                "(gradient averaging failed)")
        card = {**base, "complete": True, "train_seconds": round(seconds, 3),
                "replicas_in_sync": in_sync, "history": history}
        if rank == 0:
            card["validation"] = _final_validation(sorter, config)
            main = card["validation"].get(f"N{config.seq_len[0]}", {})
            metrics = {**metrics, **{f"final_{k}": v for k, v in main.items()}}
        last = checkpoint(config.steps, card) or last
    elif report is not None:  # restored a finished run: report it again
        report({**metrics, "step": config.steps}, last if rank == 0 else None)
    return SorterTrainResult(sorter, card if rank == 0 else base, history,
                             last if rank == 0 else None)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def ray_worker_loop(cfg: dict[str, Any]) -> None:
    """Body of every Ray Train worker: rebuild the config, resume, train, report checkpoints.

    Args:
        cfg: ``{"config": SorterTrainConfig.to_dict(), "use_gpu": bool}``.
    """
    import ray.train
    from ray.train import Checkpoint

    from rankcore.train.dist import TorchDistWorld

    world = TorchDistWorld()
    config = SorterTrainConfig.from_dict(cfg["config"])
    if cfg.get("use_gpu"):
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
        config = config.replace(device="cuda")
    local = Path(tempfile.mkdtemp(prefix=f"brainrank-sorter-rank{world.rank}-"))
    try:
        resume = None
        restored = ray.train.get_checkpoint()
        if restored is not None:
            resume = local / "restored"
            restored.to_directory(str(resume))

        def report(metrics: dict[str, Any], path: Path | None) -> None:
            ckpt = Checkpoint.from_directory(str(path)) if path is not None else None
            ray.train.report(_numbers(metrics), checkpoint=ckpt,
                             checkpoint_dir_name=path.name if path is not None else None,
                             delete_local_checkpoint_after_upload=False)

        train_sorter(config, checkpoint_dir=local / "checkpoints", resume_from=resume,
                     world=world, report=report)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def pretrain_sorter_local(config: SorterTrainConfig | dict[str, Any], out: str | Path, *,
                          checkpoint_dir: str | Path | None = None) -> dict[str, Any]:
    """Train in this process and write the sorter file ``out``; return its card.

    Args:
        config: the run's configuration.
        out: destination ``.safetensors`` file (its card goes to the ``.json`` next to it).
        checkpoint_dir: checkpoint folder (kept, and resumed from on a rerun); by default a
            hidden folder next to ``out``, removed once ``out`` is written.
    """
    config = SorterTrainConfig.from_dict(config)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"`out` must end in .safetensors, got {str(out)!r}")
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else (
        out.parent / f".{out.stem}.checkpoints")
    result = train_sorter(config, checkpoint_dir=folder)
    if result.checkpoint is None:  # pragma: no cover - rank 0 with a checkpoint_dir has one
        raise TrainingError("training finished without a final checkpoint")
    card = write_sorter_file(out, result.checkpoint, {"engine": "local"})
    if checkpoint_dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return card
