"""Ray Train storage anywhere: URIs reach Ray intact, a file:// URI works end to end, and the
workers and prediction tasks read their own rows from the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankcore.errors import InputError
from rankcore.train.storage import is_uri, join_storage, storage_location


def test_storage_location_keeps_uris_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://bucket/runs", "gs://b/x/", "file:///data/ray"):
        assert is_uri(uri) and storage_location(uri) == uri
    assert not is_uri("runs/s3:/x") and not is_uri("/data/ray")
    assert storage_location("runs") == str(tmp_path / "runs")
    assert join_storage("s3://bucket/runs/", "cascade-1") == "s3://bucket/runs/cascade-1"
    assert join_storage("runs", "cascade-1") == str(tmp_path / "runs" / "cascade-1")
    with pytest.raises(InputError, match="`storage_path` must be"):
        storage_location("")


@pytest.mark.ray
def test_s3_storage_path_reaches_ray_train_intact(tmp_path):
    """What Ray receives: RunConfig.storage_path is the URI itself (no S3 needed)."""
    from rankcore.train.ray_train import build_trainer

    trainer = build_trainer({}, num_workers=2, use_gpu=False,
                            storage_path="s3://bucket/brainrank/ray", name="stage1")
    assert trainer.run_config.storage_path == "s3://bucket/brainrank/ray"
    local = build_trainer({}, num_workers=1, use_gpu=False, storage_path=Path("rel"),
                          name="x")
    assert local.run_config.storage_path == str(Path("rel").absolute())


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from _tiny_cohort import make_cache

    return make_cache(tmp_path_factory.mktemp("cohort"), 20)


@pytest.mark.slow
@pytest.mark.ray
def test_file_uri_storage_and_worker_reads_end_to_end(ray_cluster, tiny_cache, tmp_path):
    """Training from a CacheSplit with a file:// storage URI; Ray keeps the checkpoints
    there; predictions as Ray tasks equal in-process predictions of the same weights."""
    from rankcore.cache import VolumeDataset
    from rankcore.train import TrainConfig, predict
    from rankcore.train.cache_split import CacheSplit
    from rankcore.train.ray_predict import predict_ray
    from rankcore.train.ray_train import train_stage_ray

    keys = tuple(VolumeDataset(tiny_cache).keys)
    train = CacheSplit(str(tiny_cache), keys=keys[:16], preload=False)
    val = CacheSplit(str(tiny_cache), keys=keys[16:], preload=False)
    config = TrainConfig.from_dict({"epochs": 1, "batch_size": 4, "device": "cpu",
                                    "num_threads": 1, "backbone": {"growth": [4, 8]}})
    store = tmp_path / "store"
    res = train_stage_ray(1, config, train, val, out_dir=tmp_path / "s1", num_workers=2,
                          storage_path=f"file://{store}", name="uri-run")
    assert res.card["world_size"] == 2 and np.isfinite(res.history[-1]["val_mae"])
    assert (store / "uri-run").is_dir()  # Ray wrote its run state through the URI
    assert not (Path.cwd() / "file:").exists()
    got = predict_ray([tmp_path / "s1"], CacheSplit(str(tiny_cache), keys=keys), workers=2,
                      chunk_size=6)[0]
    want = predict(res.model, CacheSplit(str(tiny_cache), keys=keys).load(preload=False),
                   batch_size=4)
    assert got.shape == (20,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="`keys` must name rows"):
        predict_ray([tmp_path / "s1"], CacheSplit(str(tiny_cache), keys=("sub-nope",)))


@pytest.mark.slow
@pytest.mark.ray
def test_predict_cohort_on_ray_equals_local(ray_cluster, tiny_cache, tmp_path):
    """``predict_cohort(engine="ray")``: the cascade runs as Ray tasks reading the cache; the
    ages equal those of the in-process prediction."""
    import csv

    import pyarrow.parquet as pq

    from rankcore.inference import predict_cohort
    from rankcore.train.cascade import train_cascade

    model = train_cascade(tiny_cache, tmp_path / "model",
                          {"epochs": 1, "batch_size": 4, "backbone": {"growth": [4, 8]}},
                          k_folds=2, val_fraction=0.2, stage2_source="insample").model_dir
    src = tiny_cache.parent / "src"
    manifest = tmp_path / "cohort" / "manifest.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["participant_id", "path"])
        for i, path in enumerate(sorted(src.glob("sub-*_T1w.nii.gz"))[:10]):
            w.writerow([f"sub-{i:02d}", str(path)])
    out = {}
    for engine in ("local", "ray"):
        summary = predict_cohort(model, manifest, tmp_path / f"{engine}.parquet",
                                 engine=engine, workers=2, allow_outside_root=True)
        assert summary.predicted == 10
        out[engine] = pq.read_table(summary.out_file).to_pydict()
    assert out["ray"]["participant_id"] == out["local"]["participant_id"]
    np.testing.assert_allclose(out["ray"]["predicted_age"], out["local"]["predicted_age"],
                               rtol=0, atol=1e-4)
    np.testing.assert_allclose(out["ray"]["stage1_age"], out["local"]["stage1_age"],
                               rtol=0, atol=1e-4)
