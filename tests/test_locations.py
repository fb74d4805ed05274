"""Where caches and model folders live: paths or file:// URIs; an object-store URI is refused
in one line at every boundary (parameters, CLI, library), never turned into a local folder
``s3:/bucket/x`` (rankcore.locations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows._config import build_params
from flows.cli import main
from flows.params import (
    EvaluateParams,
    IngestParams,
    PredictParams,
    PretrainSorterParams,
    SimulateParams,
    TrainParams,
)
from flows.params_pipeline import PipelineParams
from rankcore.errors import InputError
from rankcore.locations import is_uri, local_path
from rankcore.mri.types import Cohort, PreprocessConfig

URI = "s3://bucket/x"


def test_local_path_turns_file_uris_into_paths_and_keeps_paths():
    assert local_path("file:///data/my%20cache", "cache") == Path("/data/my cache")
    assert local_path("file://localhost/data/c", "cache") == Path("/data/c")
    assert local_path("relative/dir", "cache") == Path("relative/dir")
    assert local_path(Path("/a/b"), "cache") == Path("/a/b")
    assert is_uri("gs://b/x") and not is_uri("/data/s3://x") and not is_uri("c:/x")


@pytest.mark.parametrize("location, says", [
    (URI, "shared POSIX file system"), ("gs://b/c", "shared POSIX file system"),
    ("file://otherhost/data", "file:///abs/path"), ("", "got ''")])
def test_local_path_refuses_what_is_not_a_local_path(location, says):
    with pytest.raises(InputError, match="`cache` must") as err:
        local_path(location, "cache")
    assert says in str(err.value) and repr(location) in str(err.value)
    assert "\n" not in str(err.value)


# Each rankcore entry point that takes a cache, model, output or cohort location, called with
# the object-store URI in that place (the other arguments do not matter: locations are
# checked first).
def _boundaries():
    from rankcore._lock import run_lock
    from rankcore.cache import VolumeDataset, check_complete, ingest_cohort, open_cache
    from rankcore.inference import load_bias, predict_cohort
    from rankcore.inference.cohort import check_prediction
    from rankcore.inference.engine import load_runner
    from rankcore.mri import read_cohort
    from rankcore.report.evaluate import check_evaluation, evaluate_model
    from rankcore.train.cascade import load_cascade, read_card, train_cascade
    from rankcore.train.cascade_plan import plan_cascade

    cohort = Cohort(Path("src"), "manifest", ())
    return {
        "open_cache": lambda: open_cache(URI),
        "VolumeDataset": lambda: VolumeDataset(URI),
        "check_complete": lambda: check_complete(URI),
        "ingest_cohort.cache": lambda: ingest_cohort(cohort, URI, PreprocessConfig()),
        "read_cohort": lambda: read_cohort(URI),
        "plan_cascade.cache": lambda: plan_cascade(URI, "m"),
        "train_cascade.cache": lambda: train_cascade(URI, "m"),
        "train_cascade.model": lambda: train_cascade("c", URI),
        "load_cascade": lambda: load_cascade(URI),
        "read_card": lambda: read_card(URI),
        "load_runner": lambda: load_runner(URI, engine="ray", workers=2),
        "evaluate.model": lambda: evaluate_model(URI, "c", "r"),
        "evaluate.cache": lambda: evaluate_model("m", URI, "r"),
        "evaluate.out": lambda: evaluate_model("m", "c", URI),
        "check_evaluation": lambda: check_evaluation("m", URI, "r", engine="ray"),
        "predict.model": lambda: predict_cohort(URI, "c", "p.csv"),
        "predict.cohort": lambda: predict_cohort("m", URI, "p.csv"),
        "predict.out": lambda: predict_cohort("m", "c", URI + "/p.csv"),
        "predict.cache": lambda: predict_cohort("m", "c", "p.csv", cache_dir=URI),
        "predict.bias_file": lambda: predict_cohort("m", "c", "p.csv", bias_file=URI),
        "check_prediction": lambda: check_prediction("m", "c", URI + "/p.csv"),
        "load_bias": lambda: load_bias(URI, {}),
        "run_lock": lambda: run_lock(URI).__enter__(),
    }


@pytest.mark.parametrize("name", sorted(_boundaries()))
def test_library_refuses_an_object_store_uri_and_creates_no_s3_folder(name, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        _boundaries()[name]()
    assert URI in str(err.value) and "POSIX" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no "s3:" folder, nothing else either


@pytest.mark.parametrize("model, given, field", [
    (EvaluateParams, {"model_dir": URI, "cache": "c", "out": "r"}, "model_dir"),
    (EvaluateParams, {"model_dir": "m", "cache": URI, "out": "r"}, "cache"),
    (EvaluateParams, {"model_dir": "m", "cache": "c", "out": URI}, "out"),
    (TrainParams, {"cache": URI, "out": "m"}, "cache"),
    (TrainParams, {"cache": "c", "out": URI}, "out"),
    (PredictParams, {"model_dir": URI, "cohort": "c", "out": "p.csv"}, "model_dir"),
    (PredictParams, {"model_dir": "m", "cohort": URI, "out": "p.csv"}, "cohort"),
    (PredictParams, {"model_dir": "m", "cohort": "c", "out": URI}, "out"),
    (PredictParams, {"model_dir": "m", "cohort": "c", "out": "p.csv", "cache": URI}, "cache"),
    (PredictParams, {"model_dir": "m", "cohort": "c", "out": "p.csv", "bias_file": URI},
     "bias_file"),
    (IngestParams, {"cohort": URI, "cache": "c"}, "cohort"),
    (IngestParams, {"cohort": "c", "cache": URI}, "cache"),
    (SimulateParams, {"out_dir": URI}, "out_dir"),
    (PretrainSorterParams, {"out": URI}, "out"),
    (PipelineParams, {"out": URI}, "out"),
    (PipelineParams, {"out": "run", "cohort": URI}, "cohort"),
])
def test_parameters_refuse_an_object_store_uri_and_take_file_uris(model, given, field):
    with pytest.raises(InputError, match=f"^`{field}` must be a path or a file:// URI") as err:
        build_params(model, given)
    assert repr(URI) in str(err.value) and "\n" not in str(err.value)
    params = build_params(model, {**given, field: "file:///data/some%20where"})
    assert getattr(params, field) == "/data/some where"


def test_ray_train_storage_keeps_its_uri():
    params = build_params(TrainParams, {"cache": "c", "out": "m", "storage_path": URI})
    assert params.storage_path == URI


@pytest.mark.parametrize("argv", [
    ["evaluate", "m", URI, "--out", "r"],
    ["predict", URI, "cohort", "--out", "p.csv"],
    ["train", "file:///c", "--out", URI],
    ["ingest", "cohort", "--cache", URI],
])
def test_cli_refuses_an_object_store_uri_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(URI) in err and "POSIX" in err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_workers_need_engine_ray(capsys):
    assert main(["evaluate", "m", "c", "--out", "r", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("`workers` must be 1 with engine 'local' (it predicts in this "
                        "process; --engine ray runs N workers), got 2")
    params = build_params(EvaluateParams, {"model_dir": "m", "cache": "c", "out": "r",
                                           "engine": "ray", "workers": 2, "gpu": True})
    assert (params.engine, params.workers, params.gpu) == ("ray", 2, True)
