"""Stage 2, generate: candidate translations of the training sources -> candidates/<system>.parquet."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from alma_r.config import RunConfig
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SEGMENTS
from alma_r.models.generation import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer, model_identity, pick_device
from alma_r.models.prompts import make_prompt
from alma_r.tasks.stage import StageResult, run_stage, stage_key


def preference_sources(segments: list[dict], max_per_lp: int | None) -> list[dict]:
    """The training segments candidates are generated for: the first N per direction, in file order."""
    taken: Counter[str] = Counter()
    out = []
    for row in segments:
        if row["split"] != "train" or not row["ref"]:
            continue
        if max_per_lp is not None and taken[row["lp"]] >= max_per_lp:
            continue
        taken[row["lp"]] += 1
        out.append(row)
    return out


def run_generate(
    cfg: RunConfig, segments_path: Path, model_path: str, adapter: str | None, out_dir: Path
) -> tuple[dict, dict]:
    sources = preference_sources(read_rows(segments_path, SEGMENTS), cfg.generate.max_sources_per_lp)
    prompts = [make_prompt(r["src"], r["src_lang"], r["tgt_lang"]) for r in sources]
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_model(
        model_path,
        adapter=adapter,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        device=pick_device(),
    )
    identity = model_identity(model_path, adapter)
    outputs, counts = {}, {"sources": len(sources)}
    for system in cfg.generate.systems:
        decoding = Decoding(
            num_beams=system.num_beams,
            do_sample=system.do_sample,
            temperature=system.temperature,
            top_p=system.top_p,
            max_new_tokens=system.max_new_tokens,
        )
        hyps = generate_translations(
            model,
            tokenizer,
            prompts,
            decoding,
            cfg.generate.batch_size,
            cfg.generate.max_prompt_tokens,
            seed=cfg.run.seed,
            desc=f"generate {system.name}",
        )
        settings = json.dumps({**decoding.__dict__, "seed": cfg.run.seed}, sort_keys=True)
        rows = [
            {
                "segment_id": r["id"],
                "lp": r["lp"],
                "system": system.name,
                "hypothesis": h,
                **identity,
                "generation": settings,
            }
            for r, h in zip(sources, hyps, strict=True)
            if h is not None
        ]
        outputs[f"candidates/{system.name}"] = write_table(
            rows, out_dir / "candidates" / f"{system.name}.parquet", CANDIDATES
        )
        counts[f"{system.name}/generated"] = len(rows)
        counts[f"{system.name}/skipped_prompt_too_long"] = len(sources) - len(rows)
    return outputs, counts


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(cfg: RunConfig, run_dir: Path, segments: StageResult, policy: StageResult) -> StageResult:
    """Translate the preference sources with every configured system."""
    key = stage_key("generate", cfg.section_hash("generate", "model"), [segments, policy], extra=cfg.run.seed)
    return run_stage(
        "generate",
        run_dir / "generate",
        key,
        lambda out: run_generate(
            cfg, segments.path("segments"), policy.outputs["model"], policy.outputs.get("adapter"), out
        ),
    )
