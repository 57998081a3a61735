"""`alma-r sequence-cpo-converged`: sequence-level CPO as the paper ran it ("Sequence-level Large Language Model
Training with Contrastive Preference Optimization", anonymous ACL submission, section 5), at toy scale on the
synthetic translation task (models/synthetic.py) with CLEAN references:

    MLE to its plateau: a tiny LLaMA trained with next-token prediction (CPORecipe, loss sft, constant lr), a
      checkpoint every `mle_eval_every` steps; each checkpoint's validation NLL (length-normalised NLL of the
      validation references under the model itself); the model is the checkpoint where the NLL stopped
      improving (`plateau_step`: no gain above `plateau_tol` for `plateau_patience` evaluations); pi_ref of
      every CPO row and the start of every row
      -> from it, at equal steps on the same other sources, continued MLE and each CPO row (BN, MN, TN, MixN, AN,
         with and without ranking; MN from the policy, the paper's), each row trained with every learning rate
         of `lr_grid` and the one with the best validation oracle score of greedy outputs kept (`choose_lr`:
         ties -> the smaller learning rate)
      -> the kept model of each row on the test split: exact match and oracle score of greedy outputs, eq. 10
         NLL and eq. 9 reverse-KL under a larger scorer (sequence_cpo_check.evaluate_model), and the pairwise
         win rate of its greedy outputs against the ground truth through the judge code path
         (models/evaluate/judge.py: both answer orders, Wilson interval) with the oracle as the judge.

The page it writes is alma_r/experiments/sequence_cpo_converged_doc.py's.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from alma_r.experiments import sequence_cpo_check as check
from alma_r.experiments.learning_check import one_torch_thread
from alma_r.models import synthetic
from alma_r.models.evaluate.judge import judge_prompts, score_answers, summarise
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.sequence.metrics import generate_completion_ids, length_normalised_nll, sequence_logps
from alma_r.models.train.batching import tokenize_pair
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings

CPO_ROWS = ("bn", "mn", "tn", "mixn", "an", "bnr", "mnr", "tnr", "mixnr", "anr")
ROWS = ("mle", *CPO_ROWS)


@dataclass(frozen=True)
class ConvergedSizes:
    """Every number is the same for every row; about 10 minutes a seed on one CPU thread."""

    train_sentences: int = 20_000  # MLE (and scorer) data, clean references
    mle_batch: int = 64
    mle_lr: float = 2e-3  # constant
    mle_max_steps: int = 600
    mle_eval_every: int = 50
    plateau_tol: float = 0.002  # validation NLL (nats per token) gains at most this count as no gain
    plateau_patience: int = 2
    continue_sources: int = 800  # = steps x batch: each source once
    steps: int = 100
    batch: int = 8
    lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    validation_sources: int = 200
    test_sources: int = 500
    rows: tuple[str, ...] = ROWS
    check: check.CheckSizes = field(default_factory=check.CheckSizes)  # beta, MN share, scorer, evaluation


@dataclass
class SeedRun:
    seed: int
    plateau_step: int
    nll_curve: list[tuple[int, float]]  # (step, validation NLL) of every MLE checkpoint
    metrics: dict[str, dict[str, float]]  # row ("start" = the plateau MLE model) -> metric -> value
    chosen_lr: dict[str, float]
    validation: dict[str, dict[float, float]]  # row -> lr -> validation oracle score
    seconds: dict[str, float] = field(default_factory=dict)
    start_dir: Path | None = None  # the plateau MLE model


def log(message: str) -> None:
    print(f"[sequence-cpo-converged] {message}", flush=True)


# ------------------------------------------------------------------------------------------------- rules


def plateau_step(curve: list[tuple[int, float]], tol: float, patience: int) -> int:
    """The step of the best validation NLL before the first `patience` evaluations in a row that each fail to
    beat the best so far by more than `tol`; the best step of the whole curve when that never happens."""
    best_step, best, misses = curve[0][0], curve[0][1], 0
    for step, value in curve[1:]:
        if value < best - tol:
            best_step, best, misses = step, value, 0
        else:
            misses += 1
            if misses >= patience:
                return best_step
    return best_step


def choose_lr(scores: dict[float, float]) -> float:
    """The learning rate with the highest validation score; equal scores -> the smaller learning rate."""
    return min(scores, key=lambda lr: (-scores[lr], lr))


# one line each: no text of the synthetic task holds a newline
_PROMPT = re.compile(r"Query: (.*)\n Response A: (.*)\n Response B: (.*)\n")


def oracle_judge(prompt: str) -> str:
    """The judge of the synthetic task: reads the source and the two responses from the judge template and
    answers the letter of the response with the higher oracle score; equal scores -> "A" (pure position
    bias, which the two answer orders turn into a tie)."""
    query, a, b = _PROMPT.search(prompt).groups()
    return "A" if synthetic.oracle_score(query, a) >= synthetic.oracle_score(query, b) else "B"


def oracle_win_rate(sources: list[str], outputs: list[str], references: list[str]) -> dict[str, float]:
    """The win rate of `outputs` against `references` through models/evaluate/judge.py's prompts, item scores
    and Wilson interval, with oracle_judge answering."""
    answers = [oracle_judge(p) for p in judge_prompts(sources, outputs, references, "dolly")]
    result = summarise(score_answers(answers), "oracle", "dolly", "oracle judge (synthetic task)")
    return {"win_rate": result.win_rate, "win_ci_low": result.ci_low, "win_ci_high": result.ci_high}


# --------------------------------------------------------------------------------------------- training


def _greedy_texts(model, tokenizer, segments, max_new_tokens: int, seed: int) -> list[str]:
    prompts = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in segments]
    ids = generate_completion_ids(
        model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, False, max_new_tokens, seed
    )
    return [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]


def validation_nll(model, tokenizer, segments) -> float:
    """Eq. 10's length-normalised NLL of the validation references under the model itself."""
    pairs = [tokenize_pair(tokenizer, s.prompt, s.ref, s.ref) for s in segments]
    logps, counts = sequence_logps(
        model,
        [p["chosen_prompt_ids"] for p in pairs],
        [p["chosen_ids"] for p in pairs],
        tokenizer.pad_token_id,
    )
    return length_normalised_nll(logps, counts)


