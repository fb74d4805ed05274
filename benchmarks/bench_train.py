"""Training speed of the cascade's stages, and what the ranking terms cost inside a step.

Run: ``python benchmarks/bench_train.py [--steps K] [--threads T] [--batch-size B]``. Not a
test: it prints Markdown tables (paste them into the README). In one run:

1. CPU, default model and grid (80, 96, 80), the default batch (16): samples/s per worker for
   stage 1 and stage 2 — one training step is forward + BrainAgeLoss (the default soft Spearman) +
   backward + fused Adam(amsgrad) step, exactly what rankcore.train.loop runs per batch (with
   the histogram-branch counts it caches per subject) — and forward-only (validation /
   prediction, histogram counts included) samples/s.
2. The ranking terms' share of a stage-1 step, for each surrogate (soft PAV, soft pairwise,
   every shipped sorter that can rank the batch, none): the time of
   ``w_rank · rank_term(pred, target) + w_diff · Ld`` forward + backward on the batch's
   predictions, over the time of the whole step with that surrogate. Target: <= 5 %.
3. With CUDA: samples/s at 1 mm, 160 x 192 x 160, bf16 autocast, both stages (skipped with a
   note on a CPU-only host).

Each time is the median of ``--steps`` timed steps after two warm-up steps (``perf_counter``;
CUDA synchronised); samples/s = batch / median step time. On a shared machine the medians
move by ~20 %; the ranking-term share is measured within the same run, so it is robust.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from rankcore.losses import age_difference_loss
from rankcore.models import count_parameters
from rankcore.train.checkpoint import build_stage_model
from rankcore.train.config import TrainConfig
from rankcore.train.objective import PRETRAINED_DIR, build_objective

CPU_SHAPE = (80, 96, 80)
GPU_SHAPE = (160, 192, 160)


def _median_time(fn: Callable[[], object], steps: int, sync: Callable[[], None]) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(n: int, shape: tuple[int, int, int], device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((n, 1, *shape), generator=g).to(device)
    age = (20 + 60 * torch.rand(n, generator=g)).round().to(device)  # integer ages: ties
    sex = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(device)
    stage1 = (age + 5 * torch.randn(n, generator=g).to(device)).to(device)
    return image, age, sex, stage1


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def stage_speed(stage: int, config: TrainConfig, shape: tuple[int, int, int], steps: int,
                device: torch.device, amp: bool) -> dict[str, float]:
    """Training-step and forward-only throughput of one stage on one worker."""
    torch.manual_seed(0)
    model = build_stage_model(stage, config.backbone, config.cascade).to(device)
    model.set_age_scale(50.0, 17.0)
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay, "amsgrad": True}
    try:
        opt = torch.optim.Adam(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(model.parameters(), **kwargs)
    objective = build_objective(config).to(device)
    image, age, sex, stage1 = _batch(config.batch_size, shape, device)
    # Training reuses each subject's histogram-branch counts (computed once, see
    # rankcore.train.data); prediction computes them, once per subject.
    counts = (model.backbone.histogram_counts(image)
              if model.backbone.histogram is not None else None)

    def forward(hist_counts=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = (model(image, sex, None, hist_counts) if stage == 1
                   else model(image, stage1, sex, None, hist_counts))
        return out.float()

    def step():
        total, _ = objective(forward(counts), age)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    model.train()
    t_step = _median_time(step, steps, _sync(device))
    model.eval()
    with torch.no_grad():
        t_eval = _median_time(forward, steps, _sync(device))
    return {"params": count_parameters(model), "step_s": t_step,
            "train_sps": config.batch_size / t_step, "eval_sps": config.batch_size / t_eval}


def _surrogates(batch_size: int) -> list[tuple[str, dict]]:
    out = [("soft pav", {"rank_loss": "soft", "soft_method": "pav"}),
           ("soft pairwise", {"rank_loss": "soft", "soft_method": "pairwise"})]
    for path in sorted(PRETRAINED_DIR.glob("*.safetensors")):
        out.append((f"sorter {path.stem}", {"rank_loss": "sorter", "sorter": str(path)}))
    out.append(("none (Ld only)", {"rank_loss": "none"}))
    return out


def rank_share(base: TrainConfig, steps: int) -> list[tuple[str, str]]:
    """Rows (surrogate, Markdown cells) of the ranking-term share of a stage-1 CPU step."""
    rows = []
    device = torch.device("cpu")
    for name, changes in _surrogates(base.batch_size):
        try:
            config = base.replace(**changes)
            objective = build_objective(config)
        except Exception as err:  # a sorter of another length: say so, keep going
            rows.append((name, f"| skipped: {str(err).splitlines()[0][:80]} | | | |"))
            continue
        g = torch.Generator().manual_seed(1)
        target = (20 + 60 * torch.rand(base.batch_size, generator=g)).round()
        pred0 = target + 5 * torch.randn(base.batch_size, generator=g)

        def terms(objective=objective, config=config, pred0=pred0, target=target):
            pred = pred0.clone().requires_grad_(True)
            t = objective.rank(pred, target) if objective.rank is not None else pred.sum() * 0
            w = objective.weights
            (w["rank"] * t + w["diff"] * age_difference_loss(pred, target)).backward()

        t_terms = _median_time(terms, max(steps * 4, 20), lambda: None)
        t_step = stage_speed(1, config, CPU_SHAPE, steps, device, amp=False)["step_s"]
        share = 100 * t_terms / t_step
        verdict = "yes" if share <= 5 else "NO"
        rows.append((name, f"| {1e3 * t_terms:.2f} | {1e3 * t_step:.0f} | {share:.2f} % | "
                           f"{verdict} |"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                        help="global batch (the default TrainConfig's: 16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(batch_size=args.batch_size, device="cpu")
    cpu = torch.device("cpu")

    print(f"# bench_train ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__})\n")
    print(f"## Training throughput per worker, CPU, {CPU_SHAPE}, batch {config.batch_size}\n")
    print("| stage | parameters | training samples/s | step (ms) | forward-only samples/s |")
    print("|---|---|---|---|---|")
    speeds = {}
    for stage in (1, 2):
        r = speeds[stage] = stage_speed(stage, config, CPU_SHAPE, args.steps, cpu, amp=False)
        print(f"| {stage} | {r['params']:,} | {r['train_sps']:.1f} | {1e3 * r['step_s']:.0f} | "
              f"{r['eval_sps']:.1f} |")
    n, r1 = 300, speeds[1]
    print(f"\nOne stage-1 epoch over {n} subjects: ~{n / r1['train_sps']:.1f} s of training "
          f"steps (the default cascade runs (K + 1) · E = 4 · 15 stage-1 epochs and 15 of "
          "stage 2).\n")

    print(f"## Ranking terms in a stage-1 step (CPU, batch {config.batch_size}; target <= 5 %)\n")
    print("rank terms = w_rank · surrogate + w_diff · Ld, forward + backward on "
          "the batch's predictions; step = the whole training step with that surrogate.\n")
    print("| surrogate | rank terms (ms) | step (ms) | share | <= 5 % |")
    print("|---|---|---|---|---|")
    for name, cells in rank_share(config, args.steps):
        print(f"| {name} {cells}")

    print(f"\n## GPU, 1 mm {GPU_SHAPE}, bf16 autocast, batch {config.batch_size}\n")
    if not torch.cuda.is_available():
        print("Skipped: no CUDA device on this host (run this script on a GPU host).")
        return
    gpu = torch.device("cuda")
    name = torch.cuda.get_device_name(gpu)
    print(f"Device: {name}\n")
    print("| stage | training samples/s | step (ms) | forward-only samples/s |")
    print("|---|---|---|---|")
    for stage in (1, 2):
        r = stage_speed(stage, config.replace(device="cuda"), GPU_SHAPE, args.steps, gpu,
                        amp=True)
        print(f"| {stage} | {r['train_sps']:.1f} | {1e3 * r['step_s']:.0f} | "
              f"{r['eval_sps']:.1f} |")


if __name__ == "__main__":
    main()
