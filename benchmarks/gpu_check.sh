#!/usr/bin/env bash
# One prepared check for a lent GPU host, in at most ~8 minutes:
#   1. the GPU tests (tests/test_train_gpu.py, marker gpu) and the autocast fp32 tests
#      (tests/test_amp_fp32.py); tests that need nibabel, matplotlib or Ray skip cleanly;
#   2. a 1 mm training benchmark of the per-worker loop in-process (train_stage on CUDA,
#      default backbone, synthetic subjects at (160, 192, 160)): samples/s and peak GPU
#      memory in fp32 and in bf16 autocast, and how far bf16 ages are from fp32 ones.
# Needs torch with CUDA, numpy, scipy, pyarrow, safetensors, pytest, hypothesis; run from
# anywhere: bash benchmarks/gpu_check.sh   (results also in $OUT, default runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
OUT="${OUT:-$PWD/runs/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
status=0

"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== GPU tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_train_gpu.py \
    tests/test_amp_fp32.py 2>&1 | tee "$OUT/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 1 mm training benchmark"
timeout 240 "$PY" - <<'PY' 2>&1 | tee "$OUT/bench_1mm.txt"
import tempfile
import time

import numpy as np
import torch

from rankcore.train import TrainConfig, predict, synthetic_subjects, train_stage

if not torch.cuda.is_available():
    raise SystemExit("no CUDA: nothing to benchmark")
shape, n = (160, 192, 160), 48
t0 = time.perf_counter()
train = synthetic_subjects(n, shape, seed=0)
val = synthetic_subjects(16, shape, seed=1)
print(f"{n} + 16 synthetic subjects at {shape} made in {time.perf_counter() - t0:.0f} s")
rows, ages = [], {}
for amp in (False, True):
    torch.cuda.reset_peak_memory_stats()
    config = TrainConfig.from_dict({"epochs": 3, "batch_size": 8, "eval_batch_size": 8,
                                    "device": "cuda", "amp": amp, "seed": 0})
    with tempfile.TemporaryDirectory() as tmp:
        res = train_stage(1, config, train, val, out_dir=tmp)
    steady = [m["samples_per_s"] for m in res.history if m.get("epoch", 0) >= 1]
    peak = torch.cuda.max_memory_allocated() / 2**30
    ages[amp] = predict(res.model, val, amp=amp, batch_size=8)
    rows.append((("bf16" if amp else "fp32"), float(np.median(steady)), peak,
                 res.history[-1]["val_mae"]))
print(f"{'precision':>9} {'samples/s':>10} {'peak GiB':>9} {'val MAE':>8}")
for name, sps, peak, mae in rows:
    print(f"{name:>9} {sps:10.1f} {peak:9.2f} {mae:8.2f}")
a = torch.from_numpy(ages[True].astype(np.float32))
on_grid = int((a.to(torch.bfloat16).float() == a).sum())
print(f"bf16 ages on bf16's grid: {on_grid} of {len(a)} (fp32 ages: ~0 expected)")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: exit $status (files in $OUT)"
exit $status
