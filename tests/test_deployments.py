"""Deployment files and the code behind them, without servers: deployments/prefect.yaml equals
the deployments `brainrank serve` builds and its parameters validate; the Ray cluster and
RayJob files parse and point at an entry point that exists; `brainrank submit` validates a
job's parameters, finds the cluster's token and builds the job's runtime environment before
contacting anything; the job entry point refuses what it cannot run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from flows import job as job_entry
from flows.cli import build_parser
from flows.params import JobCommand, PipelineParams, ServeParams, SubmitParams
from flows.serve import ENTRYPOINTS, build_deployments, deployment_specs
from flows.submit import (
    auth_headers,
    check_cluster_paths,
    job_parameters,
    resolve_address,
    runtime_env,
)
from rankcore.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = REPO / "deployments"


def _yaml(rel: str):
    return yaml.safe_load((DEPLOYMENTS / rel).read_text())


# ---------------------------------------------------------------------------- Prefect


def test_prefect_yaml_holds_exactly_the_served_deployments():
    doc = _yaml("prefect.yaml")
    got = [(d["entrypoint"], d["name"], [s["cron"] for s in d.get("schedules", [])],
            d["parameters"], d["description"], d["work_pool"]["name"],
            d["enforce_parameter_schema"], d.get("concurrency_limit"))
           for d in doc["deployments"]]
    want = [(s.entrypoint, s.name, [s.cron] if s.cron else [], s.params,
             s.description, "brainrank", True,
             s.concurrency_limit and {"limit": s.concurrency_limit,
                                      "collision_strategy": "ENQUEUE"})
            for s in deployment_specs("/data/brainrank", "/data/cohort")]
    assert got == want
    # the pipeline and every stage flow is deployed; the two schedules are nightly and weekly
    assert {d["entrypoint"] for d in doc["deployments"]} == set(ENTRYPOINTS.values())
    crons = {d["name"]: d["schedules"][0]["cron"] for d in doc["deployments"]
             if d.get("schedules")}
    assert crons == {"nightly-ingest": "0 1 * * *", "weekly": "0 3 * * 0"}
    # every deployment writing the run folder runs one flow run at a time
    run = "/data/brainrank/run"
    writers = [d for d in doc["deployments"]
               if str(d["parameters"].get("out", d["parameters"].get("cache", ""))
                      ).startswith(run)]
    assert len(writers) == 4
    assert all(d["concurrency_limit"]["limit"] == 1 for d in writers)
    # rankcore's log lines reach the runs through Prefect's own extra-loggers setting
    env = doc["definitions"]["work_pool"]["job_variables"]["env"]
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "rankcore"


def test_every_deployment_names_a_real_flow_and_valid_parameters():
    import importlib

    for spec in deployment_specs("/data/brainrank", "/data/cohort"):
        module, name = spec.entrypoint.split(":")
        flow = getattr(importlib.import_module(module), name)
        assert flow.name == spec.flow_name
        spec.validate()  # the flow's pydantic model accepts the parameters
        # the deployed flow's parameters are the model's fields, with its defaults
        model = spec.validate().__class__
        schema = flow.parameters
        assert list(schema.properties) == list(model.model_fields)
        assert set(schema.required or []) == {n for n, f in model.model_fields.items()
                                             if f.is_required()}


def test_serve_builds_the_same_deployments_under_another_root(tmp_path):
    deployments = build_deployments(ServeParams(root=str(tmp_path)))
    names = sorted(f"{d.flow_name}/{d.name}" for d in deployments)
    assert names == sorted(f"{s.command}/{s.name}" for s in deployment_specs(str(tmp_path)))
    weekly = next(d for d in deployments if d.name == "weekly")
    assert weekly.parameters == {"out": f"{tmp_path}/run"}
    assert weekly.schedules[0].schedule.cron == "0 3 * * 0"
    assert weekly.enforce_parameter_schema and weekly.concurrency_limit == 1
    only = build_deployments(ServeParams(root=str(tmp_path), only=["ingest/adhoc"]))
    assert [(d.flow_name, d.name) for d in only] == [("ingest", "adhoc")]
    with pytest.raises(InputError, match="`only` must name deployments"):
        build_deployments(ServeParams(only=["pipeline/monthly"]))


def test_python_m_deployments_serve_runs_from_the_repository_root():
    out = subprocess.run([sys.executable, "-m", "deployments.serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--root" in out.stdout and "--only" in out.stdout


# -------------------------------------------------------------------------------- Ray


def test_ray_cluster_config_has_a_cpu_head_gpu_workers_an_image_and_shared_storage():
    cfg = _yaml("ray/cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 and t["min_workers"] == 0 for t in gpu)
    assert cfg["max_workers"] >= max(t["max_workers"] for t in gpu)
    docker = cfg["docker"]  # the image of deployments/ray/Dockerfile, CPU head, CUDA workers
    assert docker["head_image"].endswith("-cpu") and docker["worker_image"].endswith("-cuda")
    assert "--gpus all" in docker["worker_run_options"]
    run = " ".join(docker["run_options"])
    assert "-v /data:/data" in run and "--shm-size" in run and "RAY_AUTH_MODE=token" in run
    init = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in init and "/data" in init  # a shared file system on every node
    starts = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "--num-gpus=0" in starts


def test_dockerfile_builds_cpu_and_cuda_variants_from_this_repository():
    text = (DEPLOYMENTS / "ray" / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "-c constraints.txt ." in text
    for folder in ("rankcore", "flows", "tasks"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text
        assert (REPO / folder).is_dir()


def test_rayjob_entrypoint_exists_and_its_parameters_validate():
    docs = list(yaml.safe_load_all((DEPLOYMENTS / "ray" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    python, dash_m, module, command = job["spec"]["entrypoint"].split()
    assert (python, dash_m, module) == ("python", "-m", "flows.job")
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    assert command in get_args(JobCommand)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    params = PipelineParams.model_validate_json(env[job_entry.PARAMS_ENV])
    assert params.train.engine == "ray" and params.train.gpu
    assert params.train.batch_size % params.train.workers == 0
    # the evaluation's forward passes run on GPU workers, not in the CPU head's driver
    assert params.evaluate.engine == "ray" and params.evaluate.gpu
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # a CPU head
    groups = spec["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups
               for c in g["template"]["spec"]["containers"])
    for pod in [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                              for g in groups]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        for c in pod["containers"]:
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/dev/shm", "/data"} <= mounts
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]


def test_shipped_configs_validate():
    demo = PipelineParams.model_validate({"out": "runs/demo", **_yaml("configs/demo.yaml")})
    assert demo.cohort is None and demo.simulate.corrupt > 0
    full = PipelineParams.model_validate(_yaml("configs/full.yaml"))
    assert full.cohort and full.train.gpu and full.train.engine == "ray"
    assert full.evaluate.gpu and full.evaluate.engine == "ray"
    assert full.train.batch_size % full.train.workers == 0


# ------------------------------------------------------------------------------ submit


def test_submit_validates_the_job_parameters_before_contacting_anything(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({"spacing": 6, "shape": [16, 20, 16],
                                   "train": {"epochs": 1}}))
    params = job_parameters("pipeline", str(cfg), ["--out", "/shared/run", "--until", "ingest"])
    assert PipelineParams.model_validate(params).until == "ingest"
    assert params["out"] == "/shared/run" and params["shape"] == [16, 20, 16]
    stage = job_parameters("train", None, ["/shared/cache", "--out", "/shared/m",
                                           "--engine", "ray"])
    assert (stage["cache"], stage["engine"]) == ("/shared/cache", "ray")
    with pytest.raises(InputError, match="epochs"):
        job_parameters("train", None, ["c", "--out", "m", "--epochs", "0"])
    with pytest.raises(InputError, match="must be options of `brainrank pipeline`"):
        job_parameters("pipeline", None, ["--out", "r", "--no-such-option"])


def test_submit_refuses_relative_paths_that_would_vanish_with_the_job():
    check_cluster_paths({"out": "/shared/run", "cohort": "s3://bucket/cohort.csv",
                         "sorter": "pairwise"})
    with pytest.raises(InputError, match="`out` must be an absolute path"):
        check_cluster_paths({"out": "runs/demo"})
    with pytest.raises(InputError, match="`sorter` must be an absolute path"):
        check_cluster_paths({"out": "/r", "sorter": "my/sorter.safetensors"})


def test_submit_cli_parses_job_args_env_and_pip():
    p = SubmitParams(job_args="--out '/a b/run' --until ingest", env=["A=1", "B=x=y"],
                     pip=["nilearn"])
    assert p.job_args == ["--out", "/a b/run", "--until", "ingest"]
    assert p.env == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        SubmitParams(env=["novalue"])


def test_submit_cli_keeps_the_job_config_file():
    """`brainrank submit --config FILE`: FILE is the job command's config (it was once dropped
    with the CLI-only options, and the job ran on library defaults)."""
    from flows.cli import given_options

    ns = build_parser().parse_args(["submit", "--config", "/shared/job.yaml",
                                    "--job-args=--out /shared/run"])
    assert given_options(ns)["job_config"] == "/shared/job.yaml"


def test_runtime_env_uploads_the_sources_with_the_parameters(tmp_path):
    params = SubmitParams(working_dir=str(REPO), env={"PREFECT_API_URL": "http://h/api"},
                          pip=["scipy"])
    env = runtime_env(params, {"out": "r"})
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert json.loads(env["env_vars"][job_entry.PARAMS_ENV]) == {"out": "r"}
    assert env["env_vars"]["PREFECT_API_URL"] == "http://h/api" and env["pip"] == ["scipy"]
    with pytest.raises(InputError, match="brainrank source folder"):
        runtime_env(SubmitParams(working_dir=str(tmp_path)), {})


def test_submit_finds_the_address_and_the_token(monkeypatch, tmp_path):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address("http://head:8265/") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://h2:8265")
    assert resolve_address(None) == "http://h2:8265"
    with pytest.raises(InputError, match="http"):
        resolve_address("head:6379")

    assert auth_headers() == {}  # no token mode, no token file: nothing sent
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert auth_headers(str(token)) == {"Authorization": "Bearer s3cret"}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(InputError, match="RAY_AUTH_MODE=token but no token"):
        auth_headers()  # HOME is the session's empty home: no ~/.ray/auth_token
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert auth_headers() == {"Authorization": "Bearer s3cret"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_headers() == {"Authorization": "Bearer env-token"}


def test_job_entry_point_refuses_what_it_cannot_run(monkeypatch, capsys):
    monkeypatch.delenv(job_entry.PARAMS_ENV, raising=False)
    assert job_entry.main(["serve"]) == 2
    assert job_entry.main(["pipeline"]) == 2
    assert f"${job_entry.PARAMS_ENV} is not set" in capsys.readouterr().err
    monkeypatch.setenv(job_entry.PARAMS_ENV, json.dumps({"cohort": "x"}))
    assert job_entry.main(["pipeline"]) == 2
    assert "`out` is required" in capsys.readouterr().err
