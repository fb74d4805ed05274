"""Prefect tasks of the pipeline flow that are not stage flows: thin wrappers around rankcore.

None is retried: each reads metadata only (a cohort table, a cache's metadata, a model card),
so a failure means unusable input, which a retry cannot fix. Prefect's result cache is off;
the pipeline keeps its own stage digests (flows/_run_state.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from rankcore.cache import open_cache
from rankcore.mri import PreprocessConfig, read_cohort
from rankcore.mri.holdout import cohort_fingerprint, has_test_split, with_test_split, write_manifest


@task(name="prepare-cohort", retries=0, cache_policy=NO_CACHE)
def prepare_cohort_task(cohort: str, manifest: str, allow_outside_root: bool,
                        test_fraction: float, split_seed: int) -> dict[str, Any]:
    """Read the cohort table; hold out a test split when it names none; fingerprint it.

    Returns:
        ``cohort`` (what to ingest: the cohort itself, or ``manifest`` written with the held
        out split), ``allow_outside_root`` (for that input), ``split_source`` ("cohort" or
        "held_out"), ``rows``, ``splits`` (count per label, "none" for unlabelled),
        ``set_aside`` (table rows set aside while reading, which a written manifest does not
        carry: participant_id, source, category, message) and ``fingerprint``.
    """
    parsed = read_cohort(cohort, allow_outside_root=allow_outside_root, require_age=True)
    if has_test_split(parsed):
        target, source, allow, set_aside = cohort, "cohort", allow_outside_root, []
    else:
        parsed = with_test_split(parsed, test_fraction, split_seed)
        target = str(write_manifest(parsed, manifest))
        source, allow = "held_out", True  # every path in it passed the cohort's own check
        set_aside = [{"participant_id": q.participant_id, "source": q.source,
                      "category": q.category, "message": q.message} for q in parsed.quarantine]
    splits = Counter(row.split or "none" for row in parsed.rows)
    return {"cohort": target, "allow_outside_root": allow, "split_source": source,
            "rows": len(parsed.rows), "splits": dict(sorted(splits.items())),
            "set_aside": set_aside, "fingerprint": cohort_fingerprint(parsed)}


@task(name="cache-digest", retries=0, cache_policy=NO_CACHE)
def cache_digest_task(cache: str, spacing: float, shape: tuple[int, int, int],
                      tissue: bool) -> dict[str, Any]:
    """The data digest of the cache of (``spacing``, ``shape``, ``tissue``) and its rows per split.

    Raises:
        InputError: no such cache (or a corrupt one).
    """
    from rankcore.train.split import DIGEST_COLUMNS, cache_data_digest

    view = open_cache(cache, PreprocessConfig(spacing=spacing, shape=tuple(shape),
                                             tissue=tissue))
    columns = {c: view.table.column(c).to_pylist() for c in DIGEST_COLUMNS}
    splits = Counter(s or "none" for s in columns["split"])
    return {"data_digest": cache_data_digest(view.layout.digest, columns),
            "cache_folder": str(view.layout.folder), "rows": len(view),
            "splits": dict(sorted(splits.items()))}


@task(name="training-key", retries=0, cache_policy=NO_CACHE)
def training_key_task(plan_args: dict[str, Any]) -> str:
    """The training key a cascade run with these :func:`plan_cascade` arguments would have.

    ``plan_args["out"]`` should be a folder that does not exist (nothing is written).
    """
    from rankcore.train.cascade_plan import plan_cascade

    args = dict(plan_args)
    return plan_cascade(args.pop("cache"), args.pop("out"), args.pop("config"),
                        **args).training_key
