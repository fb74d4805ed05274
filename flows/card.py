"""`brainrank card MODEL_DIR`: print a model's card (human-readable, or the raw JSON).

Reading one JSON file needs no orchestration, so this command runs no Prefect flow.
"""

from __future__ import annotations

import json
import sys

from flows.params import CardParams
from rankcore.errors import BrainrankError, InputError


def run_cli(params: CardParams) -> int:
    """Print the card of ``params.model_dir``; 2 with one line when it is not a model folder."""
    from rankcore.report.card_text import describe_card
    from rankcore.train.cascade_plan import CARD_FILE, CARD_FORMAT

    try:
        path = f"{params.model_dir.rstrip('/')}/{CARD_FILE}"
        try:
            with open(path, encoding="utf-8") as fh:
                card = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"`model_dir` must be a folder written by `brainrank train`, got "
                             f"{params.model_dir!r} ({type(err).__name__}: {err})") from None
        if card.get("format") != CARD_FORMAT:
            raise InputError(f"`model_dir` must hold a brainrank cascade card, got format "
                             f"{card.get('format')!r} in {path!r}")
    except BrainrankError as exc:
        print(f"brainrank card: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2, sort_keys=True) if params.as_json else describe_card(card),
          end="\n" if params.as_json else "")
    return 0


if __name__ == "__main__":
    from flows.cli import main

    raise SystemExit(main(["card", *sys.argv[1:]]))
