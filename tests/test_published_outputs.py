"""Our evaluation path on the published ALMA-13B-R outputs (in the development data folder beside the
repository) reproduces sacreBLEU's CLI for all ten WMT'22/21 directions, and the figures that folder's README
gives, to two decimals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alma_r.data.readers import read_aligned_text, read_lines
from alma_r.tasks.evaluate import score_systems
from tests.conftest import SHARED_DATA, needs_shared_data

SHARED = SHARED_DATA / "alma" / "outputs" / "wmt22_outputs"
# The development data's README, measured with sacrebleu 2.6.0: (BLEU, chrF).
README = {
    "cs-en": (44.29, 68.15),
    "de-en": (30.94, 56.55),
    "is-en": (39.65, 62.68),
    "ru-en": (38.95, 65.33),
    "zh-en": (23.21, 54.88),
    "en-cs": (26.25, 54.03),
    "en-de": (27.64, 57.61),
    "en-is": (22.85, 53.36),
    "en-ru": (24.10, 51.69),
    "en-zh": (34.05, 33.04),
}
needs_published_outputs = needs_shared_data(SHARED)


def cli(ref: Path, hyp: Path, tokenize: str) -> tuple[float, float]:
    sacrebleu = str(Path(sys.executable).parent / "sacrebleu")
    out = subprocess.run(
        [sacrebleu, str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "--tokenize", tokenize, "-b", "-w", "2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    bleu, chrf = json.loads(out)  # with -b and two metrics the CLI prints a JSON list
    return float(bleu), float(chrf)


@needs_published_outputs
@pytest.mark.parametrize("lp", sorted(README))
def test_published_alma_13b_r_scores_equal_sacrebleu_cli(lp):
    src, tgt = lp.split("-")
    folder = f"{src}{tgt}"
    src_file = SHARED / "wmt-testset" / folder / f"test.{src}-{tgt}.{src}"
    ref_file = SHARED / "wmt-testset" / folder / f"test.{src}-{tgt}.{tgt}"
    hyp_file = SHARED / "ALMA-13B-R" / folder / f"test.{src}-{tgt}.{tgt}"
    tests = read_aligned_text(src_file, ref_file, lp, [lp], "test", origin="wmt22")
    hyps = read_lines(hyp_file)
    assert len(hyps) == len(tests)
    results, _, _ = score_systems(tests, {"ALMA-13B-R": hyps})
    ours = {r["metric"]: r for r in results}
    tokenize = "zh" if tgt == "zh" else "13a"
    expected = cli(ref_file, hyp_file, tokenize)
    assert (round(ours["bleu"]["score"], 2), round(ours["chrf"]["score"], 2)) == expected
    assert expected == README[lp]
    assert f"tok:{tokenize}" in ours["bleu"]["signature"] and "nc:6" in ours["chrf"]["signature"]


@needs_published_outputs
def test_report_table_lists_published_scores_and_signatures():
    from alma_r.tasks.shared.report_sections import results_section

    results = []
    for lp in sorted(README):
        src, tgt = lp.split("-")
        folder = f"{src}{tgt}"
        tests = read_aligned_text(
            SHARED / "wmt-testset" / folder / f"test.{src}-{tgt}.{src}",
            SHARED / "wmt-testset" / folder / f"test.{src}-{tgt}.{tgt}",
            lp,
            [lp],
            "test",
            origin="wmt22",
        )
        hyps = read_lines(SHARED / "ALMA-13B-R" / folder / f"test.{src}-{tgt}.{tgt}")
        results += score_systems(tests, {"ALMA-13B-R": hyps})[0]
    section = results_section(results)
    bleu_table = section.split("### wmt22: BLEU")[1].split("###")[0]
    chrf_table = section.split("### wmt22: chrF")[1].split("###")[0]
    for lp, (bleu, chrf) in README.items():
        assert f"{lp} (n=" in bleu_table
        assert f"{bleu:.2f}" in bleu_table and f"{chrf:.2f}" in chrf_table, lp
    assert "tok:zh" in section and "tok:13a" in section and "nc:6" in section


def test_evaluate_help_shows_no_development_data_paths(capsys):
    from alma_r.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    shown = capsys.readouterr().out
    assert "--testset-dir path/to/wmt-testset" in shown and "shared" not in shown


def test_evaluate_cli_mixes_a_model_and_a_file(tmp_path, tiny_model_dir):
    from alma_r.cli import main
    from alma_r.config import SAMPLE_DIR
    from alma_r.data.io import read_rows
    from alma_r.data.schemas import EVAL_RESULTS

    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--test-set",
            "wmt22",
            "--lps",
            "de-en",
            "en-de",
            "--testset-dir",
            str(SAMPLE_DIR / "wmt22"),
            "--max-segments",
            "5",
            "--num-beams",
            "1",
            "--max-new-tokens",
            "8",
            "--bootstrap-samples",
            "100",
            "--system",
            f"tiny=hf:{tiny_model_dir}",
            "--system",
            f"ALMA-13B-R=file:{SAMPLE_DIR}/alma13br/{{xxyy}}/test.{{src}}-{{tgt}}.{{tgt}}",
            "--output",
            str(out),
            "--decoding",
            "mbr",
            "--candidates",
            "3",
        ]
    )
    assert code == 0
    rows = read_rows(out / "eval.parquet", EVAL_RESULTS)
    systems = ("tiny", "tiny+qe_rerank", "tiny+mbr", "ALMA-13B-R")  # the model's beams reranked two ways
    assert {(r["system"], r["lp"], r["metric"]) for r in rows} == {
        (s, lp, m) for s in systems for lp in ("de-en", "en-de") for m in ("bleu", "chrf")
    }
    assert all((r["p_value"] is None) == (r["system"] == "tiny") for r in rows)
    assert "| tiny |" in (out / "report.md").read_text()
