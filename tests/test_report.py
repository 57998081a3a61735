"""The report's first screen (tasks/report.py): what was run, the headline table, stage times and what was
cached, warnings, links; for `model.base: tiny`, the smoke-test line. Rendered from hand-made stage outputs,
no flow run (tests/test_flow_e2e.py checks the report of a real run)."""

from __future__ import annotations

import json
from pathlib import Path

from alma_r.config import load_config
from alma_r.data.io import write_table
from alma_r.data.schemas import EVAL_RESULTS, HYPOTHESES
from alma_r.tasks.report import SMOKE_TEST, markdown_to_html, render_report
from alma_r.tasks.runtime.stage import StageResult

SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def finished_stages(run_dir: Path) -> list[StageResult]:
    """The StageResults the report stage gets after a run, with the files it reads."""
    (run_dir / "select").mkdir(parents=True)
    (run_dir / "train" / "adapter").mkdir(parents=True)
    (run_dir / "evaluate").mkdir(parents=True)
    results = [
        {"test_set": "wmt22", "lp": lp, "system": system, "metric": metric, "score": score, "signature": SIGNATURE,
         "n_segments": 6, "p_value": p}
        for lp in ("de-en", "en-de")
        for metric, base, cpo in (("bleu", 1.0, 2.5), ("chrf", 20.0, 19.0))
        for system, score, p in (("baseline", base, None), ("cpo", cpo, 0.01 if metric == "bleu" else 0.4))
    ]  # fmt: skip
    write_table(results, run_dir / "evaluate" / "eval.parquet", EVAL_RESULTS)
    hypotheses = [
        {"segment_id": f"s{i}", "test_set": "wmt22", "lp": "de-en", "system": system, "hypothesis": text}
        for i in range(6)
        for system, text in (("baseline", "" if i < 2 else "ein Satz"), ("cpo", "a sentence"))
    ]
    write_table(hypotheses, run_dir / "evaluate" / "hypotheses.parquet", HYPOTHESES)
    stats = {"pairs": 8, "dropped": {"no_margin": 3}, "by_lp": {"de-en": {"pairs": 8, "chosen": {"reference": 8},
             "rejected": {"greedy": 8}}}}  # fmt: skip
    (run_dir / "select" / "stats.json").write_text(json.dumps(stats))
    summary = {"steps": 6, "pairs_used": 8, "trainable_parameters": 12288, "device": "cpu",
               "skipped": {"prompt_too_long": 0, "too_long": 0}}  # fmt: skip
    (run_dir / "train" / "train_summary.json").write_text(json.dumps(summary))
    record = {"loss": 2.0, "nll_loss": 1.5, "rewards/margins": 0.2, "rewards/accuracies": 0.75}
    (run_dir / "train" / "metrics.jsonl").write_text(json.dumps(record) + "\n")

    def stage(name, counts, outputs=None, cached=False, seconds=1.0):
        return StageResult(name, f"key-{name}", outputs or {}, counts, cached, seconds)

    return [
        stage("ingest", {"segments": 412, "test/de-en": 6, "test/en-de": 6, "train/de-en": 200, "train/en-de": 200},
              cached=True, seconds=1.3),
        stage("prepare_model", {"built": True}, cached=True, seconds=6.0),
        stage("sft", {"pairs": 400, "pairs_used": 230, "steps": 8, "skipped_prompt_too_long": 12,
                      "skipped_too_long": 158}, cached=True, seconds=18.9),
        stage("generate", {"sources": 12, "skipped_prompt_too_long": 4, "skipped_prompt_too_long/de-en": 3,
                           "skipped_prompt_too_long/en-de": 1, "skipped_prompt_too_long/cs-en": 0,
                           "greedy/generated": 8, "greedy/skipped_prompt_too_long": 4,
                           "sample/generated": 8, "sample/skipped_prompt_too_long": 4}, seconds=11.6),
        stage("score", {"chrf/requests": 24, "chrf/distinct": 24, "chrf/from_cache": 0, "chrf/scored": 24}),
        stage("select", {"pairs": 8}, {"stats": str(run_dir / "select" / "stats.json")}),
        stage("train", {"pairs_used": 8, "steps": 6, "resumed_from": 4},
              {"adapter": str(run_dir / "train" / "adapter"), "metrics": str(run_dir / "train" / "metrics.jsonl"),
               "summary": str(run_dir / "train" / "train_summary.json")}, seconds=8.7),
        stage("evaluate", {"test_segments": 12, "baseline/prompt_too_long": 1, "cpo/prompt_too_long": 0},
              {"eval": str(run_dir / "evaluate" / "eval.parquet"),
               "hypotheses": str(run_dir / "evaluate" / "hypotheses.parquet")}, seconds=12.2),
    ]  # fmt: skip


