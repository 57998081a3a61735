"""The deployment path exactly as README.md states it (scripts/deploy_check.sh): the README's deployment block
(`alma-r setup`, `prefect deploy --all`, workers in the background, `prefect deployment run build-alma-r/tiny-cpu
--watch`), extracted from README.md, runs as written in a throwaway checkout against a throwaway server, with no
variable the README does not set; a second run hands its GPU stages to `alma-r-stage/gpu` through
run_deployment. The script's trap stops server and workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from alma_r.config import parse_overrides
from tests.conftest import REPO
from tests.test_flow_e2e import MINI


def readme_deployment_block() -> str:
    """The fenced bash block of README.md that runs `prefect ... deploy` (what scripts/deploy_check.sh runs)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)
    chosen = [b for b in blocks if re.search(r"^prefect .*\bdeploy\b", b, re.M)]
    assert len(chosen) == 1, chosen
    return chosen[0]


def test_prefect_yaml_deployments_and_inactive_schedules():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    # no pull section: `prefect deploy` records the checkout it runs in (no variable for the worker to need)
    assert "pull" not in spec and all("pull" not in d for d in spec["deployments"])
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert {"tiny-cpu", "alma-13b-r", "gpu"} <= set(by_name)
    assert by_name["tiny-cpu"]["work_pool"]["name"] == "cpu-process"
    assert by_name["alma-13b-r"]["work_pool"]["name"] == by_name["gpu"]["work_pool"]["name"] == "gpu"
    for name in ("tiny-cpu", "alma-13b-r"):
        assert by_name[name]["entrypoint"] == "flows/build_alma_r.py:build_alma_r"
        assert set(by_name[name]["parameters"]) == {"config_path", "overrides"}
        assert (REPO / by_name[name]["parameters"]["config_path"]).is_file()
        assert by_name[name]["schedules"] and all(s["active"] is False for s in by_name[name]["schedules"])


def test_readme_deployment_block_sets_no_variable():
    block = readme_deployment_block()
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands[0].startswith("alma-r setup")
    assert any(c.startswith("prefect") and " deploy --all" in c for c in commands)
    assert (
        "prefect worker start --pool cpu-process &" in commands
        and "prefect worker start --pool gpu &" in commands
    )
    assert commands[-1] == "prefect deployment run build-alma-r/tiny-cpu --watch"
    assert not any(re.match(r"(export |\w+=)", c) for c in commands), commands
    assert "ALMA_R_HOME" not in (REPO / "README.md").read_text() + (REPO / "prefect.yaml").read_text()


def throwaway_checkout(root: Path) -> Path:
    """The files `prefect deploy` and the workers read (prefect.yaml, flows/, configs/), with configs/tiny.yaml
    shrunk to the end-to-end test's size: the README's `build-alma-r/tiny-cpu` run as written, in a minute."""
    checkout = root / "checkout"
    checkout.mkdir()
    shutil.copy2(REPO / "prefect.yaml", checkout / "prefect.yaml")
    for folder in ("flows", "configs"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    for source in cfg["ingest"]["sources"]:
        source["max_segments"] = 200 if source["split"] == "train" else 6
    for key, value in parse_overrides(MINI):
        *sections, leaf = key.split(".")
        node = cfg
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    (checkout / "configs" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return checkout


def test_readme_deployment_block_runs_as_written(tmp_path):
    checkout = throwaway_checkout(tmp_path)
    second = {"overrides": ["train.max_steps=4", "run.stage_deployment=alma-r-stage/gpu"]}
    # nothing the README does not set: no Prefect setting (the script provides the server) and no alma-r one
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALMA_R"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", "scripts/deploy_check.sh", str(checkout), json.dumps(second)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(done.stdout[-20000:])  # shown by pytest when a later assertion fails
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert "README.md deployment block: exit code 0" in done.stdout
    # the workers ran the flows in the checkout `prefect deploy` ran in: its relative run.root holds the run
    run = json.loads((checkout / "runs" / "tiny" / "run.json").read_text())
    assert run["status"] == "completed" and run["config_path"] == "configs/tiny.yaml"
    assert run["stages"]["train"]["cached"] is False and run["stages"]["train"]["counts"]["steps"] == 4
    # (a source file edited between the two runs changes every key that covers it: run this on a quiet tree)
    assert run["stages"]["generate"]["cached"] is True, {k: s["cached"] for k, s in run["stages"].items()}
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
