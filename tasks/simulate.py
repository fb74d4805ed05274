"""Prefect task around the cohort simulator."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from rankcore.mri.simulate import simulate_cohort


@task(name="simulate-cohort", retries=0)
def simulate_cohort_task(out_dir: str, subjects: int, seed: int, spacing: float, sites: int,
                         corrupt: int, workers: int, *, anatomy: bool = True,
                         warp_sd_mm: float = 2.5) -> str:
    """Write the simulated cohort (deterministic for a seed); return its root folder."""
    root = simulate_cohort(Path(out_dir), subjects=subjects, seed=seed, spacing=spacing,
                           sites=sites, corrupt=corrupt, workers=workers, anatomy=anatomy,
                           warp_sd_mm=warp_sd_mm)
    return str(root)
