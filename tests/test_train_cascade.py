"""The whole cascade from a real (tiny) Parquet cache: split, out-of-fold stage 1, stage 2,
the model folder and its card, reuse, atomicity, resume after a NaN, and bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _tiny_cohort import PREPROCESS, make_cache
from safetensors.torch import load_file

from rankcore.cache import open_cache
from rankcore.errors import InputError, SorterLengthError, TrainingError
from rankcore.train import SubjectData, load_stage_model, predict
from rankcore.train.cascade import load_cascade, train_cascade
from rankcore.train.cascade_plan import default_config, plan_cascade
from rankcore.train.split import cache_data_digest, stratified_split, training_split

CFG = {"epochs": 2, "batch_size": 4, "lr": 3e-3, "backbone": {"growth": [4, 8]}}
#: Cross-fitted stage 2 (the GPU default; CPU runs default to stage2_source="off").
OOF = {"k_folds": 2, "val_fraction": 0.2, "stage2_source": "oof"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cohort"), 20)


def _staging(model_dir):
    return sorted(model_dir.parent.glob(f"{model_dir.name}.tmp-*"))


def _states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- split and digest -----------------------------------------------------------------------

def test_split_follows_cache_labels_and_carves_a_stratified_val():
    keys = [f"s{i}" for i in range(8)]
    ages = [20, 30, np.nan, 40, 50, 60, 70, 80]
    labels = ["train", "val", "train", "test", None, "train", "val", "holdout"]
    s = training_split(keys, ages, ["a"] * 8, labels, val_fraction=0.2, seed=0)
    assert (s.train, s.val, s.source) == (("s0", "s4", "s5"), ("s1", "s6"), "cache")
    assert s.excluded == {"no_age": 1, "split:holdout": 1, "split:test": 1}
    # without val labels: carved from train + unlabelled, reproducibly, never from test
    labels = ["train", None, "train", "test", None, "train", None, "train"]
    ages = np.arange(8) * 5.0 + 20
    a = training_split(keys, ages, list("aabbaabb"), labels, val_fraction=0.5, seed=3)
    b = training_split(keys, ages, list("aabbaabb"), labels, val_fraction=0.5, seed=3)
    assert a == b and a.source == "cache+stratified" and "s3" not in a.train + a.val
    assert set(a.train).isdisjoint(a.val) and len(a.train) + len(a.val) == 7
    with pytest.raises(InputError, match="no ages"):
        training_split(keys[:2], [np.nan, np.nan], ["a", "a"], [None, None],
                       val_fraction=0.1, seed=0)
    with pytest.raises(InputError, match="holds no subjects"):
        training_split([], [], [], [], val_fraction=0.1, seed=0)


def test_stratified_split_takes_each_site_across_its_age_range():
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 400)
    sites = np.array(["a"] * 300 + ["b"] * 100)
    val = stratified_split(ages, sites, 0.1, seed=1)
    assert 36 <= val.sum() <= 44
    assert 25 <= val[:300].sum() <= 33 and 8 <= val[300:].sum() <= 12
    # every age decile of site a gives validation subjects
    edges = np.quantile(ages[:300], np.linspace(0, 1, 11))
    counts = np.histogram(ages[:300][val[:300]], edges)[0]
    assert counts.min() >= 1
    np.testing.assert_array_equal(val, stratified_split(ages, sites, 0.1, seed=1))
    assert stratified_split(ages[:5], sites[:5], 0.1, seed=0).sum() == 2  # at least two
    with pytest.raises(InputError, match="val_fraction"):
        stratified_split(ages, sites, 0.7, seed=0)


def test_data_digest_changes_with_labels_not_with_row_layout(cache):
    view = open_cache(cache)
    cols = {c: view.table.column(c).to_pylist() for c in
            ("key", "age", "sex", "site", "split", "source_digest", "preproc_digest")}
    d0 = cache_data_digest(view.layout.digest, cols)
    assert d0 == cache_data_digest(view.layout.digest, {k: list(v) for k, v in cols.items()})
    cols["age"] = [cols["age"][0] + 1, *cols["age"][1:]]
    assert cache_data_digest(view.layout.digest, cols) != d0


# ---- the cascade ------------------------------------------------------------------------------

def test_cascade_writes_a_complete_model_folder_and_reuses_it(cache, tmp_path, caplog):
    model_dir = tmp_path / "model"
    events = []
    res = train_cascade(cache, model_dir, CFG, **OOF,
                        progress=events.append)
    assert not res.reused and res.model_dir == model_dir.absolute()
    assert not _staging(model_dir)
    names = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()}
    assert {"card.json", "training_curves.png", "stage1/model.safetensors",
            "stage2/model.safetensors", "crossfit/fold-0/model.safetensors"} <= names
    records = tmp_path / "model.records"  # per-subject records: next to, not in, the model
    assert not any(n.endswith(".csv") for n in names)
    assert {"split.json", "crossfit/oof.csv", "crossfit/fold-1/heldout.csv",
            "stage2/predictions.csv", "stage2/ids.json"} <= \
        {str(p.relative_to(records)) for p in records.rglob("*") if p.is_file()}
    assert not any("epoch-" in n or "latest.json" in n or ".tmp" in n for n in names)
    assert (model_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    card = json.loads((model_dir / "card.json").read_text())
    plan = plan_cascade(cache, tmp_path / "other", CFG, **OOF)
    assert card["data"]["digest"] == plan.data_digest
    assert card["config"] == default_config(**CFG, device="cpu").to_dict()
    assert card["preprocess"]["shape"] == list(PREPROCESS.shape)
    assert card["preprocess"]["digest"] == PREPROCESS.digest()
    assert card["rank_convention"] == "ascending_fractional" and "torch" in card["versions"]
    record = json.loads((records / "split.json").read_text())
    assert "train" not in card["split"] and record["training_key"] == card["training_key"]
    train_keys, val_keys = record["train"], record["val"]
    assert set(train_keys).isdisjoint(val_keys) and len(train_keys) + len(val_keys) == 20
    assert card["split"]["source"] == "stratified" and len(val_keys) >= 2
    assert set(card["stages"]) == {"fold-0", "fold-1", "stage1", "stage2"}
    for stage in card["stages"].values():
        assert [m["epoch"] for m in stage["history"]] == [-1, 0, 1]  # -1: before training
        assert {"train_total", "train_rank", "train_diff", "val_mae", "val_srcc"} <= \
            set(stage["history"][-1])
    assert set(card["metrics"]) == {"train_stage1_oof", "train_stage1_in_sample",
                                    "val_stage1", "val_cascade"}

    # out-of-fold: every fold model never saw the subjects it predicted
    oof_rows = (records / "crossfit" / "oof.csv").read_text().splitlines()[1:]
    oof = {r.split(",")[0]: (int(r.split(",")[1]), float(r.split(",")[2])) for r in oof_rows}
    assert sorted(oof) == sorted(train_keys)
    for f in (0, 1):
        load_stage_model(model_dir / "crossfit" / f"fold-{f}")  # loads without its ids
        fold_card = json.loads((records / "crossfit" / f"fold-{f}" / "ids.json").read_text())
        held = {k for k, (fold, _) in oof.items() if fold == f}
        assert held and set(fold_card["train_ids"]) == set(train_keys) - held
        assert fold_card["val_ids"] == val_keys
    _, s2_card = load_stage_model(model_dir / "stage2")
    assert s2_card["stage"] == 2 and "train_ids" not in s2_card
    s2_ids = json.loads((records / "stage2" / "ids.json").read_text())
    assert s2_ids["train_ids"] == train_keys

    # the saved cascade reproduces the validation predictions in stage2/predictions.csv
    cascade_model, card2 = load_cascade(model_dir)
    assert card2 == card
    ds_rows = {}
    from rankcore.cache import VolumeDataset

    ds = VolumeDataset(cache)
    for key in val_keys:
        i = ds.keys.index(key)
        ds_rows[key] = (np.asarray(ds.volume(i), np.float32), ds.ages[i], ds.sexes[i],
                        ds.sites[i])
    val = SubjectData.from_tensors(np.stack([ds_rows[k][0] for k in val_keys]),
                                   [ds_rows[k][1] for k in val_keys],
                                   sex=[ds_rows[k][2] for k in val_keys],
                                   sites=[ds_rows[k][3] for k in val_keys])
    s1 = predict(cascade_model.stage1, val)
    final = predict(cascade_model.stage2, val.with_stage1(s1))
    saved = [r.split(",") for r in
             (records / "stage2" / "predictions.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in saved] == val_keys
    np.testing.assert_allclose(s1, [float(r[1]) for r in saved], atol=2e-3)
    np.testing.assert_allclose(final, [float(r[2]) for r in saved], atol=2e-3)
    assert np.all(np.abs(final - s1) < 10.0)  # bounded correction

    # progress: every epoch of every job, monotone, ends at 1
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert sum(not e["done"] for e in events) == 8

    # rerun: reused without training; another config: refused
    mtime = os.stat(model_dir / "stage1" / "model.safetensors").st_mtime_ns
    with caplog.at_level("INFO", logger="rankcore.train"):
        again = train_cascade(cache, model_dir, CFG, **OOF)
    assert again.reused and again.card == card
    assert any("reusing" in r.getMessage() for r in caplog.records)
    assert os.stat(model_dir / "stage1" / "model.safetensors").st_mtime_ns == mtime
    with pytest.raises(InputError, match=r"another config \(epochs\)"):
        train_cascade(cache, model_dir, {**CFG, "epochs": 3}, **OOF)
    assert not _staging(model_dir)


def test_insample_stage2_ablation_skips_the_folds(cache, tmp_path, caplog):
    """stage2_source="insample": stage 2 on stage 1's own training estimates, no fold jobs."""
    model_dir = tmp_path / "insample"
    with caplog.at_level("INFO", logger="rankcore.train"):
        res = train_cascade(cache, model_dir, CFG, k_folds=2, val_fraction=0.2,
                            stage2_source="insample")
    card = res.card
    assert set(card["stages"]) == {"stage1", "stage2"} and card["stage2_source"] == "insample"
    assert not (model_dir / "crossfit").exists()
    assert card["metrics"]["train_stage1_oof"] is None
    assert card["metrics"]["val_cascade"] is not None
    assert any("in-sample stage-1 estimates" in r.getMessage() for r in caplog.records)
    oof_plan = plan_cascade(cache, tmp_path / "oof", CFG, **OOF)
    assert card["training_key"] != oof_plan.training_key  # never reused for the other
    assert oof_plan.jobs == ("fold-0", "fold-1", "stage1", "stage2")
    with pytest.raises(InputError, match="`stage2_source` must be one of"):
        plan_cascade(cache, tmp_path / "x", CFG, stage2_source="in-sample")


