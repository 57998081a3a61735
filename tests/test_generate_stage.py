"""The generate stage's backends: transformers (greedy, n samples, 5-shot prompts) and imported files (the
skip list shared by every system and the ingested backend: tests/test_skip_list.py)."""

from __future__ import annotations

import json

import pytest

from alma_r.config import SAMPLE_DIR, ConfigError, load_config
from alma_r.data.io import read_rows, write_table
from alma_r.data.readers import IngestError
from alma_r.data.schemas import CANDIDATES, SEGMENTS
from alma_r.models.loading import load_tokenizer
from alma_r.models.prompts import load_shots, make_prompt
from alma_r.tasks.generate import run_generate, system_prompts


def training_segments(n: int) -> list[dict]:
    """The first n de-en lines of the bundled human-written data as SEGMENTS rows of the training split."""
    src = (SAMPLE_DIR / "human_written/deen/train.de-en.de").read_text(encoding="utf-8").splitlines()[:n]
    ref = (SAMPLE_DIR / "human_written/deen/train.de-en.en").read_text(encoding="utf-8").splitlines()[:n]
    return [
        {
            "id": f"hw:de-en:{i}",
            "lp": "de-en",
            "src_lang": "de",
            "tgt_lang": "en",
            "src": s,
            "ref": r,
            "origin": "hw",
            "split": "train",
        }
        for i, (s, r) in enumerate(zip(src, ref, strict=True))
    ]


SEGS = training_segments(5)
SRC = [row["src"] for row in SEGS]


@pytest.fixture
def segments(tmp_path):
    return write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)


def config(tmp_path, *overrides: str):
    """A run config whose run.root (and so its generation cache) is this test's own."""
    return load_config(overrides=[*overrides, f"run.root={tmp_path / 'runs'}"])


def test_hf_greedy_and_n_samples(segments, tmp_path, tiny_model_dir):
    cfg = config(
        tmp_path,
        "generate.systems=[{name: greedy, max_new_tokens: 8}, {name: s, do_sample: true, n: 2, max_new_tokens: 8}]",
        "generate.max_prompt_tokens=1000",
    )
    outputs, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    assert set(outputs) == {"candidates/greedy", "candidates/s-1", "candidates/s-2"}
    assert counts["greedy/generated"] == counts["s-1/generated"] == counts["s-2/generated"] == 5
    assert counts["generated"] == 15 and counts["from_cache"] == 0  # a new cache: everything generated
    rows = read_rows(outputs["candidates/s-2"], CANDIDATES)
    assert json.loads(rows[0]["generation"])["n"] == 2 and rows[0]["model_id"] == str(
        tiny_model_dir.resolve()
    )
    s1 = [r["hypothesis"] for r in read_rows(outputs["candidates/s-1"], CANDIDATES)]
    s2 = [r["hypothesis"] for r in read_rows(outputs["candidates/s-2"], CANDIDATES)]
    assert s1 != s2  # two seeds, two samples


