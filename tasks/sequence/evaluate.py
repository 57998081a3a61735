"""The evaluate stage of the sequence-cpo flow: every WiSE-FT model and the MLE model on the test split, the
metrics of "Sequence-level Large Language Model Training with Contrastive Preference Optimization" (anonymous
ACL submission, section 4.4) under the scoring model P-hat: eq. 9 (approximate reverse-KL) and eq. 10
(length-normalised NLL).

Per model and test instruction: one greedy output (eq. 10 "greedy", and what the judge compares with the
ground truth) and `evaluate.samples_per_prompt` samples from the model's own distribution (temperature 1, no
top-k: eq. 9 needs samples of Q itself; eq. 10 "samples"). P-hat reads the same token ids when its tokenizer has
the policy's vocabulary (the scorer the flow trains always has); otherwise it scores the decoded texts, each
tokenised with P-hat's tokenizer as a training example is (prompt, " " + text, EOS).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from alma_r.config.sequence import SequenceRunConfig
from alma_r.data.files import write_json_atomic
from alma_r.data.io import write_table
from alma_r.data.schemas import CANDIDATES
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.models.sequence.metrics import (
    generate_completion_ids,
    length_normalised_nll,
    reverse_kl,
    sequence_logps,
)
from alma_r.models.train.batching import tokenize_pair
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key
from alma_r.tasks.sequence.shared import candidate_row, split_rows


def held_out_rows(cfg: SequenceRunConfig, instructions: StageResult) -> list[dict]:
    return split_rows(instructions, "test")[: cfg.evaluate.max_items]


def evaluated_models(mle: StageResult, grid: StageResult) -> list[tuple[str, float | None, str]]:
    """(system, alpha, folder): the MLE model, then the WiSE-FT grid in the config's order."""
    models = [("mle", None, mle.outputs["model"])]
    for name, folder in grid.outputs.items():
        models.append((name, float(name.removeprefix("alpha-")), folder))
    return models


class Scorer:
    """P-hat, loaded once: log P-hat(completion | prompt) of another model's token ids."""

    def __init__(self, folder: str, cfg: SequenceRunConfig):
        self.folder = folder
        self.tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
        self.model = load_model(
            folder, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=pick_device()
        )

    def same_ids(self, tokenizer) -> bool:
        return self.tokenizer.get_vocab() == tokenizer.get_vocab()

    def logps(
        self, tokenizer, prompt_texts: list[str], prompts: list[list[int]], completions: list[list[int]]
    ):
        """(N,) log P-hat and (N,) scored token counts; through the texts when the vocabularies differ."""
        if self.same_ids(tokenizer):
            return sequence_logps(self.model, prompts, completions, self.tokenizer.pad_token_id)
        ids = [
            tokenize_pair(self.tokenizer, p, text, text)
            for p, text in zip(
                prompt_texts, tokenizer.batch_decode(completions, skip_special_tokens=True), strict=True
            )
        ]
        return sequence_logps(
            self.model,
            [x["chosen_prompt_ids"] for x in ids],
            [x["chosen_ids"] for x in ids],
            self.tokenizer.pad_token_id,
        )


