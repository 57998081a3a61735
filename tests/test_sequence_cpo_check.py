"""`alma-r sequence-cpo` end to end at a reduced size: CPO with truncation negatives must raise the margin of
the ground truth over its truncations, and the doc it writes must parse back to the same numbers."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from alma_r.cli import sequence_cpo as sequence_cpo_cli
from alma_r.experiments import sequence_cpo_check as sc
from alma_r.experiments import sequence_cpo_report as report

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


SIZES = replace(
    sc.CheckSizes(),
    train_sentences=3000,
    mle_steps=100,
    continue_sources=240,  # = steps x batch: every source is used once
    steps=30,
    batch=8,
    lr=3e-4,
    test_sources=100,
    samples_per_source=1,
    scorer_hidden=128,
    scorer_layers=2,
    scorer_intermediate=224,
    scorer_steps=120,
    wise_alphas=(0.5,),
    rows=("mle", "an", "tn"),
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("sequence-cpo")
    return sc.run_seed(SIZES, 0, root / "work", root / "cache")


def test_cpo_with_truncation_negatives_prefers_the_full_ground_truth_more(result):
    start, tn, mle = (result.metrics[r] for r in ("start", "tn", "mle"))
    # the margin log pi(y) - log pi(y[:c] + EOS) over held-out references, which TN negatives train
    assert tn["truncation_margin"] > start["truncation_margin"] + 1.0, (tn, start)
    for row in result.metrics.values():
        assert all(math.isfinite(v) for v in row.values())
        assert row["reverse_kl"] == row["reverse_kl"] and 0 <= row["oracle"] <= 1
    assert set(result.metrics) == {"start", "mle", "an", "tn", "wise:tn:0.50"}
    assert mle != start  # continued MLE trained
    # AN negatives were generated offline into the generation stage's Parquet files and trained on
    work = result.start_dir.parent.parent  # <work>/start/model
    assert sorted(p.name for p in (work / "an-candidates").glob("*.parquet")) == [
        f"an-{k}.parquet" for k in (1, 2, 3, 4)
    ]
    assert json.loads((work / "an" / "train_summary.json").read_text())["negative_kinds"] == ["an"] * 4


def test_the_doc_table_parses_back_and_keeps_the_hand_written_text(result, tmp_path):
    doc = tmp_path / "sequence-cpo.md"
    doc.write_text(
        "# title\n\nintro\n\n<!-- sequence-cpo:start -->\nold\n<!-- sequence-cpo:end -->\n\nmy notes\n"
    )
    section = report.render_section([result], SIZES, "alma-r sequence-cpo --rows mle,an,tn", 60.0)
    text = report.update_doc(doc, section).read_text()
    assert text.startswith("# title\n\nintro\n") and text.endswith("\n\nmy notes\n") and "\nold\n" not in text
    parsed = report.parse_table(text)
    assert list(parsed) == [report.row_label(r) for r in result.metrics]
    for row, metrics in result.metrics.items():
        for key, label in report.COLUMNS:
            assert parsed[report.row_label(row)][label] == pytest.approx(metrics[key], abs=5e-4)
    assert "`alma-r sequence-cpo --rows mle,an,tn`" in text and "exact match" in text
    assert len(report.comparisons([result])) == 3  # an, tn and the WiSE-FT row, each against continued MLE


def test_the_check_fails_when_the_loss_is_inverted(result, tmp_path, monkeypatch):
    """The same TN row with the ground truth and the negatives' roles swapped (log-ratios negated) must not
    pass the margin check: the check can tell a working loss from a broken one."""
    import alma_r.models.sequence.trainer as trainer
    from alma_r.models import synthetic
    from alma_r.models.loading import load_model, load_tokenizer

    real = trainer.best_of_k_loss
    monkeypatch.setattr(trainer, "best_of_k_loss", lambda policy, ref, beta: real(-policy, -ref, beta))
    task = synthetic.make_task(
        0, SIZES.train_sentences, SIZES.continue_sources, SIZES.test_sources, p_drop_adj=0.0
    )
    broken = sc.train_cpo(result.start_dir, task.preference, SIZES, 0, tmp_path / "tn", run="tn")
    margin = sc.truncation_margin(load_model(str(broken)), load_tokenizer(str(broken)), task.test)
    assert not margin > result.metrics["start"]["truncation_margin"] + 1.0, margin


def test_the_cli_knows_the_rows_of_the_check():
    assert sequence_cpo_cli.ROW_NAMES == tuple(sc.RUNS) and sequence_cpo_cli.DEFAULT_ROWS == sc.DEFAULT_ROWS


def test_the_committed_doc_holds_a_full_table_written_by_the_command():
    text = report.DOC_PATH.read_text(encoding="utf-8")
    assert text.count(report.START) == 1 and text.count(report.END) == 1 and "## What it shows" in text
    parsed = report.parse_table(text)
    assert {report.row_label(r) for r in ("start", *sc.RUNS)} <= set(parsed)
    for row in parsed.values():
        assert set(row) == {label for _, label in report.COLUMNS} and all(
            math.isfinite(v) for v in row.values()
        )
    assert "- Command: `alma-r sequence-cpo --seeds" in text
