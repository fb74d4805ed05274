"""A deployment run with a partial `--params` override keeps the deployment's other parameters
(the deployed flows take flat parameters: flows/deployed.py), against the session's real
Prefect server."""

from __future__ import annotations

import pytest
from prefect.deployments import run_deployment

from flows.params import ServeParams
from flows.serve import build_deployments

pytestmark = pytest.mark.prefect


def _apply(root, cohort, only):
    deployments = build_deployments(ServeParams(root=str(root), cohort=str(cohort), only=only))
    for d in deployments:
        d.apply()
    return {f"{d.flow_name}/{d.name}": d for d in deployments}


def test_a_partial_override_keeps_the_other_parameters(prefect_server, tmp_path):
    from flows import deployed

    root, cohort = tmp_path / "scheduled", tmp_path / "cohort"
    _apply(root, cohort, ["pipeline/weekly", "simulate/adhoc"])
    # the README's example: change the grid of one run, keep its cohort and run folder
    run = run_deployment("pipeline/weekly", parameters={"spacing": 3.0}, timeout=0)
    assert run.parameters == {"out": f"{root}/run", "cohort": str(cohort), "spacing": 3.0}
    params = deployed.pipeline.validate_parameters(run.parameters)
    assert (params["cohort"], params["spacing"], params["until"]) == (str(cohort), 3.0,
                                                                     "evaluate")

    # a run of the deployed flow with the server's merged parameters does what they say
    sim = run_deployment("simulate/adhoc", parameters={"subjects": 2, "spacing": 4.0},
                         timeout=0)
    assert sim.parameters == {"out_dir": f"{root}/simulated", "subjects": 2, "spacing": 4.0}
    deployed.simulate(**sim.parameters)
    assert len(list((root / "simulated").glob("sub-*/anat/*_T1w.nii*"))) == 2


def test_the_server_refuses_an_override_outside_the_models_bounds(prefect_server, tmp_path):
    _apply(tmp_path / "r", tmp_path / "c", ["pipeline/adhoc"])
    with pytest.raises(Exception, match=r"spacing|[Vv]alidation"):
        run_deployment("pipeline/adhoc", parameters={"spacing": -1.0}, timeout=0)
