"""The evaluation stages of the sequence-cpo flow: every WiSE-FT model and the MLE model on the test split, the
paper's metrics under the scoring model P-hat (eq. 9 approximate reverse-KL, eq. 10 length-normalised NLL), the
pairwise LLM-judge win rate when an endpoint is configured, and report.md.

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
from alma_r.data.io import read_rows, write_json_atomic, write_table, write_text_atomic
from alma_r.data.schemas import CANDIDATES, INSTRUCTIONS
from alma_r.models.evaluate.judge import (
    JudgeConfig,
    judge_against_references,
    write_items_jsonl,
    write_result_json,
)
from alma_r.models.generate.openai_backend import EndpointConfig
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.models.sequence.metrics import (
    generate_completion_ids,
    length_normalised_nll,
    reverse_kl,
    sequence_logps,
)
from alma_r.models.train.recipe import tokenize_pair
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key

INSTRUCTION_LP = "instruction"  # CANDIDATES rows need an `lp`; an instruction has no direction
METRICS = ("nll_greedy", "nll_samples", "reverse_kl")


def test_rows(cfg: SequenceRunConfig, instructions: StageResult) -> list[dict]:
    rows = [r for r in read_rows(instructions.path("instructions"), INSTRUCTIONS) if r["split"] == "test"]
    return rows[: cfg.evaluate.max_items]


def evaluated_models(mle: StageResult, grid: StageResult) -> list[tuple[str, float | None, str]]:
    """(system, alpha, folder): the MLE model, then the WiSE-FT grid in the config's order."""
    models = [("mle", None, mle.outputs["model"])]
    for name, folder in grid.outputs.items():
        models.append((name, float(name.removeprefix("alpha-")), folder))
    return models


# ------------------------------------------------------------------------------------------------- evaluate


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
    rows = test_rows(cfg, instructions)
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
            {"segment_id": r["id"], "lp": INSTRUCTION_LP, "system": system, "hypothesis": text,
             "model_id": str(Path(folder).resolve()), "adapter": None, "generation": generation}
            for r, text in zip(kept, outputs, strict=True)
        ]  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------- judge


def judge_query(row: dict) -> str:
    """What the judge reads as the query to the chatbot: the instruction, and its context when it has one."""
    return row["instruction"] if not row["context"] else f"{row['instruction']}\n\n{row['context']}"


def run_judge(
    cfg: SequenceRunConfig, instructions: StageResult, evaluated: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    j = cfg.judge
    by_id = {r["id"]: r for r in read_rows(instructions.path("instructions"), INSTRUCTIONS)}
    outputs_by_system: dict[str, list[dict]] = {}
    for row in read_rows(evaluated.path("generations"), CANDIDATES):
        outputs_by_system.setdefault(row["system"], []).append(row)
    endpoint = EndpointConfig(**j.endpoint.model_dump())
    judge_cfg = JudgeConfig(
        template=j.template, max_tokens=j.max_tokens, temperature=j.temperature, confidence=j.confidence
    )
    cache = Path(cfg.run.root).resolve() / "_cache" / "requests.sqlite"
    outputs, counts, results = {}, {}, {}
    for system, rows in outputs_by_system.items():
        run = judge_against_references(
            endpoint,
            [judge_query(by_id[r["segment_id"]]) for r in rows],
            [r["hypothesis"] for r in rows],
            [by_id[r["segment_id"]]["response"] for r in rows],
            cache,
            judge_cfg,
        )
        outputs[f"{system}/result"] = write_result_json(run.result, out_dir / f"{system}.json")
        outputs[f"{system}/items"] = write_items_jsonl(run.items, out_dir / f"{system}.items.jsonl")
        results[system] = {
            "win_rate": run.result.win_rate,
            "ci_low": run.result.ci_low,
            "ci_high": run.result.ci_high,
            "decided_items": run.result.decided_items,
            "invalid": run.result.invalid,
            "signature": run.result.signature,
        }
        counts[f"{system}/invalid"] = run.result.invalid
    outputs["win_rates"] = write_json_atomic(out_dir / "win_rates.json", results)
    return outputs, counts


def judge_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, evaluated: StageResult
) -> StageKey:
    key = stage_key("judge", cfg.section_hash("judge"), [instructions, evaluated], module=__name__)
    return StageKey("judge", Path(run_dir) / "judge", key)


def judge_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, evaluated: StageResult
) -> StageResult:
    """Win rate of each model's greedy outputs against the ground truth (both answer orders); nothing when no
    judge endpoint is configured."""
    where = judge_key(cfg, run_dir, instructions, evaluated)
    if cfg.judge is None:
        return run_stage(where, lambda out: ({}, {"skipped": True}))
    return run_stage(where, lambda out: run_judge(cfg, instructions, evaluated, out))


