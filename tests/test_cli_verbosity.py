"""`brainrank --version`, `-v` / `-q`, and progress bars that draw only on a terminal.

The verbosity checks run the console script as a process (each with its own temporary
Prefect server), since they are about what reaches the console.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from _tiny_cohort import make_cache, write_manifest

from rankcore.train.cascade import train_cascade

EXE = str(Path(sys.executable).with_name("brainrank"))
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_LOGGING_LEVEL="INFO")
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_version(tmp_path):
    from importlib.metadata import version

    out = _run("--version", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"brainrank {version('brainrank')}"


@pytest.mark.slow
def test_per_subject_lines_only_with_v_and_quiet_with_q(tmp_path):
    # predict preprocesses with the model's config (tissue off for these box phantoms)
    cache = make_cache(tmp_path / "train", 12)
    model = tmp_path / "model"
    train_cascade(cache, model, {"epochs": 1, "batch_size": 4, "rank_loss": "none",
                                 "num_threads": 1, "backbone": {"growth": [4, 4]}})
    manifest = write_manifest(tmp_path / "cohort", 3)
    plain = _run("predict", str(model), str(manifest), "--out", str(tmp_path / "p1.csv"),
                 cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    logs = plain.stdout + plain.stderr
    assert "predicted 3 of 3" in logs and "ingest summary" in logs
    assert "ingested sub-00" not in logs
    assert "\r" not in plain.stderr  # no progress bar off a terminal

    verbose = _run("-v", "predict", str(model), str(manifest), "--out",
                   str(tmp_path / "p2.csv"), cwd=tmp_path)
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    logs = verbose.stdout + verbose.stderr
    assert all(f"ingested sub-0{i}" in logs for i in range(3))

    quiet = _run("-q", "predict", str(model), str(manifest), "--out", str(tmp_path / "p2.csv"),
                 cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "predicted 3 of 3" in quiet.stdout  # the command's own summary still prints
    assert "INFO" not in quiet.stdout + quiet.stderr
    assert "ingest summary" not in quiet.stdout + quiet.stderr


def _bar_output(quiet: bool) -> str:
    code = ("from rankcore.progress import progress_bar, set_quiet\n"
            f"set_quiet({quiet})\n"
            "with progress_bar('ingest', 3) as bar:\n"
            "    for i in range(1, 4):\n"
            "        bar(i)\n")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=slave,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_draws_on_a_terminal_unless_quiet():
    assert "ingest:" in _bar_output(False) and "/3 [" in _bar_output(False)
    assert "ingest:" not in _bar_output(True)
