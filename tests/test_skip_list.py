"""The generate stage's one skip list: over-long sources are decided once, by the policy's prompts, and every
system (a model's decoding, a file, ingested translations) translates the same kept sources, so that the score
stage's coverage check accepts them. And the ingested backend, from the ingest stage's ingested_translations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alma_r.config import SAMPLE_DIR, load_config
from alma_r.data.io import read_rows, write_table
from alma_r.data.readers import IngestError
from alma_r.data.schemas import CANDIDATES, INGESTED_TRANSLATIONS, SCORES, SEGMENTS
from alma_r.models.loading import load_tokenizer
from alma_r.models.prompts import load_shots, make_prompt
from alma_r.tasks import generate as stage
from alma_r.tasks.generate import generate_stage, run_generate
from alma_r.tasks.runtime.stage import StageResult
from alma_r.tasks.score import run_score
from tests.test_generate_stage import training_segments

LONG = 2  # the de-en source made over-long


def with_a_long_source() -> list[dict]:
    """Four de-en sources, the third repeated until its prompt is far over the others, and their four en-de
    mirrors (none long)."""
    de_en = training_segments(4)
    de_en[LONG] = {**de_en[LONG], "src": " ".join([de_en[LONG]["src"]] * 8)}
    en_de = [
        {
            **r,
            "id": f"hw:en-de:{i}",
            "lp": "en-de",
            "src_lang": "en",
            "tgt_lang": "de",
            "src": r["ref"],
            "ref": r["src"],
        }
        for i, r in enumerate(training_segments(4))
    ]
    return de_en + en_de


SEGS = with_a_long_source()


def tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.fixture
def limit(tiny_model_dir) -> int:
    """A prompt limit that only the long source's prompt exceeds."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = [tokens(tokenizer, make_prompt(r["src"], r["src_lang"], r["tgt_lang"])) for r in SEGS]
    others = max(n for i, n in enumerate(lengths) if i != LONG)
    assert lengths[LONG] > others + 8
    return others


def config(tmp_path: Path, limit: int, *systems: str):
    return load_config(
        overrides=[
            f"generate.systems=[{', '.join(systems)}]",
            f"generate.max_prompt_tokens={limit}",
            f"run.root={tmp_path / 'runs'}",
        ]
    )


def file_system(tmp_path: Path) -> str:
    """A file system translating every training source of both directions, line by line in file order."""
    files = {}
    for lp in ("de-en", "en-de"):
        path = tmp_path / f"gpt4.{lp}"
        path.write_text("".join(f"{lp} T{i}\n" for i in range(4)), encoding="utf-8")
        files[lp] = f"'{path}'"
    return f"{{name: gpt4, backend: file, files: {{{', '.join(f'{k}: {v}' for k, v in files.items())}}}}}"


def segment_ids(path: str) -> list[str]:
    return [r["segment_id"] for r in read_rows(path, CANDIDATES)]


def test_a_model_and_a_file_system_translate_the_same_kept_sources_and_score_accepts_them(
    tmp_path, tiny_model_dir, limit, monkeypatch
):
    segments = write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)
    cfg = config(tmp_path, limit, "{name: greedy, max_new_tokens: 4}", file_system(tmp_path))
    outputs, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    # Counted once, for its direction; each table has no row for it.
    assert counts["sources"] == 8 and counts["skipped_prompt_too_long"] == 1
    assert (counts["skipped_prompt_too_long/de-en"], counts["skipped_prompt_too_long/en-de"]) == (1, 0)
    assert counts["greedy/skipped_prompt_too_long"] == counts["gpt4/skipped_prompt_too_long"] == 1
    kept = [r["id"] for i, r in enumerate(SEGS) if i != LONG]
    assert segment_ids(outputs["candidates/greedy"]) == segment_ids(outputs["candidates/gpt4"]) == kept
    assert counts["greedy/generated"] == counts["gpt4/generated"] == 7
    # The file still translates every source in file order: the long source's line is passed over, not shifted.
    gpt4 = {r["segment_id"]: r["hypothesis"] for r in read_rows(outputs["candidates/gpt4"], CANDIDATES)}
    assert gpt4["hw:de-en:3"] == "de-en T3" and gpt4["hw:en-de:2"] == "en-de T2"
    # The score stage's coverage check accepts them: every system covers the same segments.
    paths = [Path(outputs["candidates/greedy"]), Path(outputs["candidates/gpt4"])]
    scored, _ = run_score(cfg, segments, paths, tmp_path / "score", tmp_path / "scores.sqlite")
    rows = read_rows(scored["scores/chrf"], SCORES)
    assert {(r["segment_id"], r["system"]) for r in rows} == {
        (s, system) for s in kept for system in ("reference", "greedy", "gpt4")
    }
    # A rerun decides the same list from the cache's prompt lengths and generations: nothing is loaded.
    for loader in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(
            stage, loader, lambda *a, **k: pytest.fail("loaded although everything is cached")
        )
    again_outputs, again = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "again")
    assert (again["skipped_prompt_too_long/de-en"], again["greedy/from_cache"]) == (1, 7)
    assert segment_ids(again_outputs["candidates/greedy"]) == kept


