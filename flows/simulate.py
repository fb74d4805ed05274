"""Flow `simulate`: write a simulated BIDS-style cohort from the MNI ICBM152 2009 template.

Run it as `brainrank simulate OUT_DIR --subjects N --seed S` or `python -m flows.simulate ...`.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger

from flows._server import temporary_server
from flows.params import SimulateParams
from tasks.simulate import simulate_cohort_task


@flow(name="simulate", log_prints=False)
def simulate_flow(params: SimulateParams) -> str:
    """Simulate ``params.subjects`` subjects into ``params.out_dir``; return the cohort root."""
    logger = get_run_logger()
    root = simulate_cohort_task(params.out_dir, params.subjects, params.seed, params.spacing,
                                params.sites, params.corrupt, params.workers,
                                anatomy=params.anatomy, warp_sd_mm=params.warp_sd_mm)
    logger.info("simulated %d subjects (seed %d) into %s", params.subjects, params.seed, root)
    return root


def run_cli(params: SimulateParams) -> int:
    with temporary_server():
        root = simulate_flow(params)
    print(f"simulated cohort: {root}")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["simulate", *sys.argv[1:]]))
