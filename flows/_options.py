"""Command-line options generated from a parameters model (flows/params.py).

Each field of the model becomes one option: ``--field-name`` (underscores as dashes), its type,
choices, bounds-checked value, default and help (the field's ``description``) taken from the
model. Nothing here repeats a default or a help text. What a model cannot say is the
command line's own spelling, given per command in :data:`LAYOUT`: which fields are positional,
metavars, a flag spelled otherwise, mutually exclusive options, hidden test hooks.

Rules, by field type:

- ``bool`` with default False: ``--name``; default True: ``--no-name``; default None (either):
  ``--name`` / ``--no-name``.
- ``Literal[...]``: choices. ``tuple[int, int, int]``: three numbers (``X Y Z``).
- ``list[...]``: the option repeats (``--pip a --pip b``) unless LAYOUT gives it ``nargs``.
- ``dict``: ``--name KEY=VALUE``, repeatable; VALUE is read as YAML (``lr=3e-4``,
  ``growth=[8,16]``) unless the dict holds strings, and a dotted KEY (``backbone.growth=...``)
  reaches a nested key.
- a nested parameters model (a pipeline section such as ``train``): its own options, spelled
  ``--train.epochs``, in a help group of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

S = argparse.SUPPRESS


@dataclass(frozen=True)
class Layout:
    """The command line's own spelling of one command's model (nothing about values)."""

    positional: tuple[str, ...] = ()
    metavars: dict[str, str] = field(default_factory=dict)
    flags: dict[str, str] = field(default_factory=dict)
    exclusive: tuple[str, ...] = ()
    nargs: dict[str, str] = field(default_factory=dict)
    one_string: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()


LAYOUT: dict[str, Layout] = {
    "simulate": Layout(positional=("out_dir",), metavars={"out_dir": "OUT_DIR"}),
    "ingest": Layout(positional=("cohort",), metavars={"cohort": "COHORT",
                                                      "cache": "CACHE_DIR"}),
    "pretrain-sorter": Layout(metavars={"out": "SORTER_FILE"}, hidden=("fail_at_step",)),
    "train": Layout(positional=("cache",), metavars={"cache": "CACHE_DIR", "out": "MODEL_DIR",
                                                    "sorter": "FILE"},
                    exclusive=("sorter", "rank_loss")),
    "evaluate": Layout(positional=("model_dir", "cache"),
                       metavars={"model_dir": "MODEL_DIR", "cache": "CACHE_DIR",
                                 "out": "REPORT_DIR"}),
    "predict": Layout(positional=("model_dir", "cohort"),
                      metavars={"model_dir": "MODEL_DIR", "cohort": "COHORT",
                                "out": "PREDICTIONS_FILE", "bias_file": "FILE",
                                "cache": "CACHE_DIR"}),
    "card": Layout(positional=("model_dir",), metavars={"model_dir": "MODEL_DIR"},
                   flags={"as_json": "--json"}),
    "pipeline": Layout(metavars={"out": "RUN_DIR", "cohort": "COHORT",
                                 "sorter.file": "FILE"},
                       hidden=("sorter.pretrain.fail_at_step",)),
    "submit": Layout(positional=("stage",),
                     metavars={"stage": "COMMAND", "address": "URL", "job_config": "FILE",
                               "job_args": "OPTIONS", "working_dir": "DIR",
                               "pip": "REQUIREMENT", "python": "EXE", "token_file": "FILE"},
                     flags={"job_config": "--config"}, one_string=("job_args",)),
    "serve": Layout(metavars={"root": "DIR", "cohort": "COHORT", "only": "FLOW/NAME"},
                    nargs={"only": "+"}),
}


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other unions are left as they are)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _default_text(info: FieldInfo) -> str:
    if (info.is_required() or info.default_factory is not None or info.default is None
            or isinstance(info.default, bool)):
        return ""
    value = info.default
    if isinstance(value, tuple | list):
        value = " ".join(map(str, value))
    return f" (default: {value})"


def _help(info: FieldInfo, suffix: str = "") -> str:
    text = (info.description or "") + _default_text(info) + suffix
    return text.replace("%", "%%")


class KeyValues(argparse.Action):
    """``--name KEY=VALUE`` (repeatable) into one dict; ``typed``: VALUE read as YAML."""

    def __init__(self, *args: Any, typed: bool = True, **kwargs: Any) -> None:
        self.typed = typed
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        key, sep, raw = str(values).partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"must be KEY=VALUE, got {values!r}")
        value: Any = raw
        if self.typed:
            import yaml

            try:
                value = yaml.safe_load(raw) if raw else ""
                if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
                    with contextlib.suppress(ValueError):
                        value = float(value)
            except yaml.YAMLError:
                raise argparse.ArgumentError(
                    self, f"VALUE must be a number, a word or YAML such as [8, 16], "
                          f"got {raw!r}") from None
        current = getattr(namespace, self.dest, None)
        merged = dict(current) if isinstance(current, dict) else {}
        target = merged
        *parents, leaf = key.split(".") if self.typed else [key]
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise argparse.ArgumentError(self, f"KEY {key!r} must not go below a value")
        target[leaf] = value
        setattr(namespace, self.dest, merged)


def _add_field(p: Any, name: str, info: FieldInfo, dest: str, layout: Layout,
               command_layout_key: str) -> None:
    tp = _unwrap_optional(info.annotation)
    origin = typing.get_origin(tp)
    option = layout.flags.get(command_layout_key, "--" + dest.replace("_", "-"))
    metavar = layout.metavars.get(command_layout_key)
    kw: dict[str, Any] = {"dest": dest, "default": S}
    if metavar:
        kw["metavar"] = metavar
    if command_layout_key in layout.positional:
        del kw["dest"]
        if origin is Literal:  # argparse checks a positional's default against its choices
            kw.update(choices=list(typing.get_args(tp)), default=None)
        p.add_argument(dest, nargs="?", help=_help(info), **kw)
        return
    if tp is bool:
        if info.default is None:
            p.add_argument(option, action=argparse.BooleanOptionalAction, help=_help(info),
                           **kw)
        elif info.default:
            head, _, tail = option.rpartition(".")
            neg = f"{head}.no-{tail.lstrip('-')}" if head else f"--no-{tail.lstrip('-')}"
            p.add_argument(neg, action="store_false",
                           help=_help(info, " (on by default; this flag turns it off)"), **kw)
        else:
            p.add_argument(option, action="store_true", help=_help(info), **kw)
        return
    if origin is Literal:
        kw["choices"] = list(typing.get_args(tp))
        kw["type"] = type(kw["choices"][0])
    elif origin is tuple:
        kw.update(nargs=len(typing.get_args(tp)), type=typing.get_args(tp)[0])
        kw.setdefault("metavar", ("X", "Y", "Z")[:kw["nargs"]])
    elif origin is list and command_layout_key not in layout.one_string:
        kw["nargs"] = layout.nargs.get(command_layout_key)
        kw["action"] = "extend" if kw["nargs"] else "append"
        if not kw["nargs"]:
            del kw["nargs"]
    elif tp is dict or origin is dict:
        values = typing.get_args(tp)
        kw.update(action=KeyValues, typed=not (values and values[1] is str))
        kw.setdefault("metavar", "KEY=VALUE")
    elif tp in (int, float):
        kw["type"] = tp
    if "metavar" not in kw and "choices" not in kw and "action" not in kw:
        kw["metavar"] = name.upper()
    p.add_argument(option, help=_help(info), **kw)


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], layout: Layout,
                      prefix: str = "") -> None:
    """Add an option for every field of ``model`` (sections as groups, recursively)."""
    target: Any = parser
    if layout.exclusive and not prefix:
        exclusive = parser.add_mutually_exclusive_group()
    for name, info in model.model_fields.items():
        key = prefix + name
        if key in layout.hidden:
            continue
        tp = _unwrap_optional(info.annotation)
        if _is_section(tp):
            doc = (tp.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            group = parser.add_argument_group(f"section {key}", doc.replace("%", "%%"))
            _add_group_fields(group, tp, layout, key + ".")
            continue
        into = exclusive if key in layout.exclusive else target
        _add_field(into, name, info, key, layout, key)


def _add_group_fields(group: Any, model: type[BaseModel], layout: Layout, prefix: str) -> None:
    for name, info in model.model_fields.items():
        key = prefix + name
        if key in layout.hidden:
            continue
        if _is_section(_unwrap_optional(info.annotation)):
            # a section inside a section (sorter.pretrain): options in the same help group
            _add_group_fields(group, _unwrap_optional(info.annotation), layout, key + ".")
            continue
        _add_field(group, name, info, key, layout, key)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.epochs": 2}`` -> ``{"train": {"epochs": 2}}`` (dotted keys to sections)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        target = out
        for name in parents:
            target = target.setdefault(name, {})
        target[leaf] = value
    return out