def test_the_longest_policy_prompt_decides_for_every_system(tmp_path, tiny_model_dir):
    """A 5-shot system's prompt fits nowhere under a limit the zero-shot prompts fit: every source is skipped,
    for the file system too, and the model is never asked for a prompt over the limit."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    de_en = training_segments(3)
    segments = write_table(de_en, tmp_path / "segments.parquet", SEGMENTS)
    zero_shot = max(tokens(tokenizer, make_prompt(r["src"], "de", "en")) for r in de_en)
    shots = load_shots(SAMPLE_DIR / "shots/hw", "de", "en")
    five_shot = min(tokens(tokenizer, make_prompt(r["src"], "de", "en", shots)) for r in de_en)
    assert zero_shot < five_shot
    lines = tmp_path / "sys.en"
    lines.write_text("A\nB\nC\n", encoding="utf-8")
    cfg = config(
        tmp_path,
        zero_shot,
        f"{{name: hw, shots: hw, shots_dir: '{SAMPLE_DIR / 'shots/hw'}', max_new_tokens: 4}}",
        f"{{name: f, backend: file, files: {{de-en: '{lines}'}}}}",
    )
    outputs, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    assert counts["skipped_prompt_too_long/de-en"] == 3 and counts["hw/generated"] == 0
    assert segment_ids(outputs["candidates/hw"]) == segment_ids(outputs["candidates/f"]) == []
    # Without the 5-shot system the zero-shot prompts decide, and all three fit.
    cfg = config(tmp_path, zero_shot, f"{{name: f, backend: file, files: {{de-en: '{lines}'}}}}")
    outputs, counts = run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out2")
    assert counts["skipped_prompt_too_long/de-en"] == 0 and len(segment_ids(outputs["candidates/f"])) == 3


def ingested_rows(segs: list[dict], system: str, origin: str = "alma-r-preference-de") -> list[dict]:
    return [
        {
            "segment_id": r["id"],
            "lp": r["lp"],
            "system": system,
            "hypothesis": f"{system} {r['id']}",
            "origin": origin,
        }
        for r in segs
    ]


def test_ingested_translations_become_candidates_of_the_kept_sources(tmp_path, tiny_model_dir, limit):
    """Through the stage: the ingest result's ingested_translations. The long source needs no translation (it
    is skipped); the rows say where they came from."""
    segments = write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)
    kept = [r for i, r in enumerate(SEGS) if i != LONG]
    table = write_table(
        ingested_rows(kept, "gpt4") + ingested_rows(SEGS, "alma"),
        tmp_path / "ingested.parquet",
        INGESTED_TRANSLATIONS,
    )
    ingest = StageResult(
        "ingest", "ingest-key", {"segments": str(segments), "ingested_translations": str(table)}
    )
    policy = StageResult("sft", "sft-key", {"model": str(tiny_model_dir)})
    cfg = config(tmp_path, limit, "{name: gpt4, backend: ingested}", "{name: alma, backend: ingested}")
    result = generate_stage(cfg, tmp_path / "run", ingest, policy)
    assert result.counts["skipped_prompt_too_long/de-en"] == 1
    rows = read_rows(result.outputs["candidates/gpt4"], CANDIDATES)
    assert (
        [r["segment_id"] for r in rows]
        == segment_ids(result.outputs["candidates/alma"])
        == [r["id"] for r in kept]
    )
    assert rows[0]["hypothesis"] == f"gpt4 {kept[0]['id']}"
    assert (rows[0]["model_id"], rows[0]["adapter"]) == ("alma-r-preference-de", None)
    assert json.loads(rows[0]["generation"]) == {"backend": "ingested", "origin": "alma-r-preference-de"}


def test_an_ingested_system_without_its_translations_stops_with_one_line(tmp_path, tiny_model_dir, limit):
    segments = write_table(SEGS, tmp_path / "segments.parquet", SEGMENTS)
    cfg = config(tmp_path, limit, "{name: gpt4, backend: ingested}")
    missing = SEGS[0]["id"]
    table = write_table(
        ingested_rows(SEGS[1:4], "gpt4"), tmp_path / "ingested.parquet", INGESTED_TRANSLATIONS
    )
    with pytest.raises(IngestError) as err:
        run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out", table)
    assert str(err.value) == (
        f"system 'gpt4' (backend ingested): no ingested translation for 5 of the 7 sources, e.g. ['{missing}', "
        "'hw:en-de:0', 'hw:en-de:1']; the ingest sources carry gpt4 (de-en 3)"
    )
    other = write_table(ingested_rows(SEGS, "alma"), tmp_path / "other.parquet", INGESTED_TRANSLATIONS)
    with pytest.raises(IngestError, match=r"no ingested translations under this name; the ingest sources carry "
                       r"alma \(de-en 4, en-de 4\)$"):  # fmt: skip
        run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out", other)
    with pytest.raises(
        IngestError, match=r"^system 'gpt4' \(backend ingested\): the ingest sources carry no "
    ):
        run_generate(cfg, segments, str(tiny_model_dir), None, tmp_path / "out")
    assert "\n" not in str(err.value)
