"""A two-node Ray cluster on one machine (``ray start --head`` plus ``ray start --address``,
each with its own resources and temp dir) and a cached cohort on a path both see: a stage
trained by 2 Ray Train workers, one per node, and predicted by Ray tasks equals the
single-process run on the same data and seed; `evaluate --engine ray` gives the report of the
single-process evaluation, and with `--gpu` CUDA is checked on the workers, not the driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import rankcore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(rankcore.__file__).resolve().parents[1]
CONFIG = {"epochs": 2, "batch_size": 4, "eval_batch_size": 4, "device": "cpu",
          "num_threads": 1, "seed": 3,
          # no batch-dependent layer (per-worker statistics), no dropout (per-rank masks)
          "backbone": {"growth": [4, 8], "dropout": 0.0, "feature_norm": "layer"}}

#: |ray - local| bound on every evaluated age and metric (years). Measured here: 0 (the
#: same kernels on the same rows, one intra-op thread each); the bound leaves room only for
#: float summation order on other machines, far below any real difference (~0.01 y).
TOLERANCE_Y = 1e-6

_DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    from rankcore.train.cache_split import CacheSplit
    from rankcore.train.ray_predict import predict_ray
    from rankcore.train.ray_train import train_stage_ray
    address, cache, out, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    keys = tuple(json.loads(sys.argv[5]))
    ray.init(address=address, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    res = train_stage_ray(1, config, CacheSplit(cache, keys=keys[:16], preload=False),
                          CacheSplit(cache, keys=keys[16:], preload=False), out_dir=out,
                          num_workers=2, storage_path=out + "-ray")
    pred = predict_ray([out], CacheSplit(cache, keys=keys), workers=2, chunk_size=10)[0]
    print(json.dumps({"nodes": len(nodes), "world_size": res.card["world_size"],
                      "pred": pred.tolist()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_processes(temp_dirs: list[str]) -> list[int]:
    """Pids of the Ray processes started with one of ``temp_dirs`` and their descendants."""
    from rankcore.cache.ray_reaper import descendants

    roots = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if any(d in cmd for d in temp_dirs):
                roots.append(int(name))
    return sorted(descendants(roots))


def _stop(temp_dirs: list[str]) -> None:
    """End the two nodes' processes only (``ray stop`` would end every Ray of this user)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _node_processes(temp_dirs)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _node_processes(temp_dirs)
        if not pids:
            return


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head (1 CPU, resource node_a) and a second node (1 CPU, node_b, and 1 GPU declared
    although the machine may have none: a GPU task lands there and must find CUDA itself),
    own temp dirs."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the `ray` command is missing")
    temp = [tempfile.mkdtemp(prefix="br2n-", dir="/tmp") for _ in range(2)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--port", str(port), "--num-cpus", "1", "--num-gpus", "0",
                        "--resources", '{"node_a": 1}', "--temp-dir", temp[0],
                        "--include-dashboard", "false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([str(ray_bin), "start", "--address", address, "--node-ip-address",
                        "127.0.0.1", "--num-cpus", "1", "--num-gpus", "1", "--resources",
                        '{"node_b": 1}', "--temp-dir", temp[1], "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=120)
        yield address, env
    finally:
        _stop(temp)
        leftover = _node_processes(temp)
        for d in temp:
            shutil.rmtree(d, ignore_errors=True)
        assert not leftover, f"processes of the test cluster still running: {leftover}"


def test_two_nodes_train_and_predict_like_one_process(two_node_cluster, tmp_path):
    from _tiny_cohort import make_cache

    from rankcore.cache import VolumeDataset
    from rankcore.train import predict, train_stage
    from rankcore.train.cache_split import CacheSplit

    address, env = two_node_cluster
    cache = make_cache(tmp_path / "cohort", 22)  # one path both nodes see
    keys = list(VolumeDataset(cache).keys)
    out = subprocess.run([sys.executable, "-c", _DRIVER, address, str(cache),
                          str(tmp_path / "ray-stage"), json.dumps(CONFIG), json.dumps(keys)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["nodes"] == 2 and got["world_size"] == 2

    train = CacheSplit(str(cache), keys=tuple(keys[:16])).load()
    val = CacheSplit(str(cache), keys=tuple(keys[16:])).load()
    single = train_stage(1, CONFIG, train, val, out_dir=tmp_path / "single")
    want = predict(single.model, CacheSplit(str(cache), keys=tuple(keys)).load(),
                   batch_size=4)
    np.testing.assert_allclose(got["pred"], want, rtol=0, atol=1e-3)
    assert float(np.std(want)) > 0.1  # the ages really depend on the subject


_EVAL_DRIVER = textwrap.dedent("""
    import json, sys
    from rankcore.errors import InputError
    from rankcore.report.evaluate import check_evaluation, evaluate_model
    model, cache, out = sys.argv[1:4]
    kw = {"split": "all", "n_boot": 0, "store_bias": False, "engine": "ray"}
    # This driver has no CUDA: with engine ray it need not, the workers check it.
    n = check_evaluation(model, cache, out + "-gpu", split="all", device="cuda", engine="ray",
                         workers=2)
    evaluate_model(model, cache, out, workers=2, **kw)
    try:
        evaluate_model(model, cache, out + "-gpu", workers=1, device="cuda", **kw)
        gpu = "no error"
    except InputError as exc:
        gpu = str(exc)
    print(json.dumps({"n": n, "gpu": gpu}))
""")


def _predictions(report: Path) -> dict[str, tuple[float, float]]:
    import csv

    with open(report / "predictions.csv", newline="") as fh:
        return {r["participant_id"]: (float(r["stage1_age"]), float(r["predicted_age"]))
                for r in csv.DictReader(fh)}


def test_evaluate_on_ray_workers_gives_the_single_process_report(two_node_cluster, tmp_path):
    from _tiny_cohort import make_cache

    from rankcore.report.evaluate import evaluate_model
    from rankcore.train.cascade import train_cascade

    address, env = two_node_cluster
    cache = make_cache(tmp_path / "cohort", 22)  # one path both nodes see
    model = tmp_path / "model"
    train_cascade(cache, model, {**CONFIG, "epochs": 1}, k_folds=2, test_fraction=0.2)
    local = evaluate_model(model, cache, tmp_path / "local", split="all", n_boot=0,
                           store_bias=False)
    out = subprocess.run([sys.executable, "-c", _EVAL_DRIVER, str(model), str(cache),
                          str(tmp_path / "ray")], env={**env, "RAY_ADDRESS": address},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == 22
    want, ray_rows = _predictions(tmp_path / "local"), _predictions(tmp_path / "ray")
    assert list(ray_rows) == list(want)  # every subject once, in the same order
    diff = np.abs(np.array(list(ray_rows.values())) - np.array(list(want.values())))
    print(f"largest |ray - local| age difference: {diff.max():.2e} y")
    assert diff.max() <= TOLERANCE_Y
    ray_metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    for key in ("n", "mae", "rmse", "pearson_r", "srcc", "r2", "mean_bias"):
        assert ray_metrics[key] == pytest.approx(local.metrics[key], abs=TOLERANCE_Y), key
    bc_ray, bc_local = ray_metrics["bias_corrected"], local.metrics["bias_corrected"]
    assert bc_ray["available"] and bc_ray["source"] == bc_local["source"]
    for name, value in bc_local["coefficients"].items():
        if isinstance(value, float):
            assert bc_ray["coefficients"][name] == pytest.approx(value, abs=1e-4), name
    assert float(np.std([p for _, p in want.values()])) > 0.1  # ages depend on the subject
    # --gpu: the driver did not check CUDA; the task on node_b did, and says so in one line
    # when that node has none.
    import torch

    if torch.cuda.is_available():
        assert got["gpu"] == "no error"
    else:
        assert "`use_gpu` needs CUDA on every worker" in got["gpu"], got["gpu"]
        assert "\n" not in got["gpu"]
