"""The generate stage of the sequence-cpo flow: autoregressive negatives (AN), top-k samples of the MLE model made
offline, one seeded pass per sample ("Sequence-level Large Language Model Training with Contrastive Preference
Optimization", anonymous ACL submission, section 4.2: top-k sampling with k = 50 from the reference model).
Nothing when negatives.autoregressive is 0."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.sequence.shared import candidate_row, fields_hash, split_rows
from alma_r.tasks.shared.candidates import write_candidates


def an_decoding(cfg: SequenceRunConfig) -> Decoding:
    n = cfg.negatives
    return Decoding(do_sample=True, temperature=n.temperature, top_k=n.top_k, max_new_tokens=n.max_new_tokens)


def run_generate(
    cfg: SequenceRunConfig, instructions: StageResult, mle: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    """`negatives.samples` samples of the MLE model (the reference) per training instruction, one seeded
    pass per sample, into candidates/an-<k>.parquet: the files models/sequence/negatives.py reads AN from."""
    n = cfg.negatives
    rows = split_rows(instructions, "train")
    model_dir = mle.outputs["model"]
    tokenizer = load_tokenizer(model_dir, cfg.model.trust_remote_code)
    model = load_model(
        model_dir, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=pick_device()
    )
    decoding = an_decoding(cfg)
    outputs, counts = {}, {"instructions": len(rows)}
    for k in range(1, n.samples + 1):
        texts = generate_translations(
            model,
            tokenizer,
            [r["prompt"] for r in rows],
            decoding,
            n.batch_size,
            n.max_prompt_tokens,
            seed=cfg.run.seed + k,
            desc=f"AN sample {k}",
        )
        settings = json.dumps({**asdict(decoding), "seed": cfg.run.seed + k}, sort_keys=True)
        system = f"an-{k}"
        candidates = [
            candidate_row(r, system, text, model_dir, settings)
            for r, text in zip(rows, texts, strict=True)
            if text is not None
        ]
        write_candidates(system, candidates, len(rows), out_dir, outputs, counts)
    return outputs, counts


def generate_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult
) -> StageKey:
    n = cfg.negatives
    sampling = fields_hash(
        on=n.autoregressive > 0,
        samples=n.samples,
        decoding=asdict(an_decoding(cfg)),
        max_prompt_tokens=n.max_prompt_tokens,
        batch_size=n.batch_size,
        model=cfg.model.model_dump(mode="json"),
    )
    key = stage_key("generate", sampling, [instructions, mle], extra=cfg.run.seed, module=__name__)
    return StageKey("generate", Path(run_dir) / "generate", key)


def generate_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult
) -> StageResult:
    """Autoregressive negatives (top-k samples of the MLE model), made offline; nothing when AN is off."""
    where = generate_key(cfg, run_dir, instructions, mle)
    if not cfg.negatives.autoregressive:
        return run_stage(where, lambda out: ({}, {"skipped": True}))
    return run_stage(where, lambda out: run_generate(cfg, instructions, mle, out))


generate_task = stage_task(generate_stage, generate_key, gpu=True)
