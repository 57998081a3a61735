"""Orchestration as users meet it: a real Prefect server, crashes, edits, deleted outputs, sharded scoring.

- SIGKILL during scoring, then during training: each rerun finds the finished stages Cached in Prefect's task
  states and run.json, recomputes the killed one (training resumes from its checkpoint), and every Parquet
  output reads back whole.
- A helper edited in a copy of the sources changes the code version of the stages that import it, not others.
- Sharded scoring on a local 2-worker Dask cluster equals unsharded scoring row for row.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, free_port, stop_process_group
from tests.test_flow_e2e import MINI, mini_config


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on loopback with its own PREFECT_HOME; stopped however the tests end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"prefect server did not start:\n{(home / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": url}
    finally:
        stop_process_group(server, grace_s=20)
        log.close()


FLOW = "import sys, json; from alma_r.flows.build_alma_r import build_alma_r; build_alma_r(sys.argv[1], json.loads(sys.argv[2]))"


def start_flow(env: dict, config: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", FLOW, str(config), json.dumps(overrides)],
        env=env,
        cwd=REPO,
        start_new_session=True,  # its own process group: the kill takes the stage child processes too
    )


def cached_generations(runs: Path) -> int:
    """Entries of the run root's generation cache (models/generate/cache.py), read while the flow writes it."""
    import sqlite3

    path = runs / "_cache" / "generations.sqlite"
    if not path.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM generations WHERE text IS NOT NULL").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0


def edited_sources(staging: Path) -> Path:
    """alma_r laid out as Python sees it (scripts/lint_imports.py), with two edits around the computation that
    change no result: a CLI module and a help text of the config schema. Returns the PYTHONPATH entry."""
    sys.path.insert(0, str(REPO / "scripts"))
    from lint_imports import stage_package

    staging.mkdir(parents=True)
    package = stage_package(REPO, staging)
    for sub in ("cli", "config"):
        (package / sub).unlink()
        shutil.copytree(REPO / "alma_r" / sub, package / sub, ignore=shutil.ignore_patterns("__pycache__"))
    cli = package / "cli" / "train.py"
    cli.write_text(cli.read_text() + "\n# an edit to the command line, no part of any stage's computation\n")
    run = package / "config" / "run.py"
    text = run.read_text()
    old = 'description="Run folder name: outputs go to <root>/<name>/."'
    assert old in text
    run.write_text(
        text.replace(old, 'description="Run folder name (edited help): outputs go to <root>/<name>/."')
    )
    return staging


def kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the flow ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def task_states(env: dict) -> list[dict[str, str]]:
    """Task-run states of every build-alma-r flow run, oldest run first: [{task name: state name}]."""
    script = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["build-alma-r"])),
                                 sort=FlowRunSort.START_TIME_ASC)
    out = []
    for run in runs:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        out.append({t.name.rsplit("-", 1)[0]: t.state.name for t in tasks})
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sigkill_in_generate_score_and_train_with_harmless_changes_between(prefect_server, tmp_path):
    """The flow (its process group) is SIGKILLed during generate, during score and during train after a
    checkpoint; before each rerun something changes that does not change a result: generate.batch_size, then
    train.logging_steps with an edited CLI module and config help text (a copy of the sources), then
    train.save_steps. Every rerun recomputes no finished stage, and training resumes from its checkpoint."""
    from alma_r.data.io import read_rows
    from alma_r.data.schemas import PAIRS
    from alma_r.models.score.tiny_comet import build_tiny_comet
    from tests.conftest import SAMPLE_DIR

    texts = (SAMPLE_DIR / "human_written/deen/train.de-en.en").read_text().splitlines()[:200]
    kiwi = build_tiny_comet(tmp_path / "kiwi", "kiwi", texts)
    config = mini_config(tmp_path)
    overrides = [
        *MINI,
        "train.max_steps=6",
        "train.save_steps=2",
        f"score.comet_models={{tiny_kiwi: {{model: {kiwi}}}}}",
        "score.metrics=[chrf, tiny_kiwi]",
        "select.metrics=[chrf, tiny_kiwi]",
        "select.normalize=zscore",  # chrF is 0-100, COMET 0-1: averaged raw, chrF alone would decide
    ]
    env = prefect_server
    run_dir = tmp_path / "runs" / "tiny"

    def stages() -> dict:
        return json.loads((run_dir / "run.json").read_text())["stages"]

    # 1. killed while generating, once the generation cache holds the first system's batch
    flow = start_flow(env, config, overrides)
    kill_when(flow, lambda: cached_generations(tmp_path / "runs") > 0)
    assert not (run_dir / "generate" / "_COMPLETE.json").exists()
    made_before_the_kill = cached_generations(tmp_path / "runs")

    # 2. another inference batch size; killed while scoring (the COMET model loading or scoring)
    flow = start_flow(env, config, [*overrides, "generate.batch_size=3"])
    kill_when(flow, lambda: (run_dir / "score" / "_IN_PROGRESS.json").exists())
    second = stages()
    for stage in ("ingest", "prepare_model", "sft"):
        assert second[stage]["cached"] is True, stage
    assert second["generate"]["cached"] is False and "score" not in second
    # generation resumed: what the killed run made comes from the cache, only the rest is generated
    assert second["generate"]["counts"]["from_cache"] == made_before_the_kill
    assert second["generate"]["counts"]["generated"] > 0

    # 3. another logging cadence, run from sources with an edited CLI module and config help text; killed in
    #    training after its second checkpoint
    edited = {**env, "PYTHONPATH": str(edited_sources(tmp_path / "edited"))}
    flow = start_flow(edited, config, [*overrides, "generate.batch_size=3", "train.logging_steps=1"])
    kill_when(flow, lambda: (run_dir / "train" / "checkpoints" / "step-4").exists())
    third = stages()
    for stage in ("ingest", "prepare_model", "sft", "generate"):
        assert third[stage]["cached"] is True, stage
    assert third["score"]["cached"] is False and third["select"]["cached"] is False
    assert "train" not in third

    # 4. another checkpoint cadence, to the end: everything before train is reused, train resumes
    flow = start_flow(edited, config, [*overrides, "train.logging_steps=1", "train.save_steps=3"])
    assert flow.wait(timeout=900) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and "superseded" not in record
    for stage in ("ingest", "prepare_model", "sft", "generate", "score", "select"):
        assert record["stages"][stage]["cached"] is True, stage
    assert record["stages"]["train"]["cached"] is False
    assert record["stages"]["train"]["counts"]["resumed_from"] == 4
    assert record["stages"]["train"]["counts"]["steps"] == 6

    states = task_states(env)
    assert len(states) == 4
    assert [states[1][s] for s in ("ingest", "prepare-model", "sft")] == ["Cached"] * 3
    assert states[1]["generate"] == "Completed"
    assert [states[2][s] for s in ("ingest", "prepare-model", "sft", "generate")] == ["Cached"] * 4
    assert states[2]["score"] == "Completed"
    assert [states[3][s] for s in ("ingest", "prepare-model", "sft", "generate", "score", "select")] == [
        "Cached"
    ] * 6
    assert states[3]["train"] == states[3]["evaluate"] == states[3]["report"] == "Completed"

    for path in run_dir.rglob("*.parquet"):
        pq.read_table(path)  # every Parquet output is whole
    assert read_rows(run_dir / "select" / "pairs.parquet", PAIRS)
    assert not list(run_dir.rglob("*.tmp*")), "a temporary file was left behind"
    assert not (run_dir / ".superseded").exists(), "nothing was set aside: no key changed"


def test_editing_a_helper_invalidates_the_stages_that_import_it(tmp_path):
    from alma_r.tasks.runtime.stage import code_version, module_closure

    # a copy of the sources, laid out as the package maps them (pyproject's package-dir)
    roots = {
        "alma_r": "alma_r",
        "alma_r.flows": "flows",
        "alma_r.tasks": "tasks",
        "alma_r.models": "models",
        "alma_r.data": "data",
    }
    for folder in set(roots.values()):
        shutil.copytree(
            REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "sample")
        )

    def locate(module: str) -> Path | None:
        for prefix, folder in sorted(roots.items(), key=lambda kv: -len(kv[0])):
            if module == prefix or module.startswith(prefix + "."):
                rest = module[len(prefix) :].lstrip(".").replace(".", "/")
                base = tmp_path / folder / rest
                for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
                    if candidate is not None and candidate.is_file():
                        return candidate
                return None
        return None

    score, ingest = "alma_r.tasks.score", "alma_r.tasks.ingest"
    assert "alma_r.models.score.scorers" in module_closure(score, locate)
    assert "alma_r.models.score.scorers" not in module_closure(ingest, locate)
    before = {m: code_version(m, locate) for m in (score, ingest)}
    helper = tmp_path / "models" / "score" / "scorers.py"
    helper.write_text(helper.read_text().replace("def ", "def  ", 1))  # a one-character edit of a helper
    after = {m: code_version(m, locate) for m in (score, ingest)}
    assert after[score] != before[score]
    assert after[ingest] == before[ingest]


