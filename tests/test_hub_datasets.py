"""hf_dataset sources (data/hub_datasets.py, tasks/ingest.py) and what the later stages do with what they carry:
ALMA-R-Preference's layout (one `translation` struct holding both sides, GPT-4's and ALMA's translations, their
published scores, the Delta label and required_directions), WMT22-Test's (a struct named by the config), flat
columns, one-line errors, the same dataset from a Hub-layout cache offline, published: metrics through the score
stage and the human labels through select; our selection rule against ALMA's own on the same rows.

The datasets are written here, in the layouts `datasets` reads (README.md front matter + Parquet), from real
sentences: WMT'22 test segments with the published ALMA-13B-R translations (the development data folder). The
'GPT-4' translations and every score are hand-made stand-ins, chosen so that each branch of the rule is hit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alma_r.config import RunConfig
from alma_r.data.hub_datasets import read_dataset_split, resolve_split
from alma_r.data.io import read_rows, write_table
from alma_r.data.readers import IngestError
from alma_r.data.schemas import (
    CANDIDATES,
    HUMAN_PREFERENCES,
    INGESTED_TRANSLATIONS,
    PAIRS,
    PUBLISHED_SCORES,
    REFERENCE,
    SCORES,
    SEGMENTS,
)
from alma_r.tasks.ingest import ingest_key, run_ingest
from alma_r.tasks.score import run_score
from alma_r.tasks.select import run_select
from alma_r.tasks.shared.selection import select_pairs
from tests.conftest import REPO, SHARED_DATA, needs_shared_data
from tests.hub_cache import dataset_card, hub_env, put_snapshot

WMT22 = SHARED_DATA / "alma" / "outputs" / "wmt22_outputs"
pytestmark = needs_shared_data(WMT22)

# {system name: field prefix}, as configs/alma-13b-r.yaml: GPT-4 first, the order of ALMA's candidate list
SYSTEMS = {"gpt4": "gpt4", "alma-13b-lora": "alma"}
NAMES = ("kiwi", "xcomet", "kiwi_xcomet")
# (kiwi, xcomet) per row, target language and field prefix; kiwi_xcomet is their mean, as published.
ROW_SCORES = [
    # row 1, both directions: en: gpt4 best, alma worst; de: gpt4 best, ref and alma tie for worst (ref first)
    {
        "en": {"ref": (0.8, 0.8), "gpt4": (0.9, 0.8), "alma": (0.7, 0.7)},
        "de": {"ref": (0.6, 0.6), "gpt4": (0.9, 0.9), "alma": (0.6, 0.6)},
    },
    # rows 2 and 3, de-en only, labelled: the label contradicts the scores
    {"en": {"ref": (0.9, 0.9), "gpt4": (0.5, 0.5), "alma": (0.7, 0.7)}},
    {"en": {"ref": (0.95, 0.95), "gpt4": (0.8, 0.8), "alma": (0.6, 0.6)}},
    # row 4, en-de only: gpt4 and alma tie for best (gpt4 first), the reference is worst
    {"de": {"ref": (0.7, 0.7), "gpt4": (0.9, 0.9), "alma": (0.9, 0.9)}},
]
DELTA = [0.0, 1.0, -0.5, 0.0]
REQUIRED = ["", "de-en", "de-en", "en-de"]


def lines(path: str) -> list[str]:
    return (WMT22 / path).read_text(encoding="utf-8").splitlines()


def stand_in(text: str) -> str:
    """The hand-made 'GPT-4' translation: the text without its last word."""
    return text.rsplit(" ", 1)[0]


def swapped(text: str) -> str:
    """A hand-made 'ALMA' translation where no published one exists (into German of a de-en test line)."""
    words = text.split()
    return " ".join([words[1], words[0], *words[2:]])


def preference_rows() -> list[dict]:
    """Four ALMA-R-Preference rows (config de-en): WMT'22 de-en lines 1-3 and en-de line 1, ALMA-13B-R's
    published translations as 'alma'."""
    de, en = lines("wmt-testset/deen/test.de-en.de"), lines("wmt-testset/deen/test.de-en.en")
    alma_en = lines("ALMA-13B-R/deen/test.de-en.en")
    ende_en, ende_de = lines("wmt-testset/ende/test.en-de.en"), lines("wmt-testset/ende/test.en-de.de")
    alma_de = lines("ALMA-13B-R/ende/test.en-de.de")
    sides = [
        ({"de": de[0], "en": en[0]}, {"en": alma_en[0], "de": swapped(de[0])}),
        ({"de": de[1], "en": en[1]}, {"en": alma_en[1]}),
        ({"de": de[2], "en": en[2]}, {"en": alma_en[2]}),
        ({"de": ende_de[0], "en": ende_en[0]}, {"de": alma_de[0]}),
    ]
    rows = []
    for (pair, alma), scores, delta, required in zip(sides, ROW_SCORES, DELTA, REQUIRED, strict=True):
        row: dict = {**pair, "Delta": delta, "language_pair": "de-en", "required_directions": required}
        for lang in ("de", "en"):
            row[f"gpt4_{lang}"] = stand_in(pair[lang]) if lang in scores else None
            row[f"alma_{lang}"] = alma.get(lang)
            for prefix in ("gpt4", "alma", "ref"):
                kiwi, xcomet = scores.get(lang, {}).get(prefix, (None, None))
                row[f"{prefix}_{lang}_kiwi"], row[f"{prefix}_{lang}_xcomet"] = kiwi, xcomet
                row[f"{prefix}_{lang}_kiwi_xcomet"] = None if kiwi is None else round((kiwi + xcomet) / 2, 4)
        rows.append({"translation": row})
    return rows


def parquet(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_dataset(folder: Path, tables: dict[str, list[dict]], split: str = "train") -> Path:
    for config, rows in tables.items():
        parquet(rows, folder / config / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text(dataset_card("test dataset", list(tables), split), encoding="utf-8")
    return folder


@pytest.fixture
def preference(tmp_path) -> Path:
    return write_dataset(tmp_path / "ALMA-R-Preference", {"de-en": preference_rows()})


def source(dataset, **kw) -> dict:
    return {
        "kind": "hf_dataset",
        "name": "pref",
        "dataset": str(dataset),
        "dataset_config": "de-en",
        "pair": "de-en",
        "directions": ["de-en", "en-de"],
        "split": "train",
        "systems": SYSTEMS,
        "published_scores": list(NAMES),
        "preference_field": "Delta",
        "direction_field": "required_directions",
        **kw,
    }


def config(*sources: dict, **sections) -> RunConfig:
    return RunConfig.model_validate({"ingest": {"sources": list(sources)}, **sections})


def read(dataset: Path, **kw):
    spec = source(dataset, **kw)
    split = resolve_split(spec["dataset"], spec["dataset_config"], spec.pop("hf_split", None) or "train")
    for name in ("kind", "dataset", "dataset_config", "revision"):
        spec.pop(name, None)
    spec["origin"], spec["max_rows"] = spec.pop("name"), spec.pop("max_segments", None)
    return read_dataset_split(split, **spec)


# ------------------------------------------------------------------------------------ the preference layout


def test_the_preference_layout_gives_segments_translations_scores_and_labels(preference, tmp_path):
    rows = preference_rows()
    got = read(preference)
    # required_directions: row 1 serves both directions, rows 2-3 de-en only, row 4 en-de only
    assert [s["id"] for s in got.segments] == [
        "pref:de-en:1",
        "pref:en-de:1",
        "pref:de-en:2",
        "pref:de-en:3",
        "pref:en-de:4",
    ]
    seg = {s["id"]: s for s in got.segments}
    first = rows[0]["translation"]
    assert (seg["pref:de-en:1"]["src"], seg["pref:de-en:1"]["ref"]) == (first["de"], first["en"])
    assert (seg["pref:en-de:1"]["src"], seg["pref:en-de:1"]["ref"]) == (first["en"], first["de"])
    assert seg["pref:en-de:4"]["src"] == lines("wmt-testset/ende/test.en-de.en")[0]
    assert {(s["origin"], s["split"]) for s in got.segments} == {("pref", "train")}

    hyp = {(t["segment_id"], t["system"]): t["hypothesis"] for t in got.translations}
    assert len(hyp) == 10  # every emitted segment, both systems
    assert hyp[("pref:de-en:2", "alma-13b-lora")] == lines("ALMA-13B-R/deen/test.de-en.en")[1]
    assert hyp[("pref:en-de:4", "gpt4")] == stand_in(lines("wmt-testset/ende/test.en-de.de")[0])

    scores = {(s["segment_id"], s["system"], s["metric"]): s["score"] for s in got.scores}
    assert len(scores) == 5 * 3 * 3  # segments x (2 systems + reference) x names
    assert scores[("pref:en-de:1", REFERENCE, "published:kiwi")] == 0.6
    assert scores[("pref:de-en:1", "gpt4", "published:xcomet")] == 0.8
    assert scores[("pref:de-en:1", "gpt4", "published:kiwi_xcomet")] == 0.85

    assert [
        (p["segment_id"], p["chosen_system"], p["rejected_system"], p["label"]) for p in got.preferences
    ] == [
        ("pref:de-en:2", "gpt4", "alma-13b-lora", 1.0),
        ("pref:de-en:3", "alma-13b-lora", "gpt4", -0.5),
    ]
    for table, schema in (
        (got.translations, INGESTED_TRANSLATIONS),
        (got.scores, PUBLISHED_SCORES),
        (got.preferences, HUMAN_PREFERENCES),
        (got.segments, SEGMENTS),
    ):
        write_table(table, tmp_path / f"{len(table)}.parquet", schema)  # every row fits its contract


def alma_pair(row: dict, lp: str, scorer: str = "kiwi_xcomet") -> tuple[str, str] | None:
    """ALMA's own rule (fe1ixxu/ALMA utils/utils.py, preprocess_cpo_data), transcribed: a row serves a direction
    unless required_directions names another; Delta != 0 picks GPT-4 (> 0) or ALMA (< 0); else the highest and
    lowest `<sys>_<tgt>_<scorer>` of [ref, gpt4, alma], the first of equals winning (list.index of max/min)."""
    ex = row["translation"]
    if ex["required_directions"] != "" and ex["required_directions"] != lp:
        return None
    tgt = lp.split("-")[1]
    if ex["Delta"] != 0:
        gpt4, alma = ex[f"gpt4_{tgt}"], ex[f"alma_{tgt}"]
        return (gpt4, alma) if ex["Delta"] > 0 else (alma, gpt4)
    sentences = [ex[tgt], ex[f"gpt4_{tgt}"], ex[f"alma_{tgt}"]]
    scores = [ex[f"ref_{tgt}_{scorer}"], ex[f"gpt4_{tgt}_{scorer}"], ex[f"alma_{tgt}_{scorer}"]]
    return sentences[scores.index(max(scores))], sentences[scores.index(min(scores))]


def test_our_rule_gives_almas_pairs_on_the_preference_rows(preference):
    got = read(preference)
    texts = {(s["id"], REFERENCE): s["ref"] for s in got.segments}
    texts |= {(t["segment_id"], t["system"]): t["hypothesis"] for t in got.translations}
    scores = {(s["segment_id"], s["system"], s["metric"]): s["score"] for s in got.scores}
    labels = {p["segment_id"]: (p["chosen_system"], p["rejected_system"]) for p in got.preferences}
    # candidate order: the reference, then generate.systems in config order (GPT-4, ALMA) = ALMA's list order
    pairs, dropped = select_pairs(
        got.segments, texts, scores, list(SYSTEMS), ["published:kiwi_xcomet"], preferences=labels
    )
    assert dropped == []
    ours = {p["segment_id"]: (p["chosen"], p["rejected"]) for p in pairs}
    theirs = {
        f"pref:{lp}:{i}": pair
        for i, row in enumerate(preference_rows(), start=1)
        for lp in ("de-en", "en-de")
        if (pair := alma_pair(row, lp)) is not None
    }
    assert ours == theirs
    # and by hand: each branch of the rule
    assert {p["segment_id"]: (p["chosen_system"], p["rejected_system"]) for p in pairs} == {
        "pref:de-en:1": ("gpt4", "alma-13b-lora"),
        "pref:en-de:1": (
            "gpt4",
            REFERENCE,
        ),  # the reference and ALMA tie for worst: the reference comes first
        "pref:de-en:2": ("gpt4", "alma-13b-lora"),  # Delta > 0, against the scores
        "pref:de-en:3": ("alma-13b-lora", "gpt4"),  # Delta < 0
        "pref:en-de:4": ("gpt4", REFERENCE),  # GPT-4 and ALMA tie for best: GPT-4 comes first
    }


# ------------------------------------------------------------------------------------------ the ingest stage


def test_the_ingest_stage_writes_the_carried_tables_and_keys_on_their_content(preference, tmp_path):
    cfg = config(source(preference))
    outputs, counts = run_ingest(cfg, tmp_path / "out")
    assert set(outputs) == {"segments", "ingested_translations", "published_scores", "human_preferences"}
    assert {
        k: counts[k] for k in ("segments", "ingested_translations", "published_scores", "human_preferences")
    } == {"segments": 5, "ingested_translations": 10, "published_scores": 45, "human_preferences": 2}
    assert counts["resolved"] == [
        {
            "path": str(preference.resolve()),
            "repo_id": None,
            "repo_type": "dataset",
            "revision": None,
            "commit": None,
        }
    ]
    assert len(read_rows(outputs["human_preferences"], HUMAN_PREFERENCES)) == 2
    # the first N rows; a run-wide limit wins when smaller
    limited = RunConfig.model_validate(
        {"ingest": {"sources": [source(preference, max_segments=3)], "max_segments_per_source": 2}}
    )
    _, small_counts = run_ingest(limited, tmp_path / "small")
    assert small_counts["segments"] == 3  # rows 1 (both directions) and 2

    key = ingest_key(cfg, tmp_path).key
    assert ingest_key(cfg, tmp_path).key == key
    rows = preference_rows()
    rows[0]["translation"]["de"] = "Die Ware hat weniger als 20 Euro gekostet."
    parquet(rows, preference / "de-en" / "train-00000-of-00001.parquet")
    assert ingest_key(cfg, tmp_path).key != key  # new content under the same folder: a new key
    outputs, _ = run_ingest(cfg, tmp_path / "again")
    assert read_rows(outputs["segments"], SEGMENTS)[0]["src"] == rows[0]["translation"]["de"]  # and read anew


def test_a_plain_source_writes_only_segments(tmp_path):
    cfg = RunConfig.model_validate(
        {
            "ingest": {
                "sources": [
                    {
                        "kind": "aligned_text",
                        "name": "t",
                        "pair": "de-en",
                        "directions": ["de-en"],
                        "files": {
                            "de": "sample:wmt22/deen/test.de-en.de",
                            "en": "sample:wmt22/deen/test.de-en.en",
                        },
                    }
                ]
            }
        }
    )
    outputs, counts = run_ingest(cfg, tmp_path / "out")
    assert set(outputs) == {"segments"} and "resolved" not in counts


def rewrite(dataset: Path, row: int, **fields) -> Path:
    rows = preference_rows()
    rows[row - 1]["translation"].update(fields)
    parquet(rows, dataset / "de-en" / "train-00000-of-00001.parquet")
    return dataset


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            {"systems": {"gpt4": "gpt5", "alma-13b-lora": "alma"}},
            r":de-en:train:1: field 'translation\.gpt5_en' is missing \(has \['Delta', 'alma_de'",
        ),
        (
            {"dataset_config": "fr-en"},
            r":fr-en:train:0: no config 'fr-en' in the dataset \(configs: \['de-en'\]\)",
        ),
        ({"hf_split": "test"}, r":de-en:test:0: no split 'test' in config 'de-en' \(splits: \['train'\]\)"),
        (
            {"translation_field": "pair"},
            r":de-en:train:1: field 'pair' is missing or not an object \(has \['translation'\]\)",
        ),
        ({"published_scores": ["bleurt"]}, r":de-en:train:1: field 'translation\.gpt4_en_bleurt' is missing"),
    ],
)
def test_bad_sources_stop_with_one_line(preference, tmp_path, change, problem):
    with pytest.raises(IngestError, match=problem) as err:
        run_ingest(config(source(preference, **change)), tmp_path / "out")
    assert str(err.value).startswith(f"{preference}:") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "row, fields, problem",
    [
        (2, {"en": "  "}, r":de-en:train:2: field 'translation\.en' is an empty line$"),
        (
            3,
            {"gpt4_en": None},
            r":de-en:train:3: field 'translation\.gpt4_en' is NoneType, expected a string$",
        ),
        (4, {"gpt4_de": ""}, r":de-en:train:4: field 'translation\.gpt4_de' is an empty line$"),
        (
            1,
            {"required_directions": "en-cs"},
            r":de-en:train:1: field 'translation\.required_directions' names "
            r"'en-cs', not a direction of the pair 'de-en'$",
        ),
    ],
)
def test_bad_rows_stop_with_one_line_naming_the_row_and_field(preference, tmp_path, row, fields, problem):
    rewrite(preference, row, **fields)
    with pytest.raises(IngestError, match=problem) as err:
        run_ingest(config(source(preference)), tmp_path / "out")
    assert str(err.value).startswith(f"{preference}:")


def test_wmt22_test_layout_a_struct_named_by_the_config(tmp_path):
    cs, en = lines("wmt-testset/csen/test.cs-en.cs")[:3], lines("wmt-testset/csen/test.cs-en.en")[:3]
    folder = write_dataset(
        tmp_path / "WMT22-Test",
        {
            "cs-en": [{"cs-en": {"cs": c, "en": e}} for c, e in zip(cs, en, strict=True)],
            "en-cs": [{"en-cs": {"en": e, "cs": c}} for c, e in zip(cs[:2], en[:2], strict=True)],
        },
        split="test",
    )
    wmt = {"kind": "hf_dataset", "name": "wmt22", "dataset": str(folder), "pair": "cs-en", "split": "test"}
    cfg = config(
        {**wmt, "dataset_config": "cs-en", "translation_field": "cs-en", "directions": ["cs-en"]},
        {**wmt, "dataset_config": "en-cs", "translation_field": "en-cs", "directions": ["en-cs"]},
    )
    outputs, counts = run_ingest(cfg, tmp_path / "out")
    segments = read_rows(outputs["segments"], SEGMENTS)
    assert [s["id"] for s in segments] == [
        "wmt22:cs-en:1",
        "wmt22:cs-en:2",
        "wmt22:cs-en:3",
        "wmt22:en-cs:1",
        "wmt22:en-cs:2",
    ]
    assert (segments[0]["src"], segments[0]["ref"], segments[0]["split"]) == (cs[0], en[0], "test")
    assert (segments[3]["src"], segments[3]["ref"]) == (en[0], cs[0])
    assert counts["test/cs-en"] == 3 and set(outputs) == {"segments"}
    # the default translation_field does not exist there: the error shows the column to name
    with pytest.raises(
        IngestError,
        match=r":cs-en:test:1: field 'translation' is missing or not an object "
        r"\(has \['cs-en'\]\)",
    ):
        run_ingest(config({**wmt, "dataset_config": "cs-en", "directions": ["cs-en"]}), tmp_path / "bad")


def test_flat_columns_and_a_dataset_without_configs(tmp_path):
    de, en = lines("wmt-testset/deen/test.de-en.de")[:2], lines("wmt-testset/deen/test.de-en.en")[:2]
    folder = tmp_path / "flat"
    parquet(
        [{"source": d, "target": e, "lp": "de-en"} for d, e in zip(de, en, strict=True)],
        folder / "train.parquet",
    )
    flat = {
        "kind": "hf_dataset",
        "name": "flat",
        "dataset": str(folder),
        "pair": "de-en",
        "directions": ["de-en", "en-de"],
        "columns": {"de": "source", "en": "target"},
    }
    outputs, _ = run_ingest(config(flat), tmp_path / "out")
    segments = read_rows(outputs["segments"], SEGMENTS)
    assert [(s["id"], s["src"], s["ref"]) for s in segments] == [
        ("flat:de-en:1", de[0], en[0]),
        ("flat:en-de:1", en[0], de[0]),
        ("flat:de-en:2", de[1], en[1]),
        ("flat:en-de:2", en[1], de[1]),
    ]
    parquet([{"source": d, "target": 7} for d in de], folder / "train.parquet")
    with pytest.raises(IngestError, match=r":default:train:1: field 'target' is int, expected a string$"):
        run_ingest(config(flat), tmp_path / "bad")


# --------------------------------------------------------------------------------- from a Hub cache, offline

OFFLINE_SCRIPT = """
import json, sys
from pathlib import Path
from alma_r.config import RunConfig
from tests.hub_cache import dataset_card
from alma_r.tasks.ingest import ingest_key, run_ingest
out = {}
for revision in (None, "v2"):
    spec = json.loads(sys.argv[1]) | {"revision": revision}
    cfg = RunConfig.model_validate({"ingest": {"sources": [spec]}})
    key = ingest_key(cfg, Path(sys.argv[2])).key
    outputs, counts = run_ingest(cfg, Path(sys.argv[2]) / str(revision))
    out[str(revision)] = {"key": key, "resolved": counts["resolved"], "segments": counts["segments"],
                          "first": str(outputs["segments"])}
