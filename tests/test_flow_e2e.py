"""The whole build-alma-r flow on a miniature config: every stage runs, the second run reuses every stage."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO
from tests.helpers import files_digest

MINI = [
    "sft.max_steps=8",
    "sft.batch_size=8",
    "generate.max_sources_per_lp=6",
    "generate.systems=[{name: greedy, max_new_tokens: 12},"
    " {name: sample, do_sample: true, max_new_tokens: 12}]",
    "train.max_steps=3",
    "train.batch_size=2",
    "train.save_steps=2",
    "train.logging_steps=1",
    "evaluate.num_beams=2",
    "evaluate.max_new_tokens=12",
    "model.tiny.vocab_size=400",
    "model.tiny.num_hidden_layers=1",
    "model.tiny.intermediate_size=128",
]


def mini_config(tmp_path: Path) -> Path:
    """configs/tiny.yaml with fewer lines per source, written to tmp_path (its sample: paths still resolve)."""
    cfg = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    for source in cfg["ingest"]["sources"]:
        source["max_segments"] = 200 if source["split"] == "train" else 6
    cfg["run"]["root"] = str(tmp_path / "runs")
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


STARTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_harness):
    from alma_r.flows.build_alma_r import build_alma_r

    tmp = tmp_path_factory.mktemp("e2e")
    config = mini_config(tmp)
    # The Prefect server is the session's: other test files on this worker leave artifacts of their own runs
    # (a deliberately failing stage ends its progress at 0); this module's are the ones created from here on.
    STARTED["e2e"] = time.time()
    run_dir = Path(build_alma_r(config_path=str(config), overrides=MINI))
    first = json.loads((run_dir / "run.json").read_text())
    report_mtime = (run_dir / "train" / "adapter").stat().st_mtime
    run_dir_again = Path(build_alma_r(config_path=str(config), overrides=MINI))
    second = json.loads((run_dir / "run.json").read_text())
    return run_dir, first, second, run_dir_again, report_mtime


STAGES = ["ingest", "prepare_model", "sft", "generate", "score", "select", "train", "evaluate", "report"]


def test_every_stage_completes_then_is_reused(finished_run):
    run_dir, first, second, again, _ = finished_run
    assert again == run_dir
    assert list(first["stages"]) == STAGES
    assert all(s["status"] == "completed" and s["cached"] is False for s in first["stages"].values())
    assert all(s["status"] == "completed" and s["cached"] is True for s in second["stages"].values())
    assert first["status"] == second["status"] == "completed"


def test_outputs_follow_the_contracts(finished_run):
    run_dir, first, *_ = finished_run
    from alma_r.data.io import read_rows
    from alma_r.data.schemas import EVAL_RESULTS, PAIRS

    pairs = read_rows(run_dir / "select" / "pairs.parquet", PAIRS)
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(p["chosen_score"] >= p["rejected_score"] for p in pairs)
    results = read_rows(run_dir / "evaluate" / "eval.parquet", EVAL_RESULTS)
    systems = {(r["lp"], r["system"]) for r in results}
    for lp in ("de-en", "en-de"):
        assert {(lp, "baseline"), (lp, "cpo"), (lp, "ALMA-13B-R (published)")} <= systems
    adapter = run_dir / "train" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert len(pq.read_table(run_dir / "evaluate" / "hypotheses.parquet")) == 3 * 12


def test_report_lists_both_directions_and_signatures(finished_run):
    run_dir, *_ = finished_run
    report = (run_dir / "report.md").read_text()
    assert "| baseline |" in report and "| cpo |" in report
    assert "de-en (n=6)" in report and "en-de (n=6)" in report
    assert "tok:13a" in report and "chrF" in report


def test_second_run_did_not_retrain(finished_run):
    run_dir, _, _, _, adapter_mtime = finished_run
    assert (run_dir / "train" / "adapter").stat().st_mtime == adapter_mtime


def test_report_html_plots_and_model_card(finished_run):
    import struct

    run_dir, *_ = finished_run
    report = run_dir / "report"
    plots = sorted(report.glob("*.png"))
    assert {p.name for p in plots} >= {"bars_bleu.png", "bars_chrf.png", "distribution_chrf.png"}
    for png in plots:
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width >= 300 and height >= 200, png.name
    page = (report / "report.html").read_text()
    assert "<table>" in page and page.count("data:image/png;base64,") >= len(plots) + 1  # + training curves
    for attribute in ("src=", "href="):
        for value in page.split(attribute)[1:]:
            assert not value.lstrip("\"'").startswith(("http:", "https:", "//")), value[:80]
    assert "<link" not in page and "<script" not in page
    card = (report / "model" / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: peft\n")
        and "## Evaluation" in card
        and "## Data provenance" in card
    )
    assert (report / "model" / "adapter_model.safetensors").is_file()
    assert "†" in (run_dir / "report.md").read_text() or "p < 0.05" in (run_dir / "report.md").read_text()


def flow_task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}


def test_deleted_or_damaged_output_recomputes_instead_of_a_dead_path(finished_run, tmp_path):
    """Prefect's record of a finished stage is trusted only while its folder holds readable outputs; `force`
    recomputes a stage whose outputs are intact. The stages after it keep their cache: same inputs, same key."""
    from alma_r.flows.build_alma_r import build_alma_r

    run_dir, *_ = finished_run
    config = run_dir.parent.parent / "mini.yaml"
    (run_dir / "select" / "pairs.parquet").unlink()
    damaged = run_dir / "score" / "scores" / "chrf.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated: the footer is gone

    state = build_alma_r(config_path=str(config), overrides=MINI, force=["generate"], return_state=True)
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    tasks = flow_task_states(state.state_details.flow_run_id)
    for stage in ("generate", "score", "select"):
        assert stages[stage]["cached"] is False, stage
    assert tasks["generate"] == tasks["score"] == tasks["select"] == "Completed"
    for stage, task in (("ingest", "ingest"), ("sft", "sft"), ("train", "train"), ("evaluate", "evaluate")):
        assert stages[stage]["cached"] is True and tasks[task] == "Cached", stage
    assert pq.read_table(run_dir / "select" / "pairs.parquet").num_rows > 0
    assert pq.read_table(damaged).num_rows > 0


def test_ui_artifacts_progress_tables_and_report(finished_run):
    """The Prefect UI shows a progress bar per GPU stage (ended at 100%), the training and evaluation tables and
    the report."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    progress = [a for a in artifacts if a.type == "progress" and a.created.timestamp() >= STARTED["e2e"]]
    stages = {a.description.split(":")[0] for a in progress}
    assert {"sft", "generate", "score", "train", "evaluate"} <= stages
    assert all(float(a.data) == 100.0 for a in progress)
    keys = {a.key for a in artifacts if a.key}
    assert {"alma-r-train-metrics", "alma-r-eval-tiny", "alma-r-report-tiny", "alma-r-scores-tiny"} <= keys


