"""A model card as text a person reads (`brainrank card MODEL_DIR`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["describe_card"]


def _num(v: Any, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _mix(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {n} ({100 * n / total:.0f} %)" for k, n in counts.items()) or "n/a"


def describe_card(card: Mapping[str, Any]) -> str:
    """Plain-text summary of a cascade card: use, population, split, metrics, versions.

    Args:
        card: the content of MODEL_DIR/card.json.

    Returns:
        Lines separated by newlines (ends with one); missing fields read ``n/a``.
    """
    pop = card.get("training_population") or {}
    split = card.get("split") or {}
    test = split.get("test") or {}
    pre = card.get("preprocess") or {}
    cfg = card.get("config") or {}
    lines = [f"brainrank cascade (card format {card.get('format', 'n/a')})",
             f"training key   {str(card.get('training_key', 'n/a'))[:16]}",
             f"created        {card.get('created', 'n/a')}", "",
             "Intended use", f"  {card.get('intended_use', 'n/a (the card predates it)')}", "",
             "Training population (training + validation subjects)",
             f"  subjects     {pop.get('n', 'n/a')}",
             f"  age          {_num(pop.get('age_min'), '.1f')} to "
             f"{_num(pop.get('age_max'), '.1f')} y (mean {_num(pop.get('age_mean'), '.1f')}, "
             f"sd {_num(pop.get('age_sd'), '.1f')})",
             f"  sex          {_mix(pop.get('sex') or {})}",
             f"  site         {_mix(pop.get('site') or {})}", "",
             "Split",
             f"  validation   {split.get('source', 'n/a')} (fraction {split.get('val_fraction')}, "
             f"seed {split.get('seed')})",
             f"  test         {test.get('source', 'n/a')}, {test.get('n', 'n/a')} subject(s)"
             + (f" (fraction {test['fraction']}, split seed {test['seed']})"
                if test.get("source") == "held_out" else ""), "",
             "Preprocessing",
             "  " + ", ".join(f"{k} {v}" for k, v in pre.items() if k != "digest"), "",
             "Training",
             f"  model {cfg.get('model', 'n/a')}, rank loss {cfg.get('rank_loss', 'n/a')}, "
             f"epochs {cfg.get('epochs', 'n/a')}, batch {cfg.get('batch_size', 'n/a')}, "
             f"stage 2 {card.get('stage2_source', 'n/a')}"]
    interval = card.get("interval")
    if interval:
        lines.append(f"  interval     {100 * interval['level']:.0f} % split-conformal, "
                     f"calibrated on {interval['n_calibration']} validation subjects")
    lines += ["", "Validation metrics (MAE y / SRCC)"]
    for key, m in (card.get("metrics") or {}).items():
        if m:
            lines.append(f"  {key:<24} {_num(m.get('mae'))} / {_num(m.get('srcc'), '.3f')}")
    lines += ["", "Library versions",
              "  " + ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items())]
    if card.get("records"):
        lines += ["", f"Per-subject training records: ../{card['records']}/ (not part of the "
                      "model; keep them with the data)"]
    return "\n".join(lines) + "\n"