def test_cpu_default_turns_stage2_and_cross_fitting_off(cache, tmp_path):
    """On CPU the default stage2_source is "off": one stage-1 job, stage 2 the identity."""
    plan = plan_cascade(cache, tmp_path / "plan", CFG, k_folds=2, val_fraction=0.2)
    assert plan.stage2_source == "off" and plan.jobs == ("stage1", "stage2")
    assert plan.train_config("stage2").model == "prior"
    res = train_cascade(cache, tmp_path / "off", CFG, k_folds=2, val_fraction=0.2)
    card = res.card
    assert card["stage2_source"] == "off" and set(card["stages"]) == {"stage1", "stage2"}
    assert not (res.model_dir / "crossfit").exists()
    assert [m["epoch"] for m in card["stages"]["stage2"]["history"]] == [-1]
    assert card["metrics"]["val_cascade"] == card["metrics"]["val_stage1"]
    cascade, _ = load_cascade(res.model_dir)
    x = torch.randn(2, 1, *PREPROCESS.shape)
    final, s1 = cascade(x)
    torch.testing.assert_close(final, s1)


def test_nan_in_a_fold_leaves_model_dir_untouched_and_a_rerun_resumes(
        cache, tmp_path, monkeypatch):
    clean = train_cascade(cache, tmp_path / "clean", CFG, **OOF)
    original = SubjectData.batch
    poison = {"on": False}

    def batch(self, indices, device="cpu", model=None):
        out = original(self, indices, device, model)
        if poison["on"]:
            out["image"] = torch.full_like(out["image"], float("nan"))
        return out

    def progress(event):
        if event["job"] == "fold-1" and event["epoch"] == 1 and not event["done"]:
            poison["on"] = True  # NaN from the second epoch of fold 1 on

    monkeypatch.setattr(SubjectData, "batch", batch)
    model_dir = tmp_path / "model"
    with pytest.raises(TrainingError) as err:
        train_cascade(cache, model_dir, CFG, **OOF, progress=progress)
    msg = str(err.value)
    assert msg.startswith("fold-1: stage 1: the predictions became NaN or inf at epoch 2")
    assert "epoch-0000" in msg and "resumes" in msg
    assert not model_dir.exists()
    (staging,) = _staging(model_dir)
    assert (staging / "crossfit" / "fold-0" / "card.json").is_file()
    assert json.loads((staging / "crossfit" / "fold-1" / "latest.json").read_text())["epoch"] == 0
    assert not (staging / "stage1").exists()

    poison["on"] = False
    monkeypatch.setattr(SubjectData, "batch", original)
    res = train_cascade(cache, model_dir, CFG, **OOF)
    assert not _staging(model_dir)
    assert res.card["stages"]["fold-1"]["resumes"] == [0]
    assert res.card["stages"]["fold-0"]["resumes"] == []
    # resuming is exact: the same weights as the uninterrupted run
    for part in ("crossfit/fold-1", "stage1", "stage2"):
        assert _states_equal(load_file(str(model_dir / part / "model.safetensors")),
                             load_file(str(clean.model_dir / part / "model.safetensors")))