def test_a_changed_result_setting_sets_the_old_outputs_aside(finished_run):
    """Last in this module: it retrains the shared run. train.beta changes the train key: the finished train
    folder is moved, whole and byte-identical, to .superseded/train-<old key>/, which run.json and the report
    name; nothing of it is deleted. train.logging_steps alone would not have changed the key."""
    from alma_r.flows.build_alma_r import build_alma_r
    from alma_r.tasks.runtime.stage import SUPERSEDED

    run_dir, *_ = finished_run
    config = run_dir.parent.parent / "mini.yaml"
    before = files_digest(run_dir / "train")
    old_key = json.loads((run_dir / "train" / "_COMPLETE.json").read_text())["key"]

    build_alma_r(config_path=str(config), overrides=[*MINI, "train.logging_steps=1"])
    harmless = json.loads((run_dir / "run.json").read_text())
    assert harmless["stages"]["train"]["cached"] is True and "superseded" not in harmless

    build_alma_r(config_path=str(config), overrides=[*MINI, "train.beta=0.2"])
    record = json.loads((run_dir / "run.json").read_text())
    aside = run_dir / SUPERSEDED / f"train-{old_key}"
    assert files_digest(aside) == before
    assert record["stages"]["train"]["cached"] is False
    # evaluate and report are set aside too: they read the old adapter ("an earlier stage's outputs changed")
    assert sorted(e["stage"] for e in record["superseded"]) == ["evaluate", "report", "train"]
    [entry] = [e for e in record["superseded"] if e["stage"] == "train"]
    assert entry["path"] == str(aside) and "train.beta 0.1 -> 0.2" in entry["why"]
    for stage in ("ingest", "prepare_model", "sft", "generate", "score", "select"):
        assert record["stages"][stage]["cached"] is True, stage
    report = (run_dir / "report.md").read_text()
    assert (
        str(aside) in report and "set aside, not deleted (settings changed: train.beta 0.1 -> 0.2)" in report
    )