print(json.dumps(out))
"""


def test_the_dataset_resolves_by_id_and_revision_from_the_hub_cache_offline(tmp_path):
    repo = "haoranxu/ALMA-R-Preference"
    data = tmp_path / "data"
    main = write_dataset(data / "main", {"de-en": preference_rows()})
    files = {
        "README.md": (main / "README.md").read_text(),
        "de-en/train-00000-of-00001.parquet": (main / "de-en" / "train-00000-of-00001.parquet").read_bytes(),
    }
    hf_home = tmp_path / "hf"
    commit_main = put_snapshot(hf_home, repo, files, revision="main", repo_type="dataset")
    v2 = rewrite(write_dataset(data / "v2", {"de-en": preference_rows()}), 1, de="Die Ware war billig.")
    files["de-en/train-00000-of-00001.parquet"] = (v2 / "de-en" / "train-00000-of-00001.parquet").read_bytes()
    commit_v2 = put_snapshot(hf_home, repo, files, revision="v2", repo_type="dataset")
    env = hub_env(hf_home)
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(source(repo)), str(tmp_path / "runs")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    for revision, commit in (("None", commit_main), ("v2", commit_v2)):
        (resolved,) = got[revision]["resolved"]
        assert (resolved["repo_id"], resolved["repo_type"], resolved["commit"]) == (repo, "dataset", commit)
        assert resolved["revision"] == (None if revision == "None" else "v2")
        assert got[revision]["segments"] == 5
    assert got["None"]["key"] != got["v2"]["key"]
    first = [read_rows(Path(got[r]["first"]), SEGMENTS)[0]["src"] for r in ("None", "v2")]
    assert first == [preference_rows()[0]["translation"]["de"], "Die Ware war billig."]


# ------------------------------------------------------------------------ published: scores and the labels


def ingested_candidates(outputs: dict, folder: Path) -> list[Path]:
    """The candidates the generate stage's `ingested` backend makes: the carried translations as they are."""
    rows = read_rows(outputs["ingested_translations"], INGESTED_TRANSLATIONS)
    paths = []
    for system in SYSTEMS:
        cands = [
            {
                "segment_id": r["segment_id"],
                "lp": r["lp"],
                "system": system,
                "hypothesis": r["hypothesis"],
                "model_id": "ingested",
                "adapter": None,
                "generation": "{}",
            }
            for r in rows
            if r["system"] == system
        ]
        paths.append(write_table(cands, folder / f"{system}.parquet", CANDIDATES))
    return paths