# ---- bad input --------------------------------------------------------------------------------

def _refused(cache_dir, model_dir, exc, match, **kw):
    with pytest.raises(exc, match=match) as err:
        train_cascade(cache_dir, model_dir, kw.pop("config", CFG), **kw)
    assert "\n" not in str(err.value)
    assert not model_dir.exists() and not _staging(model_dir)


def test_bad_input_gives_one_clear_error_and_writes_nothing(cache, tmp_path):
    from rankcore.sorters import build_sorter, save_sorter

    out = tmp_path / "model"
    empty = make_cache(tmp_path / "empty", 0, corrupt=1)
    _refused(empty, out, InputError, "holds no subjects")
    few = make_cache(tmp_path / "few", 3)
    _refused(few, out, InputError, r"fewer than one batch \(batch_size 4\)", val_fraction=0.0)
    no_ages = make_cache(tmp_path / "no_ages", 6, ages=[None] * 6)
    _refused(no_ages, out, InputError, "has no ages")
    only_test = make_cache(tmp_path / "only_test", 6, splits=["test"] * 6)
    _refused(only_test, out, InputError, "no training subjects")
    lstm = tmp_path / "lstm12.safetensors"
    save_sorter(lstm, build_sorter("lstm", seq_len=12), {})
    _refused(cache, out, SorterLengthError, "batch_size",
             config={**CFG, "rank_loss": "sorter", "sorter": str(lstm)})
    _refused(cache, out, InputError, "shipped sorter",
             config={**CFG, "rank_loss": "sorter", "sorter": "no-such-sorter"})
    _refused(cache, out, InputError, "`k_folds` = 5 leaves", k_folds=5,
             config={**CFG, "batch_size": 16})
    _refused(tmp_path / "nowhere", out, InputError, "brainrank cache")
    _refused(cache, out, InputError, "`engine`", engine="spark")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        train_cascade(cache, out, CFG)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not _staging(out)