def evaluate_model(
    cfg: SequenceRunConfig, folder: str, rows: list[dict], scorer: Scorer
) -> tuple[dict, list[str]]:
    """eq. 10 of greedy outputs and of samples, eq. 9 on the samples; the greedy texts."""
    e, seed = cfg.evaluate, cfg.run.seed
    tokenizer = load_tokenizer(folder, cfg.model.trust_remote_code)
    model = load_model(
        folder, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code, device=pick_device()
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = [r["prompt"] for r in rows]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # the trainers' convention
    greedy = generate_completion_ids(model, prompts, eos, pad, False, e.max_new_tokens, seed, e.batch_size)
    p_greedy, n_greedy = scorer.logps(tokenizer, texts, prompts, greedy)

    n = e.samples_per_prompt
    rep_texts, rep_prompts = [t for t in texts for _ in range(n)], [p for p in prompts for _ in range(n)]
    groups = [i for i in range(len(prompts)) for _ in range(n)]
    samples = generate_completion_ids(
        model, rep_prompts, eos, pad, True, e.max_new_tokens, seed + 1, e.batch_size
    )
    q, _ = sequence_logps(model, rep_prompts, samples, pad)  # log Q(y|x) in the model's own ids
    p, counts = scorer.logps(tokenizer, rep_texts, rep_prompts, samples)
    metrics = {
        "nll_greedy": length_normalised_nll(p_greedy, n_greedy),
        "nll_samples": length_normalised_nll(p, counts, groups),
        "reverse_kl": reverse_kl(q, p, groups),
        "greedy_tokens": sum(len(g) for g in greedy) / len(greedy),
        "greedy_without_eos": sum(eos not in g for g in greedy),
    }
    outputs = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in greedy]
    return metrics, outputs


def run_evaluate(
    cfg: SequenceRunConfig,
    instructions: StageResult,
    mle: StageResult,
    grid: StageResult,
    scorer_result: StageResult,
    out_dir: Path,
) -> tuple[dict, dict]:
    e = cfg.evaluate
    rows = held_out_rows(cfg, instructions)
    probe = load_tokenizer(mle.outputs["model"], cfg.model.trust_remote_code)
    kept = [
        r
        for r in rows
        if len(probe(r["prompt"], add_special_tokens=False)["input_ids"]) <= e.max_prompt_tokens
    ]
    if not kept:
        raise ValueError(
            f"evaluate: none of the {len(rows)} test prompts fits max_prompt_tokens={e.max_prompt_tokens}"
        )
    scorer = Scorer(scorer_result.outputs["model"], cfg)
    generation = json.dumps(
        {"do_sample": False, "num_beams": 1, "max_new_tokens": e.max_new_tokens, "seed": cfg.run.seed},
        sort_keys=True,
    )
    results, candidates = [], []
    for system, alpha, folder in evaluated_models(mle, grid):
        metrics, outputs = evaluate_model(cfg, folder, kept, scorer)
        for name, value in metrics.items():
            if not math.isfinite(value):
                raise ValueError(f"evaluate: {system}: {name} is {value} (a degenerate model or scorer)")
        results.append({"system": system, "alpha": alpha, "model": str(folder), **metrics})
        candidates += [
            candidate_row(r, system, text, folder, generation) for r, text in zip(kept, outputs, strict=True)
        ]
    summary = {
        "scorer": str(scorer_result.outputs["model"]),
        "scored_as": "token ids" if scorer.same_ids(probe) else "texts",
        "items": len(kept),
        "skipped_prompt_too_long": len(rows) - len(kept),
        "samples_per_prompt": e.samples_per_prompt,
        "max_new_tokens": e.max_new_tokens,
        "models": results,
    }
    return {
        "metrics": write_json_atomic(out_dir / "metrics.json", summary),
        "generations": write_table(candidates, out_dir / "generations.parquet", CANDIDATES),
    }, {"models": len(results), "items": len(kept), "skipped_prompt_too_long": len(rows) - len(kept)}


def evaluate_key(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    grid: StageResult,
    scorer: StageResult,
) -> StageKey:
    key = stage_key(
        "evaluate",
        cfg.section_hash("evaluate", "model"),
        [instructions, mle, grid, scorer],
        extra=cfg.run.seed,
        module=__name__,
    )
    return StageKey("evaluate", Path(run_dir) / "evaluate", key)


def evaluate_stage(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    grid: StageResult,
    scorer: StageResult,
) -> StageResult:
    """eq. 9 and eq. 10 under P-hat for the MLE model and every WiSE-FT model; their greedy outputs."""
    return run_stage(
        evaluate_key(cfg, run_dir, instructions, mle, grid, scorer),
        lambda out: run_evaluate(cfg, instructions, mle, grid, scorer, out),
    )


evaluate_task = stage_task(evaluate_stage, evaluate_key, gpu=True)
