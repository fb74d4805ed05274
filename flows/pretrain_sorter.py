"""Flow `pretrain-sorter`: pretrain a learned sorter on synthetic sequences (issue 4).

Run it as ``brainrank pretrain-sorter --out FILE [--kind K] [--seq-len N] [--steps S]
[--workers W] [--gpu] [--seed S]`` or ``python -m flows.pretrain_sorter ...``. The output is a
sorter file loadable by ``rankcore.sorters.load_sorter``; its card records kind, seq_len, rank
convention, steps, seed, the full training config and the validation metrics.
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows._server import temporary_server
from flows.params import PretrainSorterParams
from rankcore.train.sorter_config import SorterTrainConfig
from tasks.sorter import pretrain_sorter_task


def sorter_config(params: PretrainSorterParams) -> dict[str, Any]:
    """The validated ``SorterTrainConfig`` of ``params``, as a dict.

    Raises:
        InputError: a value the pydantic model cannot check (unknown kind or size, ...).
    """
    config = {"kind": params.kind, "seq_len": [params.seq_len], "sizes": dict(params.sizes),
              "steps": params.steps, "batch_size": params.batch_size, "lr": params.lr,
              "loss": params.loss, "target_strength": params.target_strength,
              "seed": params.seed, "eval_every": params.eval_every,
              "eval_rows": params.eval_rows, "checkpoint_every": params.checkpoint_every,
              "device": "cuda" if params.gpu else "cpu"}
    return SorterTrainConfig.from_dict(config).to_dict()


def _engine(params: PretrainSorterParams) -> str:
    if params.engine != "auto":
        return params.engine
    return "ray" if params.workers > 1 or params.ray_address else "local"


def _table(card: dict[str, Any]) -> str:
    lines = ["| N | mean abs rank error / N | Spearman (ties) | Spearman (no ties) | grad cosine |",
             "|---|---|---|---|---|"]
    for key, m in card.get("validation", {}).items():
        lines.append(f"| {key[1:]} | {m['rank_error']:.4f} | {m['spearman_ties']:.4f} | "
                     f"{m['spearman_no_ties']:.4f} | {m.get('grad_cosine', float('nan')):.3f} |")
    return "\n".join(lines)


@flow(name="pretrain-sorter", log_prints=False)
def pretrain_sorter_flow(params: PretrainSorterParams) -> dict[str, Any]:
    """Pretrain the sorter ``params`` describe into ``params.out``; return its card."""
    logger = get_run_logger()
    config = sorter_config(params)
    engine = _engine(params)
    logger.info("pretraining a %r sorter (seq_len %d, %d steps) on engine %s with %d worker(s)",
                params.kind, params.seq_len, params.steps, engine, params.workers)
    card = pretrain_sorter_task(params.out, config, engine=engine,
                                workers=params.workers, gpu=params.gpu,
                                storage_path=params.storage_path,
                                ray_address=params.ray_address,
                                max_failures=params.max_failures,
                                fail_at_step=params.fail_at_step)
    table = _table(card)
    logger.info("sorter written to %s\n%s", params.out, table)
    create_markdown_artifact(key="pretrain-sorter", markdown=f"# Sorter {params.out}\n\n{table}\n",
                             description="validation of the pretrained sorter")
    return card


def run_cli(params: PretrainSorterParams) -> int:
    sorter_config(params)  # refuse unusable input before a flow run starts
    with temporary_server():
        card = pretrain_sorter_flow(params)
    main = card.get("validation", {}).get(f"N{params.seq_len}", {})
    print(f"sorter: {params.out} (kind {card['kind']}, {card['steps']} steps; at N={params.seq_len}"
          f": Spearman {main.get('spearman', float('nan')):.4f}, mean |rank error|/N "
          f"{main.get('rank_error', float('nan')):.4f})")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["pretrain-sorter", *sys.argv[1:]]))