def test_prompt_over_the_limit_is_skipped_and_counted(segments, tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = [
        len(tokenizer(make_prompt(s["src"], "de", "en"), add_special_tokens=False)["input_ids"]) for s in SEGS
    ]
    limit = sorted(lengths)[2]  # the two longest prompts are over it
    cfg = config(
        tmp_path,
        "generate.systems=[{name: greedy, max_new_tokens: 4}]",
        f"generate.max_prompt_tokens={limit}",
    )
    _, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    over = sum(n > limit for n in lengths)
    assert over >= 1
    assert counts["skipped_prompt_too_long/de-en"] == counts["skipped_prompt_too_long"] == over
    assert counts["greedy/skipped_prompt_too_long"] == over and counts["greedy/generated"] == 5 - over


def test_five_shot_prompts_use_almas_examples():
    cfg = load_config(
        overrides=[f"generate.systems=[{{name: hw, shots: hw, shots_dir: '{SAMPLE_DIR / 'shots/hw'}'}}]"]
    )
    prompts = system_prompts(cfg, cfg.generate.systems[0], SEGS[:1])
    shots = load_shots(SAMPLE_DIR / "shots/hw", "de", "en")
    assert len(shots) == 5
    expected = (
        "Translate this from German to English:"
        + "".join(f"\nGerman: {s['source']}\nEnglish: {s['target']}" for s in shots)
        + f"\nGerman: {SRC[0]}\nEnglish:"
    )
    assert prompts == [expected]


def test_imported_file_system_is_aligned_and_checked(segments, tmp_path, tiny_model_dir):
    # The policy's tokenizer decides which sources are too long, for a file system too.
    good = tmp_path / "sys.en"
    good.write_text("".join(f"T{i}\n" for i in range(5)), encoding="utf-8")
    cfg = config(tmp_path, f"generate.systems=[{{name: gpt4, backend: file, files: {{de-en: '{good}'}}}}]")
    outputs, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    rows = read_rows(outputs["candidates/gpt4"], CANDIDATES)
    assert [(r["segment_id"], r["hypothesis"]) for r in rows] == [
        (f"hw:de-en:{i}", f"T{i}") for i in range(5)
    ]
    assert rows[0]["model_id"].startswith("file:")
    assert (counts["gpt4/generated"], counts["gpt4/from_cache"]) == (5, 0)  # read, never cached
    short = tmp_path / "short.en"
    short.write_text("T0\nT1\n", encoding="utf-8")
    cfg = config(tmp_path, f"generate.systems=[{{name: gpt4, backend: file, files: {{de-en: '{short}'}}}}]")
    with pytest.raises(IngestError, match=rf"{short}:3: 2 translations for the 5 training sources of de-en"):
        run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out2")
    jsonl = tmp_path / "sys.jsonl"
    jsonl.write_text("".join(json.dumps({"translation": f"J{i}"}) + "\n" for i in range(5)), encoding="utf-8")
    cfg = config(
        tmp_path,
        f"generate.systems=[{{name: j, backend: file, file_format: jsonl, files: {{de-en: '{jsonl}'}}}}]",
    )
    outputs, _ = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out3")
    assert read_rows(outputs["candidates/j"], CANDIDATES)[4]["hypothesis"] == "J4"


def test_a_reranked_system_is_one_candidate_chosen_from_its_cached_samples(
    segments, tmp_path, tiny_model_dir
):
    # The same samples as a plain n = 3 system (the generation cache gives them back, nothing is generated),
    # then MBR with chrF picks one per source: the one with the highest mean chrF against the two others.
    from sacrebleu.metrics import CHRF

    plain = config(tmp_path, "generate.systems=[{name: s, do_sample: true, n: 3, max_new_tokens: 8}]")
    outputs, _ = run_generate(plain, segments, str(tiny_model_dir), None, tmp_path / "plain")
    samples = [
        [r["hypothesis"] for r in read_rows(outputs[f"candidates/s-{k}"], CANDIDATES)] for k in (1, 2, 3)
    ]
    mbr = config(
        tmp_path, "generate.systems=[{name: s, do_sample: true, n: 3, max_new_tokens: 8, rerank: mbr}]"
    )
    outputs, counts = run_generate(mbr, segments, str(tiny_model_dir), None, tmp_path / "mbr")
    assert set(outputs) == {"candidates/s"} and counts["s/generated"] == 0 and counts["s/from_cache"] == 15
    rows = read_rows(outputs["candidates/s"], CANDIDATES)
    assert json.loads(rows[0]["generation"])["rerank"] == "mbr"
    chrf = CHRF()
    for i, row in enumerate(rows):
        cands = [samples[k][i] for k in range(3)]
        utility = [
            sum(chrf.sentence_score(cands[a], [cands[b]]).score for b in range(3) if b != a) / 2
            for a in range(3)
        ]
        assert row["hypothesis"] == cands[max(range(3), key=lambda a: (utility[a], -a))]


def test_rerank_needs_several_samples_and_a_metric_of_its_kind(tmp_path):
    with pytest.raises(ConfigError, match="n >= 2"):
        config(tmp_path, "generate.systems=[{name: s, rerank: mbr}]")
    with pytest.raises(ConfigError, match="rerank_metric 'chrf' is not a reference-free metric"):
        config(
            tmp_path,
            "generate.systems=[{name: s, do_sample: true, n: 2, rerank: qe_rerank, rerank_metric: chrf}]",
        )