def mle_to_plateau(base: Path, task, validation, sizes: ConvergedSizes, seed: int, out: Path):
    """(model folder at the plateau, plateau step, NLL curve). One continuous run of mle_max_steps (one optimizer,
    one schedule); every mle_eval_every steps the validation NLL of the model as it is and a copy of its weights."""
    settings = TrainSettings(
        loss_type="sft", finetune="full", learning_rate=sizes.mle_lr, lr_scheduler="constant",
        warmup_ratio=0.0, weight_decay=0.0, max_steps=sizes.mle_max_steps, batch_size=sizes.mle_batch,
        max_prompt_length=64, max_length=128, save_steps=10**9, logging_steps=50,
    )  # fmt: skip
    examples = [{"prompt": s.prompt, "chosen": s.ref, "rejected": s.ref} for s in task.train]
    recipe = CPORecipe(settings, str(base), examples, out, seed=seed).setup()
    curve, weights, optimizer_step = [], {}, recipe._optimizer_step

    def step_then_validate():
        result = optimizer_step()
        if recipe.step % sizes.mle_eval_every == 0 or recipe.step == sizes.mle_max_steps:
            curve.append((recipe.step, validation_nll(recipe.model, recipe.tokenizer, validation)))
            weights[recipe.step] = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
            recipe.model.train()
        return result

    recipe._optimizer_step = step_then_validate
    recipe.train()
    step = plateau_step(curve, sizes.plateau_tol, sizes.plateau_patience)
    recipe.model.load_state_dict(weights[step])
    return recipe.save(out / "plateau"), step, curve


def _row_sizes(sizes: ConvergedSizes, lr: float) -> check.CheckSizes:
    return replace(sizes.check, steps=sizes.steps, batch=sizes.batch, lr=lr)


