"""The command-line front: parsing, --config merging and one-line errors (no flow runs here)."""

from __future__ import annotations

import json

import pytest

from flows import _config, params
from flows.cli import COMMANDS, build_parser, main
from rankcore.errors import InputError


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_has_help_and_config(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            build_parser().parse_args([name, "--help"])
        assert "--config" in capsys.readouterr().out


def test_config_file_then_command_line_precedence(tmp_path):
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("cohort: /data/bids\ncache: /data/cache\nmax-failed-fraction: 0.2\n"
                   "shape: [40, 48, 40]\n")
    p = _config.build_params(params.IngestParams, {"max_failed_fraction": 0.3}, str(cfg))
    assert p.cohort == "/data/bids"
    assert p.shape == (40, 48, 40)
    assert p.max_failed_fraction == 0.3  # the command line wins over the file


def test_json_config(tmp_path):
    cfg = tmp_path / "sim.json"
    cfg.write_text(json.dumps({"out_dir": "x", "subjects": 12}))
    p = _config.build_params(params.SimulateParams, {}, str(cfg))
    assert p.subjects == 12 and p.seed == 0


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"cache": "c"}, "`cohort` is required"),
        ({"cohort": "a", "cache": "c", "max_failed_fraction": 2.0}, "`max_failed_fraction`"),
        ({"cohort": "a", "cache": "c", "bogus": 1}, "`bogus` is not a known option"),
    ],
)
def test_bad_parameters_give_one_clear_line(given, fragment):
    with pytest.raises(InputError) as exc:
        _config.build_params(params.IngestParams, given)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(InputError, match="existing YAML or JSON"):
        _config.read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(InputError, match="not valid"):
        _config.read_config_file(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        _config.read_config_file(lst)


def test_main_reports_errors_on_stderr_and_exits_2(capsys, tmp_path):
    code = main(["ingest", "--cache", str(tmp_path), "--shape", "1", "0", "3",
                 str(tmp_path / "cohort")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("brainrank ingest: error: `shape`")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
