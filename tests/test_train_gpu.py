"""CUDA paths of training: bf16 autocast in train_stage, GPU runs compared with the CPU fp32
result, the cascade with use_gpu, Ray GPU workers, and the NCCL all-gather on a one-process
group. Skipped on hosts without CUDA (marker ``gpu``); tests that need nibabel, matplotlib or
Ray skip where those are missing (benchmarks/gpu_check.sh runs them on a bare GPU host)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankcore.train import TrainConfig, predict, synthetic_subjects, train_stage

pytestmark = pytest.mark.gpu

SHAPE = (16, 20, 16)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "device": "cuda", "seed": 0,
            "backbone": {"growth": [4, 8]}}
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def cohort():
    return synthetic_subjects(32, SHAPE, seed=0), synthetic_subjects(8, SHAPE, seed=1)


def test_bf16_autocast_runs_the_convolutions_in_bf16(cohort, tmp_path):
    from torch.nn.modules.module import register_module_forward_hook

    train, val = cohort
    seen: list[torch.dtype] = []

    def spy(module, args, output):
        if isinstance(module, torch.nn.Conv3d) and module.training:
            seen.append(output.dtype)

    handle = register_module_forward_hook(spy)
    try:
        res = train_stage(1, _cfg(amp=True), train, val, out_dir=tmp_path / "amp")
    finally:
        handle.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert next(res.model.parameters()).dtype == torch.float32  # master weights stay fp32
    assert next(res.model.parameters()).device.type == "cuda"
    assert all(np.isfinite(m["train_total"]) and np.isfinite(m["val_mae"])
               for m in res.history)
    # bf16 convolutions, fp32 ages: close to fp32 inference of the same weights and not
    # rounded to bf16's grid (0.25 y steps between 32 and 64, 0.5 y above)
    fp32 = predict(res.model, val, amp=False)
    bf16 = predict(res.model, val, amp=True)
    assert _on_bf16_grid(bf16) <= 1, bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=0.1)


def _on_bf16_grid(ages: np.ndarray) -> int:
    t = torch.from_numpy(np.asarray(ages, dtype=np.float32))
    return int((t.to(torch.bfloat16).float() == t).sum())


@pytest.fixture
def strict_fp32():
    """TF32 off (cuDNN and matmul), so a GPU fp32 run is comparable with the CPU's."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_gpu_fp32_training_matches_the_cpu_run(cohort, tmp_path, strict_fp32):
    train, val = cohort
    gpu = train_stage(1, _cfg(epochs=2, amp=False), train, val, out_dir=tmp_path / "g")
    cpu = train_stage(1, _cfg(epochs=2, amp=False, device="cpu"), train, val,
                      out_dir=tmp_path / "c")
    for k, v in cpu.model.state_dict().items():
        torch.testing.assert_close(gpu.model.state_dict()[k].cpu(), v, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose([m["train_total"] for m in gpu.history],
                               [m["train_total"] for m in cpu.history], rtol=1e-3)
    # the same weights predict the same ages on both devices, to far below a bf16 step
    on_cpu = predict(cpu.model, val)
    on_gpu = predict(cpu.model.to("cuda"), val)
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=0, atol=2e-3)


def test_gpu_bf16_ages_are_close_to_cpu_fp32_and_not_rounded(cohort, tmp_path):
    train, val = cohort
    cpu = train_stage(1, _cfg(epochs=2, amp=False, device="cpu"), train, val,
                      out_dir=tmp_path / "c")
    want = predict(cpu.model, val)
    got = predict(cpu.model.to("cuda"), val, amp=True)
    assert _on_bf16_grid(got) <= 1, got
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)


def test_cascade_on_gpu(tmp_path):
    pytest.importorskip("nibabel")
    pytest.importorskip("matplotlib")
    from _tiny_cohort import make_cache

    from rankcore.train.cascade import load_cascade, train_cascade

    cache = make_cache(tmp_path / "cohort", 16)
    res = train_cascade(cache, tmp_path / "model",
                        {"epochs": 1, "batch_size": 4, "backbone": {"growth": [4, 8]}},
                        k_folds=2, val_fraction=0.2, use_gpu=True)
    assert res.card["config"]["device"] == "cuda" and res.card["use_gpu"]
    model, _ = load_cascade(res.model_dir, map_location="cuda")
    assert next(model.parameters()).device.type == "cuda"
    assert np.isfinite(res.card["metrics"]["val_cascade"]["mae"])


def test_nccl_all_gather_of_one_process(cohort, tmp_path):
    import torch.distributed as dist

    from rankcore.train.dist import TorchDistWorld

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    torch.cuda.set_device(0)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        world = TorchDistWorld()
        x = torch.arange(6.0, device="cuda", requires_grad=True)
        y = world.all_gather(x)
        assert y.device.type == "cuda"
        torch.testing.assert_close(y, x.detach())
        (y * torch.arange(6.0, device="cuda")).sum().backward()
        torch.testing.assert_close(x.grad, torch.arange(6.0, device="cuda"))
        varlen = world.all_gather_varlen(torch.ones(3, device="cuda"))
        assert varlen.shape == (3,)
        # the DDP + all-gather path trains like the single-process loop
        train, val = cohort
        with_world = train_stage(1, _cfg(epochs=1, amp=False), train, val,
                                 out_dir=tmp_path / "w", world=world)
    finally:
        dist.destroy_process_group()
    plain = train_stage(1, _cfg(epochs=1, amp=False), train, val, out_dir=tmp_path / "p")
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(with_world.model.state_dict()[k], v, rtol=1e-3, atol=1e-4)


@pytest.mark.ray
def test_ray_gpu_worker_trains_and_predicts(cohort, tmp_path):
    """``use_gpu`` on Ray: the worker checks CUDA itself and trains on its GPU; the Ray-task
    predictions run on a GPU too."""
    ray = pytest.importorskip("ray")
    from rankcore.cache.engines import ensure_ray
    from rankcore.train.ray_train import train_stage_ray

    train, val = cohort
    started = ensure_ray(num_cpus=2)
    try:
        res = train_stage_ray(1, _cfg(epochs=1, device="cpu"), train, val,
                              out_dir=tmp_path / "r", num_workers=1, use_gpu=True)
    finally:
        if started:
            ray.shutdown()
    assert res.card["train_config"]["device"] == "cuda"
    assert np.isfinite(res.history[-1]["val_mae"])
