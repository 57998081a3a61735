"""The sequence-cpo flow (flows/sequence_cpo.py) on a miniature of configs/sequence-cpo/dolly-tiny.yaml: every
stage runs, the report has one row per model, eq. 9/10 are finite, the WiSE-FT ends are the MLE and CPO
models bit for bit, a second run reuses every stage; the judge stage with a loopback judge; the config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alma_r.config import ConfigError, config_base_dir, config_from_json, config_to_json
from alma_r.config.sequence import SequenceRunConfig, load_sequence_config
from tests.conftest import REPO
from tests.test_config import assert_matches_yaml
from tests.test_judge import FakeJudge

CONFIG = REPO / "configs" / "sequence-cpo" / "dolly-tiny.yaml"
MINI = [
    "run.stage_processes=false",  # the child-process path is checked once, below, on a cheap stage
    "model.tiny.vocab_size=300",
    "model.tiny.num_hidden_layers=1",
    "model.tiny.intermediate_size=128",
    "mle.max_steps=6",
    "mle.batch_size=8",
    "negatives.samples=2",
    "negatives.max_new_tokens=12",
    "train.max_steps=2",
    "train.batch_size=4",
    "scorer.max_steps=6",
    "scorer.batch_size=8",
    "scorer.tiny.num_hidden_layers=1",
    "evaluate.max_new_tokens=12",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_harness):
    from alma_r.flows.sequence_cpo import sequence_cpo

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sequence-flow") / "runs"
    overrides = [*MINI, f"run.root={root}"]
    run_dir = Path(sequence_cpo(config_path=str(CONFIG), overrides=overrides))
    first = json.loads((run_dir / "run.json").read_text())
    trained_mtime = (run_dir / "train" / "model" / "model.safetensors").stat().st_mtime
    again = Path(sequence_cpo(config_path=str(CONFIG), overrides=overrides))
    second = json.loads((run_dir / "run.json").read_text())
    return run_dir, first, second, again, trained_mtime, overrides


def test_every_stage_completes_then_is_reused(finished_run):
    from alma_r.flows.sequence_cpo import STAGES

    run_dir, first, second, again, trained_mtime, _ = finished_run
    assert again == run_dir and first["flow"] == "sequence-cpo"
    # run.json records every stage the flow declares, in the flow's order
    assert list(first["stages"]) == list(second["stages"]) == list(STAGES)
    assert all(s["status"] == "completed" and s["cached"] is False for s in first["stages"].values())
    assert all(s["status"] == "completed" and s["cached"] is True for s in second["stages"].values())
    assert first["status"] == second["status"] == "completed"
    assert (run_dir / "train" / "model" / "model.safetensors").stat().st_mtime == trained_mtime
    # AN is on in the config: the generate stage wrote the CANDIDATES files that train read
    assert (
        first["stages"]["generate"]["counts"]["an-1/generated"]
        == first["stages"]["ingest"]["counts"]["train"]
    )
    assert first["stages"]["train"]["counts"]["sequences_per_example"] == 1 + 3 + 5 + 3 + 2
    assert first["stages"]["judge"]["counts"] == {"skipped": True}


def test_lora_training_runs_in_the_flow_and_wise_ft_interpolates_its_merged_model(prefect_harness, tmp_path):
    """train.finetune=lora: the train stage writes a PEFT adapter and the merged model; WiSE-FT and evaluation
    take the merged one (alpha 0 is it, bit for bit); the MLE model's weights are not what CPO returns."""
    from alma_r.flows.sequence_cpo import sequence_cpo

    torch.set_num_threads(1)
    lora = ["train.finetune=lora", "train.lora.target_modules=[q_proj,down_proj]", "train.learning_rate=1e-2"]
    overrides = [*MINI, f"run.root={tmp_path / 'runs'}", "run.name=dolly-lora", *lora]
    run_dir = Path(sequence_cpo(config_path=str(CONFIG), overrides=overrides))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    train = record["stages"]["train"]["outputs"]
    assert Path(train["adapter"], "adapter_model.safetensors").is_file()
    assert Path(train["model"]) == run_dir / "train" / "merged"
    summary = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert summary["finetune"] == "lora" and summary["trainable_parameters"] < 0.2 * sum(
        t.numel() for t in load_file(Path(train["model"]) / "model.safetensors").values()
    )
    merged = load_file(Path(train["model"]) / "model.safetensors")
    zero = load_file(Path(record["stages"]["wise_ft"]["outputs"]["alpha-0.00"]) / "model.safetensors")
    mle = load_file(Path(record["stages"]["mle"]["outputs"]["model"]) / "model.safetensors")
    assert all(same_bits(zero[n], merged[n]) for n in merged)
    assert any(not mle[n].equal(merged[n]) for n in mle)  # the adapter trained and was merged in


