"""`brainrank simulate` then `brainrank ingest` through the real flows and a real Prefect server."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.cli import main


def test_console_script_help_runs_as_a_process():
    exe = Path(sys.executable).with_name("brainrank")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "pretrain-sorter" in out.stdout and "ingest" in out.stdout


@pytest.mark.prefect
def test_simulate_then_ingest_from_the_command_line(prefect_server, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    assert main(["simulate", str(cohort), "--subjects", "6", "--seed", "3",
                 "--spacing", "4", "--corrupt", "2"]) == 0
    with open(cohort / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) >= 6
    assert (cohort / "derivatives" / "simulation" / "truth.tsv").is_file()

    cache = tmp_path / "cache"
    code = main(["ingest", str(cohort), "--cache", str(cache), "--spacing", "6",
                 "--shape", "16", "20", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    shards = list(cache.glob("*/shards/*.parquet"))
    assert shards, "ingest wrote no shard"
    n_rows = sum(pq.read_metadata(s).num_rows for s in shards)
    assert n_rows == 6  # every valid subject is cached; the two broken files are not
    quarantine = pq.read_table(next(cache.glob("*/quarantine.parquet"))).to_pylist()
    assert len(quarantine) >= 2
    assert all(q["category"] and q["message"] for q in quarantine)

    # the same command again reuses everything
    assert main(["ingest", str(cohort), "--cache", str(cache), "--spacing", "6",
                 "--shape", "16", "20", "16"]) == 0
    assert "reused" in capsys.readouterr().out