def test_sharded_scoring_on_dask_equals_unsharded(tmp_path, prefect_harness):
    from alma_r.config import load_config
    from alma_r.data.io import read_rows, write_table
    from alma_r.data.schemas import CANDIDATES, SCORES, SEGMENTS
    from alma_r.flows.build_alma_r import score_shards, task_runner_for
    from alma_r.tasks.ingest import ingest_stage
    from alma_r.tasks.runtime.stage import StageResult
    from alma_r.tasks.score import score_merge_stage, score_stage

    config = mini_config(tmp_path)
    base = ["score.metrics=[chrf, consensus_chrf]", "run.stage_processes=false"]
    plain = load_config(config, [*base, "run.name=plain"])
    sharded = load_config(config, [*base, "run.name=sharded", "run.shards=2", "run.task_runner=dask"])
    segments = ingest_stage(plain, tmp_path / "inputs")
    rows = read_rows(segments.path("segments"), SEGMENTS)[:40]
    candidates = {}
    for name, edit in {"upper": str.upper, "cut": lambda t: t[: len(t) // 2]}.items():
        cand = [
            {
                "segment_id": r["id"],
                "lp": r["lp"],
                "system": name,
                "hypothesis": edit(r["ref"]),
                "model_id": "edit",
                "generation": "{}",
            }
            for r in rows
        ]
        candidates[f"candidates/{name}"] = str(
            write_table(cand, tmp_path / "inputs" / "candidates" / f"{name}.parquet", CANDIDATES)
        )
    generated = StageResult("generate", "k", candidates)

    unsharded = score_stage(plain, tmp_path / "plain", segments, generated)
    shards = score_shards.with_options(task_runner=task_runner_for(sharded))(
        sharded, tmp_path / "sharded", segments, generated
    )
    assert [s.stage for s in shards] == ["score_shard_0", "score_shard_1"]
    merged = score_merge_stage(sharded, tmp_path / "sharded", segments, generated, shards)
    for metric in ("chrf", "consensus_chrf"):
        a = read_rows(unsharded.path(f"scores/{metric}"), SCORES)
        b = read_rows(merged.path(f"scores/{metric}"), SCORES)
        assert len(a) == 3 * len(rows)
        assert a == b


def test_prune_cache_deletes_only_old_stage_records(tmp_path, capsys):
    from alma_r.cli import main

    old, new, other = (
        tmp_path / "alma-r-score-abc-123",
        tmp_path / "alma-r-train-def-456",
        tmp_path / "someone-else",
    )
    for path in (old, new, other):
        path.write_text("{}")
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old, (ten_days_ago, ten_days_ago))
    os.utime(other, (ten_days_ago, ten_days_ago))
    runs = tmp_path / "runs"
    old_aside, new_aside = runs / "r" / ".superseded" / "train-aaa", runs / "r" / ".superseded" / "train-bbb"
    for folder in (old_aside, new_aside):
        folder.mkdir(parents=True)
        (folder / "adapter.safetensors").write_text("weights")
    index = runs / "r" / ".superseded" / "index.jsonl"
    index.write_text("".join(json.dumps({"path": str(f)}) + "\n" for f in (old_aside, new_aside)))
    os.utime(old_aside, (ten_days_ago, ten_days_ago))
    args = ["prune-cache", "--older-than-days", "7", "--storage", str(tmp_path), "--runs", str(runs)]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert old.exists() and old_aside.exists()
    assert "would delete 1 of 2 stage cache records" in out and "1 of 2 set-aside output folders" in out
    assert main(args) == 0
    assert not old.exists() and new.exists() and other.exists()
    assert not old_aside.exists() and (new_aside / "adapter.safetensors").exists()
    assert [json.loads(line)["path"] for line in index.read_text().splitlines()] == [str(new_aside)]
    assert "deleted 1 of 2 stage cache records" in capsys.readouterr().out


def test_a_failing_stage_process_reports_its_error_and_is_not_retried(tmp_path):
    """The child's one-line error reaches the flow; bad input is not transient, a killed child is."""
    from prefect.states import Failed

    from alma_r.config import load_config
    from alma_r.tasks.ingest import ingest_stage
    from alma_r.tasks.runtime.prefect_stage import (
        StageProcessError,
        retry_if_transient,
        run_in_child_process,
        stage_request,
    )

    cfg = load_config(mini_config(tmp_path), ["ingest.sources=[]"])
    request = stage_request(ingest_stage, cfg, tmp_path / "run", ())
    with pytest.raises(StageProcessError) as failed:
        run_in_child_process("ingest", request, tmp_path / "run", tmp_path / "progress.json")
    assert "IngestError: <config>:0: ingest.sources is empty" in str(failed.value)
    assert failed.value.transient is False
    assert not list((tmp_path / "run" / ".scratch").iterdir()), "request/response files left behind"

    def state_of(err):
        return Failed(data=err)

    assert retry_if_transient(None, None, state_of(failed.value)) is False
    assert retry_if_transient(None, None, state_of(StageProcessError("killed", transient=True))) is True
    assert retry_if_transient(None, None, state_of(ConnectionError("reset"))) is True
    assert retry_if_transient(None, None, state_of(ValueError("bad row"))) is False
