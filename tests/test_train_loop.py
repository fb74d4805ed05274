"""In-process training loop: both stages on tiny volumes, checkpoints, NaN handling,
determinism and resume, bad inputs, and out-of-fold cross-fitting."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rankcore.errors import InputError, TrainingError
from rankcore.models import BackboneConfig, CorrectionRegressor
from rankcore.train import (
    SubjectData,
    TrainConfig,
    cross_fit_stage1,
    encode_sex,
    evaluate,
    load_stage_model,
    predict,
    stratified_folds,
    synthetic_subjects,
    train_stage,
)
from rankcore.train.predict import flip_lr

SHAPE = (16, 20, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort():
    # Building the first optimizer in a process imports torch._dynamo (seconds); pay it here
    # so that test durations show the training itself.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    return synthetic_subjects(48, SHAPE, seed=0), synthetic_subjects(16, SHAPE, seed=1)


def _cfg(**kw) -> TrainConfig:
    # bn_refresh 0: the NaN tests below count the training data's batch reads
    base = {"epochs": 4, "batch_size": 8, "lr": 3e-3, "device": "cpu", "seed": 0,
            "bn_refresh": 0}
    base.update(kw)
    return TrainConfig.from_dict(base)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---- config and data ------------------------------------------------------------------------

def test_config_round_trip_and_validation():
    cfg = _cfg(lr_schedule="plateau", backbone=BackboneConfig(growth=(4, 8)).to_dict(),
               cascade={"bin_width": 5.0})
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="unknown"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(InputError, match="`lr`"):
        TrainConfig(lr=0)
    with pytest.raises(InputError, match="`sorter`"):
        TrainConfig(rank_loss="sorter")
    with pytest.raises(InputError, match="`flip`"):
        TrainConfig.from_dict({"flip": "False"})  # no truthy strings


def test_sex_encoding_and_stratified_folds():
    np.testing.assert_array_equal(encode_sex(["M", "f", "n/a", None], 4), [1, -1, 0, 0])
    with pytest.raises(InputError):
        encode_sex([2.0, 0.0], 2)
    ages = np.random.default_rng(0).uniform(20, 80, 53)
    folds = stratified_folds(ages, 5, seed=0)
    counts = np.bincount(folds)
    assert counts.max() - counts.min() <= 1
    # stratified: each fold's mean age is close to the overall mean
    means = [ages[folds == f].mean() for f in range(5)]
    assert max(abs(m - ages.mean()) for m in means) < 4.0
    np.testing.assert_array_equal(folds, stratified_folds(ages, 5, seed=0))


def test_flip_is_left_right_and_tta_averages(cohort):
    train, _ = cohort
    x = train.batch(np.arange(2))["image"]
    torch.testing.assert_close(flip_lr(x)[:, :, 0], x[:, :, -1])
    which = torch.tensor([True, False])
    torch.testing.assert_close(flip_lr(x, which)[1], x[1])
    torch.manual_seed(0)
    model = CorrectionRegressor(BackboneConfig(growth=(4, 4))).eval()
    data = train.subset(np.arange(6)).with_stage1(np.full(6, 40.0))
    mirrored = SubjectData.from_tensors(flip_lr(data.batch(np.arange(6))["image"]), data.ages,
                                        sex=data.sex, stage1=data.stage1)
    both = predict(model, data, flip_tta=True)
    np.testing.assert_allclose(both, 0.5 * (predict(model, data) + predict(model, mirrored)),
                               rtol=1e-5)


def test_schedule_and_early_stopping():
    from rankcore.train.schedule import Progress

    cos = _cfg(epochs=4, lr=1.0)
    p = Progress.start(cos)
    assert [p.lr_at(cos, e) for e in range(4)] == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    plat = _cfg(lr=1.0, lr_schedule="plateau", plateau_patience=1, early_stopping=3)
    p = Progress.start(plat)
    for epoch, mae in enumerate([5.0, 4.0, 4.5, 4.2, 4.1]):
        p.update(plat, epoch, mae)
    # best 4.0 at epoch 1; 3 epochs without improvement: lr cut once (after 2 bad), then stop
    assert (p.best_epoch, p.bad_epochs, p.lr) == (1, 3, 0.5)
    assert p.should_stop(plat, has_val=True) and not p.should_stop(plat, has_val=False)
    assert Progress.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_predict_covers_each_subject_once_without_padding(cohort):
    train, _ = cohort
    torch.manual_seed(0)
    from rankcore.models import AgeRegressor

    model = AgeRegressor(BackboneConfig(growth=(4, 4))).eval()
    data = train.subset(np.arange(5))
    batched = predict(model, data, batch_size=2)
    single = np.concatenate([predict(model, data, indices=[i]) for i in range(5)])
    assert batched.shape == (5,)
    np.testing.assert_allclose(batched, single, rtol=1e-5)


# ---- stage 1 and stage 2 --------------------------------------------------------------------

def test_stage1_learns_and_checkpoints(cohort, tmp_path, caplog):
    train, val = cohort
    with caplog.at_level(logging.INFO, logger="rankcore.train"):
        res = train_stage(1, _cfg(epochs=5), train, val, out_dir=tmp_path / "s1")
    assert res.history[0]["epoch"] == -1  # the prior alone, scored before training
    h = res.history[1:]
    assert [e["epoch"] for e in h] == [0, 1, 2, 3, 4]
    assert h[-1]["train_total"] < h[0]["train_total"]
    assert min(e["val_mae"] for e in h) < evaluate(np.full(len(val), train.ages.mean()),
                                                   val.ages)["mae"]
    assert {"train_regression", "train_rank", "train_diff", "val_srcc"} <= set(h[0])
    lines = [r.getMessage() for r in caplog.records if r.name == "rankcore.train"]
    assert sum("val MAE" in m and "SRCC" in m for m in lines) == 6
    # final files: weights equal the returned model's, card says what was trained
    out = tmp_path / "s1"
    state = load_file(str(out / "model.safetensors"))
    assert _states_equal(state, res.model.state_dict())
    card = json.loads((out / "card.json").read_text())
    assert card["best_epoch"] == res.best_epoch == \
        int(np.argmin([e["val_mae"] for e in res.history])) - 1
    assert card["rank_convention"] == "ascending_fractional" and "torch" in card["versions"]
    assert card["train_config"] == _cfg(epochs=5).to_dict() and len(card["history"]) == 6
    # only the latest epoch folder survives (with the best weights when they differ)
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-0004"]
    assert (out / "epoch-0004" / "best.safetensors").exists() == (res.best_epoch != 4)
    assert json.loads((out / "latest.json").read_text())["epoch"] == 4
    assert not list(out.glob(".*tmp"))
    model, _ = load_stage_model(out)
    np.testing.assert_array_equal(predict(model, val), predict(res.model, val))


def test_stage2_trains_on_stage1_estimates(cohort, tmp_path):
    train, val = cohort
    rng = np.random.default_rng(0)
    s1_train = train.ages + rng.normal(0, 6, len(train))
    s1_val = val.ages + rng.normal(0, 6, len(val))
    cfg = _cfg(epochs=3, cascade={"max_correction": 8.0})
    res = train_stage(2, cfg, train.with_stage1(s1_train), val.with_stage1(s1_val),
                      out_dir=tmp_path / "s2")
    assert isinstance(res.model, CorrectionRegressor)
    assert res.history[0]["epoch"] == -1  # stage 1 as it is, scored before training
    assert res.history[-1]["train_total"] < res.history[1]["train_total"]
    final = predict(res.model, val.with_stage1(s1_val))
    assert np.all(np.abs(final - s1_val) <= 8.0)
    assert np.std(final - s1_val) > 1e-3  # corrections differ between subjects
    with pytest.raises(InputError, match="stage-1 estimates"):
        train_stage(2, cfg, train, val, out_dir=tmp_path / "s2b")
    assert not (tmp_path / "s2b").exists()


def test_learned_sorter_surrogate(cohort, tmp_path):
    from rankcore.sorters import build_sorter, save_sorter

    torch.manual_seed(0)
    path = tmp_path / "gru.safetensors"
    save_sorter(path, build_sorter("gru"), {})
    res = train_stage(1, _cfg(epochs=1, rank_loss="sorter", sorter=str(path)), *cohort,
                      out_dir=tmp_path / "s1")
    assert np.isfinite(res.history[-1]["train_rank"]) and res.history[-1]["train_rank"] > 0
    assert res.card["rank_convention"] == "sodeep_desc_norm"


# ---- failures -------------------------------------------------------------------------------

class _PoisonedData(SubjectData):
    """Serves NaN images once ``poison_after`` training batches have been read (a real data
    fault); the reads before training (the prior fit on training data, the scoring of the
    prior alone as epoch -1 on validation data) are not counted."""

    def __init__(self, base: SubjectData, poison_after: int, training: bool = True):
        super().__init__(base._source, base._rows, base.ages, base.sex, base.participant_ids,
                         base.sites, base.stage1)
        prior_reads = math.ceil(len(base) / _cfg().eval_batch_size)
        self.calls, self.poison_after = 0, poison_after + prior_reads

    def batch(self, indices, device="cpu", model=None):
        out = super().batch(indices, device, model)
        self.calls += 1
        if self.calls > self.poison_after:
            out["image"] = torch.full_like(out["image"], float("nan"))
        return out


def test_nan_loss_stops_with_training_error_and_keeps_last_good_checkpoint(cohort, tmp_path):
    train, _ = cohort
    steps_per_epoch = len(train) // 8
    poisoned = _PoisonedData(train, poison_after=2 * steps_per_epoch + 1)
    out = tmp_path / "s1"
    with pytest.raises(TrainingError, match=r"epoch 3, step 2") as err:
        train_stage(1, _cfg(), poisoned, None, out_dir=out)
    assert "epoch-0001" in str(err.value)
    assert json.loads((out / "latest.json").read_text())["epoch"] == 1
    assert not (out / "card.json").exists() and not (out / "model.safetensors").exists()
    model, card = load_stage_model(out / "epoch-0001")
    assert card["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_validation_predictions_stop_with_training_error(cohort, tmp_path):
    """Finite training, non-finite validation predictions (a fault in the val data only)."""
    train, val = cohort
    out = tmp_path / "s1"
    with pytest.raises(TrainingError, match=r"validation predictions.*epoch 2") as err:
        train_stage(1, _cfg(), train, _PoisonedData(val, poison_after=1, training=False),
                    out_dir=out)
    assert "epoch-0000" in str(err.value)  # the last good checkpoint is named
    assert json.loads((out / "latest.json").read_text())["epoch"] == 0
    assert not (out / "card.json").exists() and not (out / "model.safetensors").exists()


def test_nan_in_first_epoch_leaves_nothing(cohort, tmp_path):
    train, _ = cohort
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        train_stage(1, _cfg(), _PoisonedData(train, 0), None, out_dir=tmp_path / "s1")
    assert not (tmp_path / "s1").exists()


def test_bad_inputs_give_one_clear_error_and_write_nothing(cohort, tmp_path):
    train, val = cohort
    out = tmp_path / "out"
    few = train.subset(np.arange(5))
    with pytest.raises(InputError, match="at least one full batch"):
        train_stage(1, _cfg(), few, val, out_dir=out)
    no_ages = SubjectData.from_tensors(torch.zeros(10, *SHAPE), np.full(10, np.nan))
    with pytest.raises(InputError, match="no ages"):
        train_stage(1, _cfg(), no_ages, None, out_dir=out)
    some_missing = train.subset(np.arange(12))
    some_missing.ages[3] = np.nan
    with pytest.raises(InputError, match="without an age"):
        train_stage(1, _cfg(), some_missing, None, out_dir=out)
    with pytest.raises(InputError, match="shipped sorter"):
        train_stage(1, _cfg(rank_loss="sorter", sorter="no-such-sorter"), train, val,
                    out_dir=out)
    with pytest.raises(InputError, match="images"):
        train_stage(1, _cfg(), {"ages": train.ages}, None, out_dir=out)
    assert not out.exists()
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        train_stage(1, _cfg(), train, val, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_fixed_length_sorter_must_match_batch(cohort, tmp_path):
    from rankcore.sorters import build_sorter, save_sorter

    path = tmp_path / "lstm12.safetensors"
    save_sorter(path, build_sorter("lstm", seq_len=12), {})
    with pytest.raises(InputError, match="batch_size"):
        train_stage(1, _cfg(rank_loss="sorter", sorter=str(path)), *cohort,
                    out_dir=tmp_path / "s1")
    assert not (tmp_path / "s1").exists()


# ---- determinism and resume -----------------------------------------------------------------

def test_two_runs_with_one_seed_give_identical_weights(cohort, tmp_path):
    train, val = cohort
    a = train_stage(1, _cfg(epochs=2), train, val, out_dir=tmp_path / "a")
    b = train_stage(1, _cfg(epochs=2), train, val, out_dir=tmp_path / "b")
    c = train_stage(1, _cfg(epochs=2, seed=1), train, val, out_dir=tmp_path / "c")
    assert _states_equal(a.model.state_dict(), b.model.state_dict())
    assert not _states_equal(a.model.state_dict(), c.model.state_dict())
    assert [e["val_mae"] for e in a.history] == [e["val_mae"] for e in b.history]


def test_resume_continues_exactly(cohort, tmp_path):
    train, val = cohort
    cfg = _cfg(epochs=3, lr_schedule="plateau", plateau_patience=0)
    full = train_stage(1, cfg, train, val, out_dir=tmp_path / "full")

    def crash_after_second_epoch(metrics, path):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt  # stands for a killed worker

    with pytest.raises(KeyboardInterrupt):
        train_stage(1, cfg, train, val, out_dir=tmp_path / "cut", report=crash_after_second_epoch)
    assert not (tmp_path / "cut" / "card.json").exists()
    resumed = train_stage(1, cfg, train, val, out_dir=tmp_path / "cut", resume=True)
    assert [e["epoch"] for e in resumed.history] == [-1, 0, 1, 2]
    assert resumed.card["resumes"] == [1] and full.card["resumes"] == []
    assert _states_equal(full.model.state_dict(), resumed.model.state_dict())
    # resuming a finished stage loads it instead of training again
    again = train_stage(1, cfg, train, val, out_dir=tmp_path / "cut", resume=True)
    assert _states_equal(again.model.state_dict(), resumed.model.state_dict())


# ---- cross-fitting --------------------------------------------------------------------------

def test_out_of_fold_predictions_never_see_their_own_fold(cohort, tmp_path):
    train, val = cohort
    cf = cross_fit_stage1(_cfg(epochs=1), train, val, k=3, out_dir=tmp_path / "cf")
    assert cf.predictions.shape == (len(train),) and np.isfinite(cf.predictions).all()
    ids = np.asarray(train.participant_ids)
    for f, fold_dir in enumerate(cf.fold_dirs):
        held = np.flatnonzero(cf.folds == f)
        model, card = load_stage_model(fold_dir)
        trained_on = set(card["train_ids"])
        assert trained_on.isdisjoint(ids[held])
        assert trained_on == set(ids[cf.folds != f])
        np.testing.assert_allclose(cf.predictions[held],
                                   predict(model, train, indices=held), rtol=1e-6)
    table = (tmp_path / "cf" / "oof.csv").read_text().splitlines()
    assert table[0] == "participant_id,fold,stage1_oof" and len(table) == len(train) + 1
    with pytest.raises(InputError, match="fewer than batch_size"):
        cross_fit_stage1(_cfg(batch_size=16), train.subset(np.arange(20)), k=3,
                         out_dir=tmp_path / "cf2")
    assert not (tmp_path / "cf2").exists()


# ---- the multi-worker code path, on a one-process gloo group ---------------------------------

def test_world_of_one_matches_single_process(cohort, tmp_path):
    """The world path (DDP + differentiable all-gather) gives the in-process result exactly."""
    import torch.distributed as dist

    from rankcore.train.dist import TorchDistWorld

    train, val = cohort
    plain = train_stage(1, _cfg(epochs=2), train, val, out_dir=tmp_path / "plain")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = TorchDistWorld()
        res = train_stage(1, _cfg(epochs=2), train, val, out_dir=tmp_path / "world", world=world)
    finally:
        dist.destroy_process_group()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(res.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert res.card["world_size"] == 1


# ---- the Parquet cache as input -------------------------------------------------------------

def test_cache_volume_dataset_feeds_the_loop(tmp_path):
    """Real NIfTI files -> ingest -> VolumeDataset -> SubjectData (preloaded and lazy) -> train."""
    import nibabel as nib

    from rankcore.cache import VolumeDataset, ingest_cohort
    from rankcore.mri.types import Cohort, CohortRow, PreprocessConfig

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        vol = np.zeros((30, 34, 26), np.float32)
        r = 4 + i // 2
        vol[15 - r:15 + r, 17 - r:17 + r, 13 - r:13 + r] = 100.0
        vol += rng.normal(0, 3, vol.shape).astype(np.float32)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-30.0, -34.0, -26.0]
        path = src / f"sub-{i:02d}_T1w.nii.gz"
        nib.save(nib.Nifti1Image(vol, affine), path)
        rows.append(CohortRow(f"sub-{i:02d}", path, age=20.0 + 7 * i, sex="F" if i % 2 else "M",
                              site="a", split="train"))
    cache = tmp_path / "cache"
    ingest_cohort(Cohort(src, "manifest", tuple(rows)), cache,
                  PreprocessConfig(spacing=4.0, shape=(12, 14, 10), max_voxels=50_000,
                                   tissue=False))  # box phantoms: no tissue to classify
    ds = VolumeDataset(cache, split="train")
    eager, lazy = SubjectData.from_dataset(ds), SubjectData.from_dataset(ds, preload=False)
    assert eager.participant_ids == lazy.participant_ids == tuple(ds.keys)
    np.testing.assert_array_equal(eager.sex, [1, -1] * 4)
    np.testing.assert_allclose(eager.ages, ds.ages)
    idx = np.array([5, 0, 3])
    b_eager, b_lazy = eager.batch(idx), lazy.batch(idx)
    assert b_eager["image"].shape == (3, 1, 12, 14, 10) and b_eager["image"].dtype == torch.float32
    torch.testing.assert_close(b_lazy["image"], torch.stack([ds[i]["image"] for i in idx]))
    torch.testing.assert_close(b_eager["image"], b_lazy["image"], rtol=1e-3, atol=1e-3)
    res = train_stage(1, _cfg(epochs=1, batch_size=4), ds, None, out_dir=tmp_path / "s1")
    assert res.card["train_ids"] == ds.keys and np.isfinite(res.history[0]["train_total"])


@pytest.mark.gpu
def test_cuda_bf16_training(cohort, tmp_path):
    train, val = cohort
    res = train_stage(1, _cfg(epochs=1, device="cuda", amp=True), train, val,
                      out_dir=tmp_path / "s1")
    assert next(res.model.parameters()).device.type == "cuda"
    assert np.isfinite(res.history[0]["train_total"]) and np.isfinite(res.history[0]["val_mae"])
    assert np.isfinite(predict(res.model, val, flip_tta=True, amp=True)).all()
