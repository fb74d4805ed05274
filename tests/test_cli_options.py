"""The command line is generated from the parameters models: every field is an option with the
model's default and description, `--print-config` prints what a run would use, and the default
rank loss is the same for `train`, `pipeline`, the TrainConfig default and the README."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows import _config, params
from flows._options import LAYOUT
from flows.cli import COMMANDS, build_parser, main
from flows.train import train_config

REPO = Path(__file__).resolve().parents[1]


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _fields(model, prefix=""):
    for name, info in model.model_fields.items():
        section = info.annotation if isinstance(info.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            yield from _fields(section, f"{prefix}{name}.")
        else:
            yield prefix + name, info


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_field_is_an_option_with_the_models_help_and_default(command):
    model = getattr(params, COMMANDS[command][1])
    actions = {a.dest: a for a in _subparser(command)._actions}
    for key, info in _fields(model):
        if key in LAYOUT[command].hidden:
            assert key not in actions
            continue
        assert info.description, f"{command}: `{key}` has no description"
        action = actions[key]
        assert info.description.replace("%", "%%") in action.help
        default = info.default
        if isinstance(default, int | float | str) and not isinstance(default, bool) \
                and key not in LAYOUT[command].positional:
            assert f"(default: {default})" in action.help, (command, key, action.help)


def test_pipeline_help_shows_every_section_and_points_to_print_config(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "--help"])
    out = capsys.readouterr().out
    for section in ("simulate", "ingest", "sorter", "train", "evaluate"):
        assert f"section {section}:" in out
    assert "--train.epochs" in out and "--train.options KEY=VALUE" in out
    assert "--sorter.pretrain.steps" in out and "--print-config" in out


def test_print_config_prints_the_resolved_configuration_and_runs_nothing(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochs": 3, "gpu": True},
                                   "evaluate": {"n_boot": 10}}))
    run = tmp_path / "run"
    code = main(["pipeline", "--out", str(run), "--config", str(cfg), "--train.epochs", "2",
                 "--train.options", "lr=3e-4", "--train.options", "backbone.growth=[8,16]",
                 "--train.val-fraction", "0.2", "--no-tissue", "--print-config"])
    assert code == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert not run.exists()  # nothing ran
    resolved = yaml.safe_load("\n".join(line[4:] for line in text.splitlines()
                                         if line.startswith("#   ")))
    assert resolved["lr"] == 3e-4 and resolved["epochs"] == 2
    assert resolved["bn_refresh"] == 64 and resolved["soft_method"] == "pairwise"
    train = printed["train"]
    assert (train["epochs"], train["gpu"], train["val_fraction"]) == (2, True, 0.2)
    assert train["options"] == {"lr": 3e-4, "backbone": {"growth": [8, 16]}}
    assert printed["evaluate"]["n_boot"] == 10 and printed["tissue"] is False
    assert printed["simulate"]["subjects"] == params.SimulateParams.model_fields[
        "subjects"].default
    # what it prints (the resolved training config as comments) is a --config file that
    # gives the same parameters back
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(printed))
    assert (_config.build_params(params.PipelineParams, {}, str(again))
            == _config.build_params(params.PipelineParams, printed))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_print_config_works_on_every_command(command, tmp_path, capsys):
    required = {"simulate": ["o"], "ingest": ["c", "--cache", "k"],
                "pretrain-sorter": ["--out", "s"], "train": ["k", "--out", "m"],
                "evaluate": ["m", "k", "--out", "r"], "predict": ["m", "c", "--out", "p.csv"],
                "card": ["m"], "pipeline": ["--out", "r"], "submit": [], "serve": []}
    assert main([command, *required[command], "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    model = getattr(params, COMMANDS[command][1])
    assert model.model_validate(printed) == _config.build_params(model, printed)


def test_every_training_option_is_reachable_from_the_command_line(capsys):
    ns = build_parser().parse_args(["train", "c", "--out", "m", "--k-folds", "4",
                                    "--val-fraction", "0.15", "--options", "lr=3e-4",
                                    "--options", "rank_weight=100", "--stage2-options",
                                    "epochs=7"])
    from flows.cli import given_options

    p = _config.build_params(params.TrainParams, given_options(ns))
    assert (p.k_folds, p.val_fraction, p.stage2_options) == (4, 0.15, {"epochs": 7})
    cfg = train_config(p)
    assert (cfg["lr"], cfg["rank_weight"]) == (3e-4, 100)
    # a key TrainConfig does not know: one line, exit 2
    assert main(["train", "c", "--out", "m", "--options", "no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`options` must hold TrainConfig keys" in err[0]


def test_one_default_rank_loss_everywhere():
    """`train`, `pipeline` (and so its deployments), TrainConfig and the README agree."""
    from rankcore.train.config import TrainConfig

    def loss_of(cfg: dict) -> tuple:
        return (cfg["rank_loss"], cfg["sorter"], cfg["soft_method"], cfg["soft_strength"],
                cfg["rank_weight"], cfg["diff_weight"], cfg["objective_preset"])

    train = train_config(params.TrainParams(cache="c", out="m"))
    pipeline = params.PipelineParams(out="r")
    from_pipeline = train_config(pipeline.train_params("c", "m"))
    library = TrainConfig().to_dict()
    assert loss_of(train) == loss_of(from_pipeline) == loss_of(library)
    assert (library["rank_loss"], library["soft_method"]) == ("soft", "pairwise")
    readme = (REPO / "README.md").read_text()
    said = re.search(r"\*\*Default: soft (\w+) at strength ([0-9.]+)\*\*", readme)
    assert said and (said[1], float(said[2])) == (library["soft_method"],
                                                  library["soft_strength"])
    demo = yaml.safe_load((REPO / "deployments" / "configs" / "demo.yaml").read_text())
    assert demo["sorter"]["source"] == params.PipelineSorter.model_fields["source"].default