def train_row(row: str, start: Path, task, sizes: ConvergedSizes, lr: float, seed: int, out: Path, samples):
    train = check.continue_mle if row == "mle" else partial(check.train_cpo, run=row, samples=samples)
    return train(start, task.preference, _row_sizes(sizes, lr), seed, out)


def validation_oracle(model_dir: Path, validation, sizes: ConvergedSizes, seed: int) -> float:
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    texts = _greedy_texts(model, tokenizer, validation, sizes.check.max_new_tokens, seed)
    return synthetic.evaluate_outputs([s.src for s in validation], texts)["oracle"]


def test_metrics(model_dir: Path, scorer, test, sizes: ConvergedSizes, seed: int) -> dict[str, float]:
    metrics = check.evaluate_model(model_dir, scorer, test, sizes.check, seed)
    model, tokenizer = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    texts = _greedy_texts(model, tokenizer, test, sizes.check.max_new_tokens, seed)
    return metrics | oracle_win_rate([s.src for s in test], texts, [s.ref for s in test])


# ------------------------------------------------------------------------------------------------- a seed


def make_splits(sizes: ConvergedSizes, seed: int):
    """(task, validation, test): clean references, disjoint sources; validation and test split the held-out ones."""
    n_held_out = sizes.validation_sources + sizes.test_sources
    task = synthetic.make_task(seed, sizes.train_sentences, sizes.continue_sources, n_held_out, 0.0, 0.0)
    return task, task.test[: sizes.validation_sources], task.test[sizes.validation_sources :]


def run_seed(sizes: ConvergedSizes, seed: int, work: Path, cache_dir: Path) -> SeedRun:
    with one_torch_thread():
        return _run_seed(sizes, seed, Path(work), Path(cache_dir))


def _run_seed(sizes: ConvergedSizes, seed: int, work: Path, cache_dir: Path) -> SeedRun:
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    task, validation, test = make_splits(sizes, seed)
    base = synthetic.build_model(work / "base", seed)
    start, step, curve = mle_to_plateau(base, task, validation, sizes, seed, work / "mle")
    seconds["mle"] = time.perf_counter() - began
    log(f"seed {seed}: MLE plateau at step {step} (validation NLL {dict(curve)[step]:.4f})")
    scorer_task = replace(task, test=test)
    scorer = load_model(str(check.train_scorer(scorer_task, sizes.check, seed, cache_dir)))
    metrics = {"start": test_metrics(start, scorer, test, sizes, seed)}
    samples = None
    if any(check.RUNS[r][0] is not None and check.RUNS[r][0].autoregressive for r in sizes.rows):
        samples = check.autoregressive_samples(start, task.preference, sizes.check, seed, work / "an")
    chosen, validation_scores = {}, {}
    for row in sizes.rows:
        t0, folders, scores = time.perf_counter(), {}, {}
        for lr in sizes.lr_grid:
            folders[lr] = train_row(row, start, task, sizes, lr, seed, work / row / f"lr-{lr:g}", samples)
            scores[lr] = validation_oracle(folders[lr], validation, sizes, seed)
        chosen[row], validation_scores[row] = choose_lr(scores), scores
        metrics[row] = test_metrics(folders[chosen[row]], scorer, test, sizes, seed)
        seconds[row] = time.perf_counter() - t0
        log(f"seed {seed}: {row} lr {chosen[row]:g} exact match {metrics[row]['exact_match']:.3f}")
    return SeedRun(seed, step, curve, metrics, chosen, validation_scores, seconds, start)


def run_converged(
    sizes: ConvergedSizes, seeds: list[int], cache_dir: Path, work_dir: Path | None = None, jobs: int = 1
) -> list[SeedRun]:
    """Every seed, `jobs` at a time (each in its own process on one torch thread: the seeds share nothing)."""
    with tempfile.TemporaryDirectory(prefix="alma-r-sequence-cpo-converged-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        args = [(sizes, seed, root / f"seed{seed}", cache_dir) for seed in seeds]
        if jobs <= 1:
            return [run_seed(*a) for a in args]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no forked torch state
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            return list(pool.map(run_seed, *zip(*args, strict=True)))
