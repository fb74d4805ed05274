"""The QC page in a real headless browser (Chromium): `brainrank evaluate` writes qc.html, the
page renders a non-blank screenshot with the montages, and it requests no external URL (every
network request of the browser goes through a recording proxy, and the page adds no host
to those the browser contacts for a blank page; a control page with an external image shows
that the proxy would see one)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import socket
import subprocess
import threading
from urllib.parse import urlsplit

import numpy as np
import pytest
from _tiny_cohort import ingest_manifest, write_manifest

from flows.cli import main

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("the QC test needs Chromium: `make test` installs it (apt-get install chromium)")


class _Proxy:
    """A TCP listener that records the first line of every request sent to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    first = "?"
                self.requests.append(first)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def _hosts(requests: list[str]) -> set[str]:
    """Hosts named by proxy request lines ("GET http://h/..." or "CONNECT h:443 ...")."""
    out = set()
    for line in requests:
        parts = line.split()
        if len(parts) >= 2:
            target = parts[1]
            out.add(urlsplit(target).hostname if "://" in target else target.split(":")[0])
    return out


def _page_hosts(page, png, home) -> set[str]:
    """Hosts the browser contacts while rendering ``page`` (its own services included)."""
    proxy = _Proxy()
    try:
        _screenshot(page, png, proxy, home)
    finally:
        proxy.close()
    return _hosts(proxy.requests)


def _screenshot(page, png, proxy: _Proxy, home) -> None:
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-background-networking", "--disable-sync",
           "--disable-component-update", "--disable-default-apps", "--disable-extensions",
           f"--proxy-server=http://127.0.0.1:{proxy.port}", "--proxy-bypass-list=<-loopback>",
           f"--user-data-dir={home}", "--window-size=1200,1600", f"--screenshot={png}",
           page.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), out.stderr[-2000:]


def test_qc_page_renders_in_a_headless_browser_without_external_requests(
        prefect_server, tmp_path, capsys):
    from matplotlib.image import imread

    manifest = write_manifest(tmp_path / "cohort", 16)
    with open(manifest, "a") as fh:  # one broken file: the quarantine table has a row
        fh.write("sub-bad,bad.nii.gz,50,F,a\n")
    (tmp_path / "cohort" / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08 broken")
    cache, model, report = tmp_path / "cache", tmp_path / "model", tmp_path / "report"
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"options": {"backbone": {"growth": [4, 4]}, "num_threads": 1}}))
    ingest_manifest(manifest, cache)
    assert main(["train", str(cache), "--out", str(model), "--epochs", "1", "--batch-size", "4",
                 "--rank-loss", "none", "--config", str(cfg)]) == 0
    assert main(["evaluate", str(model), str(cache), "--out", str(report), "--n-boot",
                 "0"]) == 0
    capsys.readouterr()

    page = report / "qc.html"
    text = page.read_text()
    with open(report / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert text.count("<figure>") == len(preds) >= 2
    gaps = {r["participant_id"]: abs(float(r["brain_age_gap"])) for r in preds}
    order = sorted(gaps, key=lambda k: text.index(f"alt='{k}'"))
    assert [gaps[k] for k in order] == sorted(gaps.values(), reverse=True)
    assert "sub-bad" in text and "unreadable" in text
    # the embedded images' base64 text may spell "http" by chance: look outside it
    bare = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", text).lower()
    assert "http" not in bare and "<script" not in bare
    assert "qc.html" in (report / "report.html").read_text()

    # Chromium calls its own services (time, updates) whatever the page: a blank local page
    # gives that baseline, and the QC page must not add any host to it.
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    baseline = _page_hosts(blank, tmp_path / "blank.png", tmp_path / "b0")
    png = tmp_path / "qc.png"
    assert _page_hosts(page, png, tmp_path / "b1") <= baseline  # no external URL requested
    shot = imread(png)[..., :3]
    assert shot.shape[0] >= 1000 and shot.std() > 0.05  # not blank
    red = (shot[..., 0] > 0.8) & (shot[..., 1] < 0.35) & (shot[..., 2] < 0.35)
    assert red.sum() > 50  # the mask outlines of the montages were drawn

    control = tmp_path / "control.html"
    control.write_text("<html><body><img src='http://qc-control.invalid/x.png'></body></html>")
    assert "qc-control.invalid" in _page_hosts(control, tmp_path / "control.png",
                                               tmp_path / "b2") - baseline
    assert np.isfinite(float(preds[0]["predicted_age"]))
