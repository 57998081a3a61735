"""A rehearsal of the paper recipe, offline: `alma-r run --config configs/alma-13b-r.yaml` runs to completion on
a CPU against a Hugging Face cache in the Hub's own on-disk layout that holds small stand-ins under the paper's
real ids (tests/hub_cache.py::build_paper_cache), with HF_HUB_OFFLINE=1 and only size overrides.

What it proves: every model, adapter, COMET checkpoint and dataset the config names is resolved by its id and
revision from the standard cache (run.json records each with the commit it resolved to), the pickle-only adapter
is converted once, the published translations and human labels flow into the triplets, and the report names
the paper's metrics with their ids. What it cannot prove: anything about the real models' sizes or scores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alma_r.config import parse_overrides
from tests.conftest import REPO
from tests.hub_cache import hub_env

CONFIG = REPO / "configs/alma-13b-r.yaml"

# The only settings a CPU rehearsal may change: sizes (sources per direction, steps, beams, lengths, batch),
# the dtype (bfloat16 matmuls on a CPU are slow, not wrong) and where the run is written. A run that needs any
# other override to complete is a config that would not run for a user either.
ALLOWED_OVERRIDES = {
    "ingest.max_segments_per_source": "sources per direction (train and test)",
    "train.max_steps": "optimizer steps",
    "train.batch_size": "pairs per step",
    "train.gradient_accumulation_steps": "steps per update",
    "train.save_steps": "checkpoint cadence",
    "evaluate.num_beams": "beams",
    "evaluate.max_new_tokens": "output length",
    "evaluate.bootstrap_samples": "significance resamples",
    "model.dtype": "float32 on a CPU",
    "score.processes": "COMET workers (0 = one per GPU)",
    "run.root": "where runs are written",
}
OVERRIDES = [
    "ingest.max_segments_per_source=4",
    "train.max_steps=2",
    "train.batch_size=2",
    "train.gradient_accumulation_steps=1",
    "train.save_steps=1",
    "evaluate.num_beams=2",
    "evaluate.max_new_tokens=8",
    "evaluate.bootstrap_samples=20",
    "model.dtype=float32",
    "score.processes=1",
]


def offline_env(hf_home: Path, **extra) -> dict:
    return hub_env(
        hf_home,
        drop=("PREFECT_",),
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
        **extra,
    )


def test_the_rehearsal_changes_sizes_only():
    keys = [key for key, _ in parse_overrides(OVERRIDES)]
    assert set(keys) <= set(ALLOWED_OVERRIDES), set(keys) - set(ALLOWED_OVERRIDES)


@pytest.fixture(scope="module")
def rehearsal(paper_cache, tmp_path_factory):
    hf_home, written = paper_cache
    work = tmp_path_factory.mktemp("rehearsal")
    runs = work / "runs"
    overrides = [*OVERRIDES, f"run.root={runs}"]
    assert {k for k, _ in parse_overrides(overrides)} <= set(ALLOWED_OVERRIDES)
    env = offline_env(hf_home, PREFECT_HOME=str(work / "prefect"))
    cmd = [sys.executable, "-m", "alma_r.cli", "run", "--config", str(CONFIG)]
    for item in overrides:
        cmd += ["--set", item]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    run_dir = runs / "alma-13b-r"
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return run_dir, json.loads((run_dir / "run.json").read_text()), written, done


def test_the_paper_config_runs_to_completion_offline(rehearsal):
    run_dir, record, _, _ = rehearsal
    assert record["status"] == "completed"
    assert all(stage["status"] == "completed" for stage in record["stages"].values())
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").is_file()


def test_every_hub_item_is_resolved_by_its_paper_id_and_revision(rehearsal):
    _, record, written, _ = rehearsal
    resolved = {(h["repo_type"], h["repo_id"]): h for h in record["hub"]}
    expected = {
        ("model", "haoranxu/ALMA-13B-Pretrain"): "refs/pr/4",
        ("model", "haoranxu/ALMA-13B-Pretrain-LoRA"): "main",
        ("model", "Unbabel/XCOMET-XXL"): None,
        ("model", "Unbabel/wmt23-cometkiwi-da-xxl"): None,
        ("model", "Unbabel/wmt22-cometkiwi-da"): None,
        ("model", "Unbabel/wmt22-comet-da"): None,
        ("dataset", "haoranxu/ALMA-R-Preference"): "main",
        ("dataset", "haoranxu/WMT22-Test"): "main",
        ("dataset", "haoranxu/WMT23-Test"): "main",
    }
    for (repo_type, repo_id), revision in expected.items():
        item = resolved.get((repo_type, repo_id))
        assert item is not None, f"{repo_type} {repo_id} missing from run.json's hub: {sorted(resolved)}"
        assert item["revision"] == revision
        assert item["commit"] == written[repo_id][revision or "main"], repo_id


def test_the_triplets_come_from_the_published_candidates_and_labels(rehearsal):
    run_dir, record, _, _ = rehearsal
    from alma_r.data.io import read_rows
    from alma_r.data.schemas import PAIRS

    pairs = read_rows(run_dir / "select" / "pairs.parquet", PAIRS)
    assert pairs and {p["lp"] for p in pairs} == {
        f"{a}-{b}" for x in ("cs", "de", "is", "ru", "zh") for a, b in ((x, "en"), ("en", x))
    }
    systems = {p["chosen_system"] for p in pairs} | {p["rejected_system"] for p in pairs}
    assert systems <= {"reference", "gpt4", "alma-13b-lora"}
    stats = json.loads((run_dir / "select" / "stats.json").read_text())
    assert any("human" in key and value for key, value in stats.items() if isinstance(value, int)), stats


def test_the_report_names_the_paper_metrics_with_their_ids(rehearsal):
    run_dir, *_ = rehearsal
    report = (run_dir / "report.md").read_text()
    for name in ("KIWI-22", "KIWI-XXL", "XCOMET-XXL", "COMET-22", "BLEU", "chrF"):
        assert name in report, name
    for model_id in (
        "Unbabel/wmt22-cometkiwi-da",
        "Unbabel/wmt23-cometkiwi-da-xxl",
        "Unbabel/XCOMET-XXL",
        "Unbabel/wmt22-comet-da",
    ):
        assert model_id in report, model_id
    assert "nrefs:1" in report  # a sacreBLEU signature
