"""Scheduled retraining pays only for what is new: a finished run's training data grows by a few lines, the
flow runs again, and generation and scoring compute only the new segments (run.json's counters), while the
candidates of the old segments are identical to the first run's (the generation cache, models/generate/cache.py;
the score cache, models/score/cache.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from alma_r.config import SAMPLE_DIR
from alma_r.data.io import read_rows
from alma_r.data.schemas import CANDIDATES
from tests.test_flow_e2e import MINI, mini_config

FIRST, ADDED = 12, 4  # training lines per language, then appended


def training_files(folder: Path, lines: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for lang in ("de", "en"):
        text = (
            (SAMPLE_DIR / f"human_written/deen/train.de-en.{lang}").read_text(encoding="utf-8").splitlines()
        )
        out[lang] = folder / f"train.{lang}"
        out[lang].write_text("\n".join(text[:lines]) + "\n", encoding="utf-8")
    return out


def test_grown_training_data_generates_and_scores_only_the_new_segments(
    tmp_path, prefect_harness, tiny_model_dir
):
    from alma_r.flows.build_alma_r import build_alma_r

    # A fixed base model, as a real run has (a Hub id or a folder): the tiny config's own model is built from
    # the training text, so growing the data would make a new model and nothing could be reused.
    base = tiny_model_dir
    files = training_files(tmp_path / "data", FIRST)
    config = yaml.safe_load(mini_config(tmp_path).read_text())
    train_source = next(s for s in config["ingest"]["sources"] if s["split"] == "train")
    train_source["files"] = {lang: str(path) for lang, path in files.items()}
    del train_source["max_segments"]
    path = tmp_path / "grow.yaml"
    path.write_text(yaml.safe_dump(config))
    overrides = [*MINI, f"model.base={base}", "sft.enabled=false", "generate.max_sources_per_lp=1000"]

    run_dir = Path(build_alma_r(config_path=str(path), overrides=overrides))
    first = json.loads((run_dir / "run.json").read_text())["stages"]
    before = {
        system: read_rows(run_dir / "generate" / "candidates" / f"{system}.parquet", CANDIDATES)
        for system in ("greedy", "sample")
    }

    for lang, file in files.items():  # the next batch of training data arrives
        text = (
            (SAMPLE_DIR / f"human_written/deen/train.de-en.{lang}").read_text(encoding="utf-8").splitlines()
        )
        file.write_text("\n".join(text[: FIRST + ADDED]) + "\n", encoding="utf-8")
    build_alma_r(config_path=str(path), overrides=overrides)
    second = json.loads((run_dir / "run.json").read_text())["stages"]

    assert second["ingest"]["cached"] is False and second["generate"]["cached"] is False
    generated = second["generate"]["counts"]
    for system in ("greedy", "sample"):
        new_sources = generated["sources"] - first["generate"]["counts"]["sources"]
        assert new_sources == 2 * ADDED  # both directions
        made = (
            generated[f"{system}/generated"]
            + generated[f"{system}/skipped_prompt_too_long"]
            - first["generate"]["counts"][f"{system}/skipped_prompt_too_long"]
        )
        assert made == new_sources, system
        assert generated[f"{system}/from_cache"] == len(before[system])
        after = read_rows(run_dir / "generate" / "candidates" / f"{system}.parquet", CANDIDATES)
        old_ids = {r["segment_id"] for r in before[system]}
        assert [r for r in after if r["segment_id"] in old_ids] == before[system]
    scored, first_scored = second["score"]["counts"], first["score"]["counts"]
    for metric in ("chrf", "consensus_chrf"):
        # every request of the first run (an old segment's candidates and reference) comes from the cache;
        # only the new segments' are scored
        assert scored[f"{metric}/from_cache"] == first_scored[f"{metric}/distinct"], metric
        assert (
            scored[f"{metric}/scored"]
            == scored[f"{metric}/distinct"] - first_scored[f"{metric}/distinct"]
            > 0
        )