# ---- parallel jobs and Ray Train ---------------------------------------------------------------

@pytest.mark.slow
def test_parallel_local_jobs_give_the_sequential_weights(cache, tmp_path):
    one = train_cascade(cache, tmp_path / "one", CFG, **OOF)
    two = train_cascade(cache, tmp_path / "two", CFG, **OOF, workers=2)
    assert two.card["workers"] == 2 and two.card["training_key"] == one.card["training_key"]
    for part in ("crossfit/fold-0", "crossfit/fold-1", "stage1", "stage2"):
        assert _states_equal(load_file(str(one.model_dir / part / "model.safetensors")),
                             load_file(str(two.model_dir / part / "model.safetensors")))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_trains_every_job_on_ray_train(ray_cluster, cache, tmp_path):
    res = train_cascade(cache, tmp_path / "model", {**CFG, "epochs": 1}, **OOF,
                        engine="ray", workers=2,
                        storage_path=tmp_path / "ray")
    assert res.card["engine"] == "ray"
    for job in ("fold-0", "fold-1", "stage1", "stage2"):
        assert [m["epoch"] for m in res.card["stages"][job]["history"]] == [-1, 0]
    _, s2 = load_stage_model(res.model_dir / "stage2")
    assert s2["world_size"] == 2
    assert np.isfinite(res.card["metrics"]["val_cascade"]["mae"])
    assert not any((res.model_dir).rglob("ray"))  # Ray's storage stays outside MODEL_DIR
