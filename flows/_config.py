"""Turn command-line arguments and a --config file into a validated parameter model.

Precedence: the model's defaults < the config file < options given on the command line.
Config keys mirror the options (``max-failed-fraction`` and ``max_failed_fraction`` both work).
Sections and dict options merge key by key (:func:`deep_merge`): ``--train.epochs 2`` keeps
the file's other ``train`` keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rankcore.errors import InputError

M = TypeVar("M", bound=BaseModel)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping; InputError naming the file when it is unusable."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"`--config` must be an existing YAML or JSON file, got {str(p)!r}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"`--config` must be a UTF-8 YAML or JSON file, got {str(p)!r} (byte "
                         f"0x{exc.object[exc.start]:02x} at offset {exc.start} is not "
                         "UTF-8)") from None
    except OSError as exc:
        raise InputError(f"`--config` must be a readable file, got {str(p)!r} "
                         f"({exc.strerror})") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"`--config` {str(p)!r} is not valid {p.suffix.lstrip('.') or 'YAML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"`--config` {str(p)!r} must hold a mapping of option names to values, "
                         f"got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def format_validation_error(exc: ValidationError) -> str:
    """One line: "`field` must ..., got ..." for the first problem (and how many more)."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"]) or "value"
    if first["type"] == "missing":
        msg = f"`{loc}` is required (give it as an argument, an option or a --config key)"
    elif first["type"] == "extra_forbidden":
        msg = f"`{loc}` is not a known option"
    else:
        text = first["msg"].removeprefix("Value error, ")
        # A message that names its field and what it got (as rankcore's do) stands alone.
        whole = text.startswith("`") or not first["loc"]  # a model-level check says it all
        msg = text if whole else f"`{loc}`: {text}, got {first.get('input')!r}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem(s))"
    return msg


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys; where both hold a mapping, merged key by key.

    Lists and other values are replaced, not merged; neither input is modified.
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(params: BaseModel) -> str:
    """``params`` as a YAML mapping that --config reads back into the same parameters."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)


def build_params(model: type[M], given: dict[str, Any], config_path: str | None = None) -> M:
    """Merge config file and given options into ``model``; InputError with one clear line."""
    values: dict[str, Any] = read_config_file(config_path) if config_path else {}
    values = deep_merge(values, {k: v for k, v in given.items() if v is not None})
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None