def report_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("model",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_has_one_row_per_model_with_finite_eq9_eq10(finished_run):
    run_dir, first, *_ = finished_run
    cfg = load_sequence_config(CONFIG)
    rows = report_rows((run_dir / "report.md").read_text())
    expected = ["mle"] + [f"alpha-{a:.2f}" for a in cfg.wise_ft.alphas]
    assert list(rows) == expected
    for name, cells in rows.items():
        alpha, nll_greedy, nll_samples, reverse_kl, win_rate = cells
        assert alpha == ("-" if name == "mle" else name.removeprefix("alpha-"))
        assert win_rate == "n/a"  # no judge configured
        for value in (nll_greedy, nll_samples, reverse_kl):
            assert math.isfinite(float(value))
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert (
        metrics["scored_as"] == "token ids"
        and metrics["items"] == first["stages"]["ingest"]["counts"]["test"]
    )
    for m in metrics["models"]:
        # eq. 10 is a mean of -log P-hat per token: positive, and below log|V| + slack for a model that learned
        assert 0 < m["nll_greedy"] < 50 and 0 < m["nll_samples"] < 50 and math.isfinite(m["reverse_kl"])
    assert (run_dir / "report" / "report.md").read_text() == (run_dir / "report.md").read_text()


def same_bits(a, b) -> bool:
    """Equal bytes (torch.equal would call -0.0 and 0.0 equal, and NaN unequal to itself)."""
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def test_wise_ft_ends_are_the_mle_and_cpo_models_bit_for_bit(finished_run):
    run_dir, first, *_ = finished_run
    outputs = first["stages"]["wise_ft"]["outputs"]
    mle = load_file(Path(first["stages"]["mle"]["outputs"]["model"]) / "model.safetensors")
    cpo = load_file(Path(first["stages"]["train"]["outputs"]["model"]) / "model.safetensors")
    one = load_file(Path(outputs["alpha-1.00"]) / "model.safetensors")
    zero = load_file(Path(outputs["alpha-0.00"]) / "model.safetensors")
    half = load_file(Path(outputs["alpha-0.50"]) / "model.safetensors")
    assert one.keys() == mle.keys() == zero.keys() == cpo.keys()
    for name in mle:
        assert same_bits(one[name], mle[name]) and same_bits(zero[name], cpo[name]), name
    # CPO moved the weights, so the middle of the grid is neither end (the test could not pass by copying)
    assert any(not mle[n].equal(cpo[n]) for n in mle)
    assert any(not half[n].equal(mle[n]) and not half[n].equal(cpo[n]) for n in mle)
    # and the evaluation sees the same model: identical numbers for the MLE row and alpha 1
    metrics = {
        m["system"]: m for m in json.loads((run_dir / "evaluate" / "metrics.json").read_text())["models"]
    }
    for key in ("nll_greedy", "nll_samples", "reverse_kl"):
        assert metrics["alpha-1.00"][key] == metrics["mle"][key]


def always_a(query: str, a: str, b: str) -> str:
    """A judge with nothing but position bias: every item is a tie in the two orders, win rate exactly 0.5."""
    return "A"


def test_judge_stage_asks_both_orders_and_the_report_shows_win_rates(finished_run, tmp_path):
    from alma_r.data.io import read_rows
    from alma_r.data.schemas import CANDIDATES, INSTRUCTIONS
    from alma_r.models.evaluate.judge import judge_prompts, wilson_interval
    from alma_r.tasks.runtime.stage import StageResult
    from alma_r.tasks.sequence.judge import judge_query, judge_stage
    from alma_r.tasks.sequence.report import report_stage

    run_dir, first, _, _, _, overrides = finished_run
    judge = FakeJudge(always_a)
    try:
        endpoint = (
            f"{{base_url: '{judge.endpoint.base_url}', model: fake-judge, api_key_env: null, max_retries: 0}}"
        )
        cfg = load_sequence_config(
            CONFIG, [*overrides, f"run.root={tmp_path}", f"judge={{endpoint: {endpoint}}}"]
        )
        done = {
            name: StageResult(name, name, s["outputs"], s["counts"]) for name, s in first["stages"].items()
        }
        judged = judge_stage(cfg, tmp_path, done["ingest"], done["evaluate"])
        report = report_stage(
            cfg, tmp_path, done["ingest"], done["mle"], done["train"], done["evaluate"], judged
        )
    finally:
        judge.close()
    items = first["stages"]["evaluate"]["counts"]["items"]
    systems = 1 + len(cfg.wise_ft.alphas)
    # Both orders of every (query, output, reference), each asked once: identical outputs of two systems (the
    # MLE model and alpha 1 always) are answered from the request cache.
    by_id = {r["id"]: r for r in read_rows(done["ingest"].path("instructions"), INSTRUCTIONS)}
    generations = read_rows(done["evaluate"].path("generations"), CANDIDATES)
    assert len(generations) == items * systems
    expected = judge_prompts(
        [judge_query(by_id[g["segment_id"]]) for g in generations],
        [g["hypothesis"] for g in generations],
        [by_id[g["segment_id"]]["response"] for g in generations],
        "dolly",
    )
    assert sorted(judge.prompts) == sorted(set(expected))
    win_rates = json.loads(judged.path("win_rates").read_text())
    low, high = wilson_interval(0.5, items)
    for system, result in win_rates.items():
        assert result["win_rate"] == 0.5 and result["invalid"] == 0, system
        assert result["ci_low"] == pytest.approx(low) and result["ci_high"] == pytest.approx(high)
    rows = report_rows(report.path("report").read_text())
    assert len(rows) == systems
    assert all(cells[-1] == f"0.500 [{low:.3f}, {high:.3f}]" for cells in rows.values())


# ------------------------------------------------------------------------------------------------- config


def test_shipped_config_loads_with_its_values():
    cfg = load_sequence_config(CONFIG)
    assert_matches_yaml(yaml.safe_load(CONFIG.read_text()), cfg.model_dump(mode="json"))
    assert config_base_dir(cfg) == CONFIG.parent
    assert 1.0 in cfg.wise_ft.alphas and 0.0 in cfg.wise_ft.alphas


def test_config_errors_name_the_key_and_value():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.betta'; did you mean 'beta'"):
        load_sequence_config(CONFIG, ["train.betta=2"])
    with pytest.raises(ConfigError, match=r"'wise_ft\.alphas'.*\[1\.5\]"):
        load_sequence_config(CONFIG, ["wise_ft.alphas=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="embedding_model .* plackett_luce only"):
        load_sequence_config(CONFIG, ["train.embedding_model=some/folder"])
    with pytest.raises(ConfigError, match="negatives.batch .* train.batch_size >= 2"):
        load_sequence_config(CONFIG, ["train.batch_size=1"])
    with pytest.raises(ConfigError, match="negative counts"):
        load_sequence_config(CONFIG, ["negatives={batch: 0, meanfield: 0, truncation: 0}"])


def test_cli_config_error_exits_2(tmp_path, capsys):
    from alma_r.cli import main

    assert main(["sequence-run", "--config", str(CONFIG), "--set", "mle.max_stepz=3"]) == 2
    assert "unknown key 'mle.max_stepz'" in capsys.readouterr().err


def test_a_gpu_stage_request_runs_in_a_child_process(tmp_path):
    """GPU stages run as `python -m alma_r.tasks.runtime.stage_process REQUEST RESPONSE`: the request carries the config
    class, so the child rebuilds a SequenceRunConfig (not the translation flow's RunConfig)."""
    from alma_r.tasks.runtime.prefect_stage import stage_request
    from alma_r.tasks.sequence.ingest import ingest_stage

    cfg = load_sequence_config(CONFIG, [f"run.root={tmp_path}"])
    request = stage_request(ingest_stage, cfg, tmp_path, ())
    again = config_from_json(request["config"])
    assert isinstance(again, SequenceRunConfig) and again == cfg and config_base_dir(again) == CONFIG.parent
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [sys.executable, "-m", "alma_r.tasks.runtime.stage_process", "request.json", "response.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "response.json").read_text())["result"]
    assert result["counts"]["examples"] == 40 and Path(result["outputs"]["instructions"]).is_file()
    with pytest.raises(ConfigError, match="not an alma_r config"):
        config_from_json({**config_to_json(cfg), "class": "os:system"})


def test_deployment_entry():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (entry,) = [d for d in spec["deployments"] if d["entrypoint"] == "flows/sequence_cpo.py:sequence_cpo"]
    assert entry["name"] == "dolly-tiny" and entry["work_pool"]["name"] == "cpu-process"
    assert (REPO / entry["parameters"]["config_path"]).resolve() == CONFIG
    assert entry["schedules"] and all(s["active"] is False for s in entry["schedules"])
    from alma_r.flows.sequence_cpo import sequence_cpo

    assert sequence_cpo.name == "sequence-cpo"  # deployment sequence-cpo/dolly-tiny


def test_an_unknown_force_stage_is_refused_before_anything_runs():
    from alma_r.flows.sequence_cpo import STAGES
    from alma_r.flows.steps import forced_stages

    assert (
        forced_stages(["train", "all"], STAGES) == {"train", "all"} and forced_stages(None, STAGES) == set()
    )
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]; stages are ingest, prepare_model"):
        forced_stages(["trian"], STAGES)
