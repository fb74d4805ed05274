"""Pieces of the pipeline that need no Prefect server: its parameter model, the held-out test
split of a cohort without one (stable, per participant), the manifest it writes, the cohort
fingerprint, and the run state (pipeline.json) that decides which stages are reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows._config import build_params
from flows._run_state import RunLayout, RunState, digest
from flows.params import (
    PIPELINE_DERIVED,
    EvaluateParams,
    IngestParams,
    PipelineParams,
    PretrainSorterParams,
    SimulateParams,
    TrainParams,
)
from rankcore.errors import InputError
from rankcore.mri import Cohort, CohortRow, QuarantineEntry, read_cohort
from rankcore.mri.holdout import cohort_fingerprint, with_test_split, write_manifest

# ------------------------------------------------------------------------------ parameters


@pytest.mark.parametrize(("section", "model"), [
    ("simulate", SimulateParams), ("ingest", IngestParams), ("pretrain", PretrainSorterParams),
    ("train", TrainParams), ("evaluate", EvaluateParams)])
def test_every_stage_option_is_a_pipeline_option_with_the_same_default(section, model):
    fields = PipelineParams.model_fields
    sub = (fields["sorter"].default_factory().pretrain if section == "pretrain"
           else fields[section].default_factory())
    own = set(type(sub).model_fields)
    assert own | set(PIPELINE_DERIVED[section]) == set(model.model_fields)
    assert not own & set(PIPELINE_DERIVED[section])
    for name in own:
        assert type(sub).model_fields[name].default == model.model_fields[name].default, name


def test_pipeline_params_merge_config_and_options_and_build_the_stage_params(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spacing: 4\nshape: [20, 24, 20]\ntrain:\n  k-folds: 2\n  epochs: 3\n"
                   "sorter: {source: soft}\nevaluate: {n_boot: 0}\n")
    p = build_params(PipelineParams, {"out": "run", "spacing": 6.0}, str(cfg))
    assert p.spacing == 6.0 and p.shape == (20, 24, 20)  # the option wins over the file
    tp = p.train_params("c", "m")
    assert (tp.k_folds, tp.epochs, tp.rank_loss, tp.sorter) == (2, 3, "soft", None)
    assert (tp.spacing, tp.shape) == (6.0, (20, 24, 20))
    ip = p.ingest_params("cohort.csv", "cache", allow_outside_root=True)
    assert ip.require_age and ip.allow_outside_root and ip.max_failed_fraction == 0.5
    default = PipelineParams(out="r").train_params("c", "m")
    assert (default.rank_loss, default.sorter) == ("soft", None)  # the default of `train` too
    shipped = PipelineParams(out="r", sorter={"source": "shipped"}).train_params("c", "m")
    assert (shipped.rank_loss, shipped.sorter) == ("sorter", "pairwise")
    pre = PipelineParams(out="r", sorter={"source": "pretrain"}).train_params("c", "m", "s.st")
    assert (pre.rank_loss, pre.sorter) == ("sorter", "s.st")


@pytest.mark.parametrize(("given", "fragment"), [
    ({"train": {"epochs": 0}}, "epochs"),
    ({"train": {"bogus": 1}}, "bogus"),
    ({"train": {"options": {"epochs": 3}}}, "section `train`: `options` must not repeat"),
    ({"sorter": {"source": "file"}}, "`file` must be given exactly when"),
    ({"shape": [16, 0, 16]}, "three positive integers"),
    ({"until": "report"}, "until"),
])
def test_pipeline_params_refuse_bad_values_with_the_field_named(given, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        build_params(PipelineParams, {"out": "r", **given})


def test_pipeline_params_serialise_to_json_and_back():
    p = PipelineParams(out="r", cohort="c.csv", train={"options": {"lr": 1e-3}})
    assert PipelineParams.model_validate_json(p.model_dump_json()) == p
    with pytest.raises(ValidationError):
        PipelineParams.model_validate({"cohort": "c"})  # out is required


# ------------------------------------------------------------------------- held-out split


def _cohort(tmp_path: Path, n: int, *, sessions: int = 1, labelled: dict | None = None
            ) -> Cohort:
    rows = []
    for i in range(n):
        for s in range(sessions):
            path = tmp_path / f"sub-{i:03d}_ses-{s}_T1w.nii.gz"
            path.write_bytes(b"x" * (i + 1))
            ses = None if sessions == 1 else f"ses-{s}"
            rows.append(CohortRow(f"sub-{i:03d}", path, session=ses, age=20.0 + i % 60,
                                  sex="F" if i % 2 else "M", site=f"s{i % 3}",
                                  split=(labelled or {}).get(i)))
    return Cohort(tmp_path, "manifest", tuple(rows))


def test_held_out_split_is_per_participant_seeded_and_stable_as_the_cohort_grows(tmp_path):
    cohort = _cohort(tmp_path, 200, sessions=2)
    a = with_test_split(cohort, 0.2, seed=1)
    test = {r.participant_id for r in a.rows if r.split == "test"}
    assert 25 <= len(test) <= 55  # ~40 expected (binomial, sd ~5.7)
    for pid in test:  # every session of a held-out participant is held out
        assert all(r.split == "test" for r in a.rows if r.participant_id == pid)
    assert with_test_split(cohort, 0.2, seed=1) == a
    assert {r.participant_id for r in with_test_split(cohort, 0.2, seed=2).rows
            if r.split == "test"} != test
    # a grown cohort keeps every earlier subject's split
    grown = with_test_split(_cohort(tmp_path, 260, sessions=2), 0.2, seed=1)
    assert {r.participant_id for r in grown.rows if r.split == "test"} & set(
        f"sub-{i:03d}" for i in range(200)) == test


def test_held_out_split_keeps_labels_and_holds_out_at_least_two(tmp_path):
    cohort = _cohort(tmp_path, 6, labelled={0: "train", 1: "val"})
    out = with_test_split(cohort, 0.01, seed=0)
    assert out.rows[0].split == "train" and out.rows[1].split == "val"
    assert sum(r.split == "test" for r in out.rows) == 2
    with pytest.raises(InputError, match="`fraction` must be a number in"):
        with_test_split(cohort, 0.6, seed=0)


def test_written_manifest_reads_back_as_the_same_cohort(tmp_path):
    rows = (CohortRow("sub-a", tmp_path / "a.nii.gz", session="ses-1", age=89.0,
                      age_censored=True, sex="F", site="x", split="test",
                      extra={"handedness": "L"}),
            CohortRow("sub-b", tmp_path / "b.nii.gz", age=33.5, sex="M", site=None))
    for r in rows:
        r.path.write_bytes(b"nifti")
    manifest = write_manifest(Cohort(tmp_path, "bids", rows), tmp_path / "out" / "m.csv")
    back = read_cohort(manifest, allow_outside_root=True)
    assert back.quarantine == ()
    assert [(r.key, r.path, r.age, r.age_censored, r.sex, r.site, r.split, r.extra)
            for r in back.rows] == [
        ("sub-a/ses-1", rows[0].path, 89.0, True, "F", "x", "test", {"handedness": "L"}),
        ("sub-b", rows[1].path, 33.5, False, "M", None, None, {})]


def test_fingerprint_changes_with_a_touched_file_or_a_label_but_not_otherwise(tmp_path):
    cohort = _cohort(tmp_path, 5)
    first = cohort_fingerprint(cohort)
    assert cohort_fingerprint(_cohort(tmp_path, 5)) != first  # rewritten files: new mtimes
    cohort = _cohort(tmp_path, 5)
    base = cohort_fingerprint(cohort)
    assert cohort_fingerprint(cohort) == base
    st = os.stat(cohort.rows[2].path)
    os.utime(cohort.rows[2].path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert cohort_fingerprint(cohort) != base
    relabelled = with_test_split(cohort, 0.5, seed=0)
    assert cohort_fingerprint(relabelled) != cohort_fingerprint(cohort)
    quarantined = Cohort(cohort.root, cohort.kind, cohort.rows, (QuarantineEntry(
        "sub-x", "t.csv", "bad_age", "age 'abc' is not a number"),))
    assert cohort_fingerprint(quarantined) != cohort_fingerprint(cohort)


# ------------------------------------------------------------------------------ run state


def test_run_state_reuses_only_matching_completed_stages_and_carries_the_rest(tmp_path):
    layout = RunLayout.create(tmp_path / "run")
    state = RunState(layout, {"out": "run"})
    state.record("simulate", "ran", input_digest="a", output_digest="a", seconds=1.0,
                 outputs={"cohort": "c"})
    state.record("ingest", "ran", input_digest="b", output_digest="d", seconds=2.0)
    state.fail("sorter", InputError("no such sorter"))
    saved = json.loads(layout.state_file.read_text())
    assert saved["status"] == "failed" and saved["error"]["stage"] == "sorter"
    assert saved["paths"] == {"cohort": "c"}

    again = RunState(layout, {"out": "run"})
    assert again.matches("simulate", "a")["output_digest"] == "a"
    assert again.matches("simulate", "other") is None
    assert again.previous("sorter") is None
    again.record("simulate", "reused", input_digest="a", output_digest="a", seconds=0.0)
    stages = json.loads(layout.state_file.read_text())["stages"]
    assert stages["ingest"]["carried"] and "carried" not in stages["simulate"]
    assert RunState(layout, {}).matches("ingest", "b")["output_digest"] == "d"


def test_run_layout_refuses_a_foreign_folder_and_keeps_one_previous_generation(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="empty folder or an earlier pipeline run"):
        RunLayout.check(tmp_path / "busy")
    layout = RunLayout.create(tmp_path / "run")
    for generation in ("one", "two"):
        layout.model.mkdir()
        (layout.model / "card.json").write_text(generation)
        assert layout.retire(layout.model) == layout.run_dir / "previous" / "model"
    assert (layout.run_dir / "previous" / "model" / "card.json").read_text() == "two"
    assert not layout.model.exists() and layout.retire(layout.model) is None


def test_digest_ignores_key_order_but_not_values():
    assert digest("x", {"a": 1, "b": [1, 2]}) == digest("x", {"b": [1, 2], "a": 1})
    assert digest("x", {"a": 1}) != digest("x", {"a": 2}) != digest("y", {"a": 2})
