"""Helpers of the reliability tests: a tiny cohort table, the `brainrank` command as a real
process (against the session's Prefect server), stderr accounting and byte flips."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: A cascade that trains in seconds on the tiny cache (12 x 14 x 10 voxels at 4 mm).
TRAIN_CONFIG = {
    "epochs": 2, "batch_size": 2, "k_folds": 2, "val_fraction": 0.25,
    "options": {"lr": 3e-3, "num_threads": 1, "amp": False,
                "backbone": {"input_pool": 1, "stem_channels": 4, "stem_stride": 1,
                             "growth": [4, 4]}},
}
#: The tiny cohort's grid; box phantoms are no heads, so tissue measurement is off.
GRID = ["--spacing", "4", "--shape", "12", "14", "10", "--no-tissue"]

# A Prefect console log line (progress), as opposed to what a command prints on error.
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (DEBUG|INFO|WARNING) +\| ")


def write_manifest(src: Path, path: Path, extra: list[list] | None = None) -> Path:
    """A manifest of every ``src/sub-*_T1w.nii.gz`` (ages 20 + 4.5 i, two sites), plus
    ``extra`` rows [participant_id, relative path, age, site]."""
    rows = [[p.name.split("_")[0], os.path.relpath(p, path.parent), 20 + 4.5 * i, "ab"[i % 2]]
            for i, p in enumerate(sorted(src.glob("sub-*_T1w.nii.gz")))]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path", "age", "site"])
        w.writerows(rows + (extra or []))
    return path


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli_env(api_url: str | None) -> dict[str, str]:
    """The environment of a `brainrank` child: this checkout first, the session's server."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def brainrank(args: list[str], api_url: str | None, **kw) -> subprocess.Popen:
    """Start `brainrank ARGS` as a real process (stdout and stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, args)],
                            env=cli_env(api_url), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run(args: list[str], api_url: str | None, timeout: float = 300) -> tuple[int, str, str]:
    """Run `brainrank ARGS` to the end; (exit code, stdout, stderr)."""
    proc = brainrank(args, api_url)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    """The stderr lines that are not progress logs (what a failing command adds)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]


def flip_byte(path: Path, offset: int | None = None) -> int:
    """XOR one byte of ``path`` with 0x01 (the middle byte by default); return the offset."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return offset


def volume_page_offset(path: Path, where: float = 0.75) -> int:
    """Offset of a byte inside the `volume` column chunk of a cache shard's middle row group:
    ``where`` of the way through it (0.75: inside the page's data, past its few-byte header,
    which the page checksum does not cover; 0.0: the header's first byte)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    group = meta.row_group(meta.num_row_groups // 2)
    chunk = next(group.column(c) for c in range(group.num_columns)
                 if group.column(c).path_in_schema == "volume")
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return start + int(where * (chunk.total_compressed_size - 1))


def flip_digit(path: Path) -> int:
    """Change the last digit of the last number in ``path`` (a content change that stays valid
    JSON: the hardest damage to notice); return its offset."""
    data = bytearray(path.read_bytes())
    digits = [m.start(1) for m in re.finditer(rb'": ?-?[0-9.]*([0-9])', bytes(data))]
    offset = digits[-1]
    data[offset] = ord("0") + (data[offset] - ord("0") + 1) % 10
    path.write_bytes(bytes(data))
    return offset