judge_task = stage_task(judge_stage, judge_key)


# --------------------------------------------------------------------------------------------------- report


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def results_table(metrics: dict, win_rates: dict) -> str:
    """One row per model: the MLE model, then each WiSE-FT alpha."""
    lines = [
        "| model | alpha | NLL eq. 10, greedy | NLL eq. 10, samples | reverse-KL eq. 9 | win rate [CI] |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics["models"]:
        judged = win_rates.get(m["system"])
        rate = "n/a"
        if judged and judged["win_rate"] is not None:
            rate = f"{judged['win_rate']:.3f} [{judged['ci_low']:.3f}, {judged['ci_high']:.3f}]"
        alpha = "-" if m["alpha"] is None else f"{m['alpha']:.2f}"
        lines.append(
            f"| {m['system']} | {alpha} | {_number(m['nll_greedy'])} | {_number(m['nll_samples'])} "
            f"| {_number(m['reverse_kl'])} | {rate} |"
        )
    return "\n".join(lines)


def render_report(
    cfg: SequenceRunConfig,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    metrics: dict,
    win_rates: dict,
) -> str:
    t, n = cfg.train, cfg.negatives
    kinds = ", ".join(
        f"{count} {name}"
        for name, count in (
            ("BN", n.batch),
            ("MN", n.meanfield),
            ("TN", n.truncation),
            ("AN", n.autoregressive),
        )
        if count
    )
    judge_line = (
        "no judge endpoint configured (win rate n/a)"
        if cfg.judge is None
        else f"{cfg.judge.endpoint.model} at {cfg.judge.endpoint.base_url}, template {cfg.judge.template}, both "
        f"answer orders; Wilson {cfg.judge.confidence:.0%} interval over items decided in both orders"
    )
    return f"""# sequence-cpo run `{cfg.run.name}`

Sequence-level CPO with synthetic negatives (shared/seeds/003), instruction following.

- Data: `{cfg.data.path}`: {instructions.counts["train"]} training and {instructions.counts["test"]} test
  instructions; {metrics["items"]} evaluated ({metrics["skipped_prompt_too_long"]} test prompts over the limit).
- MLE: {mle.counts["steps"]} steps x {cfg.mle.batch_size}, lr {cfg.mle.learning_rate}.
- CPO: {cpo.counts["steps"]} steps x {t.batch_size}, loss {t.loss} (eq. {7 if t.loss == "best_of_k" else 8}),
  beta {t.beta}, lr {t.learning_rate}; negatives per example: {kinds}.
- WiSE-FT: alpha x MLE + (1 - alpha) x CPO (alpha 1 = the MLE model, 0 = the CPO model).
- Scoring model P-hat: `{metrics["scorer"]}` (scored as {metrics["scored_as"]}). NLL eq. 10: mean over
  instructions of -log P-hat(y|x) / |y| (tokens, EOS included) of the greedy output and of
  {metrics["samples_per_prompt"]} samples (temperature 1, no top-k); reverse-KL eq. 9: Monte Carlo mean over those
  samples of log Q(y|x) - log P-hat(y|x). Lower is better for both; at most {metrics["max_new_tokens"]} new tokens.
- Judge: {judge_line}.

{results_table(metrics, win_rates)}
"""


def run_report(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
    out_dir: Path,
) -> tuple[dict, dict]:
    metrics = json.loads(evaluated.path("metrics").read_text(encoding="utf-8"))
    win_rates = json.loads(judge.path("win_rates").read_text()) if "win_rates" in judge.outputs else {}
    text = render_report(cfg, instructions, mle, cpo, metrics, win_rates)
    report = write_text_atomic(out_dir / "report.md", text)
    write_text_atomic(Path(run_dir) / "report.md", text)  # beside run.json, as build-alma-r's
    return {"report": report}, {"rows": len(metrics["models"])}


def report_key(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
) -> StageKey:
    key = stage_key(
        "report",
        cfg.section_hash("run", "data", "mle", "negatives", "train", "judge"),
        [instructions, mle, cpo, evaluated, judge],
        module=__name__,
    )
    return StageKey("report", Path(run_dir) / "report", key)


def report_stage(
    cfg: SequenceRunConfig,
    run_dir: Path,
    instructions: StageResult,
    mle: StageResult,
    cpo: StageResult,
    evaluated: StageResult,
    judge: StageResult,
) -> StageResult:
    """report.md: one row per model (MLE, each WiSE-FT alpha) with eq. 10, eq. 9 and the win rate."""
    return run_stage(
        report_key(cfg, run_dir, instructions, mle, cpo, evaluated, judge),
        lambda out: run_report(cfg, run_dir, instructions, mle, cpo, evaluated, judge, out),
    )


report_task = stage_task(report_stage, report_key)