@pytest.mark.parametrize("human_preferences", [True, False])
def test_published_scores_through_score_and_the_labels_through_select(
    preference, tmp_path, human_preferences
):
    cfg = config(
        source(preference),
        generate={"systems": [{"name": name, "backend": "ingested"} for name in SYSTEMS]},
        score={"metrics": ["published:kiwi", "published:xcomet"]},
        select={"human_preferences": human_preferences},
    )
    outputs, _ = run_ingest(cfg, tmp_path / "ingest")
    candidates = ingested_candidates(outputs, tmp_path / "candidates")
    scored, counts = run_score(
        cfg,
        outputs["segments"],
        candidates,
        tmp_path / "score",
        tmp_path / "cache.sqlite",
        published=outputs["published_scores"],
        ingested=outputs["ingested_translations"],
    )
    assert counts["published:kiwi/published"] == 15  # 5 segments x (reference + 2 systems), no model run
    kiwi = {(r["segment_id"], r["system"]): r for r in read_rows(scored["scores/published:kiwi"], SCORES)}
    assert (
        kiwi[("pref:de-en:1", REFERENCE)]["score"] == 0.8 and kiwi[("pref:de-en:1", "gpt4")]["score"] == 0.9
    )
    assert kiwi[("pref:de-en:1", "gpt4")]["model_id"] == "published by pref"
    score_paths = [Path(p) for p in scored.values()]
    pairs_out, counts = run_select(
        cfg,
        outputs["segments"],
        candidates,
        score_paths,
        tmp_path / "select",
        preferences_path=outputs["human_preferences"],
    )
    pairs = {p["segment_id"]: p for p in read_rows(pairs_out["pairs"], PAIRS)}
    stats = json.loads(Path(pairs_out["stats"]).read_text())
    chosen = {sid: (p["chosen_system"], p["rejected_system"]) for sid, p in pairs.items()}
    if human_preferences:  # Delta decides rows 2 and 3, against the scores
        assert chosen["pref:de-en:2"] == ("gpt4", "alma-13b-lora")
        assert chosen["pref:de-en:3"] == ("alma-13b-lora", "gpt4")
        assert pairs["pref:de-en:2"]["margin"] == pytest.approx(-0.2)  # kept: a label beats the margin
        assert stats["from_human_labels"] == counts["from_human_labels"] == 2
        assert stats["by_lp"]["de-en"]["from_human_labels"] == 2
    else:
        assert chosen["pref:de-en:2"] == (REFERENCE, "gpt4")
        assert chosen["pref:de-en:3"] == (REFERENCE, "alma-13b-lora")
        assert stats["from_human_labels"] == 0
    assert chosen["pref:de-en:1"] == ("gpt4", "alma-13b-lora")
