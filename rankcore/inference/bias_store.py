"""Where a model's validation-fitted bias correction is kept: ``bias.json`` in MODEL_DIR.

``brainrank evaluate`` fits the correction on the validation split (never the test split) and
stores it twice: in the report folder (with the report) and in MODEL_DIR/bias.json, where
``brainrank predict --bias-correct`` finds it. The file names the model it belongs to (the
card's ``training_key``), so a correction is never applied to another model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankcore._io import atomic_write
from rankcore._sealed import CHECKSUM_KEY, read_sealed, seal
from rankcore.bias import BiasCorrection
from rankcore.errors import InputError
from rankcore.locations import local_path

__all__ = ["BIAS_FILE", "load_bias", "save_bias"]

BIAS_FILE = "bias.json"


def save_bias(path: str | Path, correction: BiasCorrection, card: Mapping[str, Any],
              **extra: Any) -> Path:
    """Write ``correction`` (tagged with the card's training key) to ``path`` atomically.

    ``path`` is a file, or a folder to hold :data:`BIAS_FILE`. ``extra`` adds JSON-able
    provenance (e.g. ``val_keys``, ``source``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / BIAS_FILE
    blob = seal(dict(correction.to_dict(), training_key=card.get("training_key"), **extra))
    text = json.dumps(blob, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_bias(path: str | Path, card: Mapping[str, Any]) -> BiasCorrection:
    """Read a stored correction and check that it belongs to the model of ``card``.

    Args:
        path: a bias.json file, or a folder holding one (MODEL_DIR or a report folder).
        card: the cascade card the correction will be applied with.

    Raises:
        InputError: no such file (the message says how to make one), an unreadable file, a
            file changed since it was written (CorruptFileError), or a correction fitted for
            another model.
    """
    path = local_path(path, "bias_file")
    file = path / BIAS_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"no stored bias correction at {str(file)!r}: run `brainrank evaluate "
                         "MODEL_DIR CACHE_DIR --out REPORT_DIR` on the model's training cache "
                         "first (it fits the correction on the validation split and stores it "
                         "in MODEL_DIR/bias.json), or give --bias-file")
    try:
        blob = read_sealed(file, f"bias correction {str(file)!r}")
    except OSError as err:
        raise InputError(f"bias correction {str(file)!r} is unreadable: {err}") from None
    correction = BiasCorrection.from_dict(
        {k: v for k, v in blob.items() if k != CHECKSUM_KEY})
    key = card.get("training_key")
    if blob.get("training_key") != key:
        raise InputError(f"bias correction {str(file)!r} was fitted for another model "
                         f"(training key {str(blob.get('training_key'))[:12]}, this model "
                         f"{str(key)[:12]}): evaluate this model to fit its own")
    return correction