def test_first_screen_says_what_ran_the_headline_times_warnings_and_where_to_look(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    stages = finished_stages(run_dir)
    (run_dir / "run.json").write_text(
        json.dumps({"config_path": "configs/tiny.yaml", "overrides": ["train.beta=0.2"]})
    )
    plot = run_dir / "report" / "bars_bleu.png"
    cfg = load_config()
    report = render_report(cfg, run_dir, stages, [plot], base=run_dir)
    first_screen, details = report.split("\n## Results\n")
    lines = first_screen.splitlines()
    assert lines[0] == "# alma-r report: tiny" and lines[2] == SMOKE_TEST
    assert "near zero by design" in SMOKE_TEST
    assert "- Config: `configs/tiny.yaml`; overrides: `train.beta=0.2`; seed 42." in lines
    assert "base `tiny`" in first_screen and "trained: `train/adapter`" in first_screen
    assert "412 segments (test: de-en 6, en-de 6; train: de-en 200, en-de 200)" in first_screen
    # 12 sources, 4 of them skipped as too long
    assert "; 8 sources translated for candidates; 8 preference pairs" in first_screen
    assert "8 preference pairs; CPO: 6 steps on 8 pairs after SFT: 8 steps on 230 pairs" in first_screen
    # the headline: baseline -> cpo per direction and metric, the dagger only where p < 0.05
    assert "| test set | direction | BLEU | chrF |" in lines
    assert "| wmt22 | de-en (n=6) | 1.00 → 2.50 (+1.50)† | 20.00 → 19.00 (-1.00) |" in lines
    assert (
        "ingest 1.3 (cached) · prepare_model 6.0 (cached) · sft 18.9 (cached) · generate 11.6" in first_screen
    )
    assert "3 of 8 reused from an earlier run (cached), 5 computed by this one in 34.5 s" in first_screen
    warnings = first_screen.split("## Warnings\n\n")[1].split("\n\n## ")[0].splitlines()
    assert warnings == [
        "- sft: 170 training pairs skipped as too long (prompt or `sft.max_length`).",
        "- generate: 4 of 12 sources skipped for every system, their prompt exceeds `generate.max_prompt_tokens` "
        f"({cfg.generate.max_prompt_tokens}): de-en 3, en-de 1.",
        "- select: 3 sources gave no preference pair (no_margin: 3).",
        "- evaluate: 1 test prompts of `baseline` exceed `evaluate.max_prompt_tokens` "
        f"({cfg.evaluate.max_prompt_tokens}): empty hypotheses, counted, never cut.",
        "- evaluate: `baseline` produced 1 empty hypotheses of 6 (scored as such).",
        "- train: resumed from the checkpoint of step 4.",
    ]
    for link in ("(report/report.html)", "(report/bars_bleu.png)", "(report/model/README.md)", "(run.json)"):
        assert link in first_screen, link
    assert len(lines) < 50  # one screen
    # the detailed sections stay below it
    for section in ("## Scoring", "## Preference data", "## Training", "## Stages"):
        assert section in details
    page = markdown_to_html(first_screen, run_dir, "t")
    assert (
        '<a href="report/model/README.md">model card</a>' in page
        and "<strong>Smoke-test model.</strong>" in page
    )


def test_a_real_model_gets_no_smoke_test_line_and_links_follow_the_file(tmp_path):
    run_dir = tmp_path / "runs" / "big"
    stages = finished_stages(run_dir)  # no run.json: the stage ran outside a flow run
    cfg = load_config(overrides=["model.base=haoranxu/ALMA-13B-Pretrain", "run.name=big"])
    report = render_report(cfg, run_dir, stages, [], base=run_dir / "report")
    assert SMOKE_TEST not in report and "Smoke-test" not in report
    assert "- Config: `(not recorded)`; overrides: none" in report
    assert "base `haoranxu/ALMA-13B-Pretrain`" in report and "trained: `../train/adapter`" in report
    assert "(report.html)" in report and "(model/README.md)" in report and "(../run.json)" in report
