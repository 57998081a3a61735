"""The deployment path on a real local Prefect server (scripts/deploy_check.sh): `alma-r setup`, `prefect deploy
--all`, process workers, `prefect deployment run build-alma-r/tiny-cpu --watch` exits 0; a second run hands its
GPU stages to `alma-r-stage/gpu` through run_deployment. The script's trap stops server and workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO
from tests.test_flow_e2e import MINI, mini_config


def test_prefect_yaml_deployments_and_inactive_schedules():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert {"tiny-cpu", "alma-13b-r", "gpu"} <= set(by_name)
    assert by_name["tiny-cpu"]["work_pool"]["name"] == "cpu-process"
    assert by_name["alma-13b-r"]["work_pool"]["name"] == by_name["gpu"]["work_pool"]["name"] == "gpu"
    for name in ("tiny-cpu", "alma-13b-r"):
        assert by_name[name]["entrypoint"] == "flows/build_alma_r.py:build_alma_r"
        assert set(by_name[name]["parameters"]) == {"config_path", "overrides"}
        assert (REPO / by_name[name]["parameters"]["config_path"]).is_file()
        assert by_name[name]["schedules"] and all(s["active"] is False for s in by_name[name]["schedules"])


def test_deploy_all_and_run_tiny_cpu_with_watch(tmp_path):
    config = mini_config(tmp_path)
    first = {"config_path": str(config), "overrides": MINI}
    second = {
        "config_path": str(config),
        "overrides": [*MINI, "train.max_steps=4", "run.stage_deployment=alma-r-stage/gpu"],
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", "scripts/deploy_check.sh", json.dumps(first), json.dumps(second)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["stages"]["train"]["cached"] is False and run["stages"]["train"]["counts"]["steps"] == 4
    assert run["stages"]["generate"]["cached"] is True
    assert "alma-r-stage flow runs:" in done.stdout


def test_gpu_work_pool_templates_request_gpus_and_reference_every_variable():
    import re

    for name in ("docker-gpu.json", "kubernetes-gpu.json"):
        template = json.loads((REPO / "configs" / "work-pools" / name).read_text())
        used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
        defined = set(template["variables"]["properties"])
        # Prefect passes only variables the job configuration references (docs: customize base job templates)
        assert defined <= used, f"{name}: defined but never used: {defined - used}"
        assert used <= defined, f"{name}: used but not defined: {used - defined}"
    k8s = json.loads((REPO / "configs/work-pools/kubernetes-gpu.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    docker = json.loads((REPO / "configs/work-pools/docker-gpu.json").read_text())
    assert docker["variables"]["properties"]["container_create_kwargs"]["default"] == {"runtime": "nvidia"}
