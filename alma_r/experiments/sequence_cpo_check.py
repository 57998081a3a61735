"""`alma-r sequence-cpo`: continued MLE vs sequence-level CPO with synthetic negatives, measured on the
synthetic task of the learning check (models/synthetic.py) with CLEAN references.

    alma-r sequence-cpo [--seeds 1] [--write-doc] [--cache-dir runs/_cache/sequence-cpo]

The design follows the experiment of "Sequence-level Large Language Model Training with Contrastive Preference
Optimization" (anonymous ACL submission, section 5) at toy scale:

    MLE: a tiny LLaMA trained on clean references and stopped early (CPORecipe, loss sft)
      -> from it, the same number of steps on the same other sources, one run per row:
         continued MLE (NLL on the references), sequence-level CPO (beta 5) with BN, MN, TN negatives alone
         (4 each, the paper's table 1), MixN (3 BN + 5 MN + 3 TN), AN (4 top-k 50 samples of the starting
         model made offline into CANDIDATES Parquet files), and the same with the ranking signal (R)
      -> WiSE-FT of MixNR with the starting MLE model, alpha in a grid
      -> evaluation on held-out sources: greedy translations scored by the oracle (exact match, oracle
         score) and, under a larger model trained longer on the same clean data (cached), the length-normalised
         NLL of eq. 10 (of greedy outputs and of samples) and the approximate reverse-KL of eq. 9 (Monte Carlo
         over samples of the evaluated model, models/sequence/metrics.py)

The tables and the doc section it writes are alma_r/experiments/sequence_cpo_report.py's.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from alma_r.data.io import write_table
from alma_r.data.schemas import CANDIDATES
from alma_r.experiments.learning_check import Sizes as LearningCheckSizes
from alma_r.experiments.learning_check import one_torch_thread, train_sft
from alma_r.models import synthetic
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.sequence.metrics import (
    generate_completion_ids,
    length_normalised_nll,
    reverse_kl,
    sequence_logps,
)
from alma_r.models.sequence.negatives import NegativeMix, read_autoregressive_samples
from alma_r.models.sequence.trainer import SequenceCPORecipe, SequenceCPOSettings
from alma_r.models.sequence.wise_ft import wise_ft_grid
from alma_r.models.train.batching import tokenize_pair
from alma_r.models.train.metrics import read_metrics
from alma_r.models.train.recipe import CPORecipe
from alma_r.models.train.settings import TrainSettings


def _one_kind(kind: str, n: int = 4) -> NegativeMix:
    counts = {"batch": 0, "meanfield": 0, "truncation": 0, kind: n}
    return NegativeMix(**counts)


# row -> (negatives, ranking); None = continued MLE
RUNS: dict[str, tuple[NegativeMix | None, bool]] = {
    "mle": (None, False),
    "bn": (_one_kind("batch"), False),
    "mn": (_one_kind("meanfield"), False),
    "tn": (_one_kind("truncation"), False),
    "mixn": (NegativeMix(), False),
    "bnr": (_one_kind("batch"), True),
    "mnr": (_one_kind("meanfield"), True),
    "tnr": (_one_kind("truncation"), True),
    "mixnr": (NegativeMix(), True),
    "an": (_one_kind("autoregressive"), False),
    "anr": (_one_kind("autoregressive"), True),
}
DEFAULT_ROWS = ("mle", "bn", "mn", "tn", "mixn", "mixnr")


@dataclass(frozen=True)
class CheckSizes:
    """Small enough for about 10 minutes on one CPU thread; every number is the same for every row."""

    train_sentences: int = 20_000  # MLE (and scorer) data, clean references
    mle_steps: int = 100  # stopped early: measured, exact match 0.51 at 100 steps, 0.83 at 120, 1.0 at 150
    mle_batch: int = 64
    mle_lr: float = 2e-3
    continue_sources: int = 2_000  # other sources, clean references, for every continuation row
    steps: int = 150  # continuation steps, every row
    batch: int = 8  # examples per step, every row
    lr: float = 1e-4  # constant, AdamW, every row (the paper's 1e-5 is for 3B-parameter models)
    weight_decay: float = 0.05  # the paper's
    beta: float = 5.0  # the paper's
    meanfield_share: float = 0.25
    test_sources: int = 500
    samples_per_source: int = 2  # samples of each evaluated model for eq. 9 / eq. 10
    max_new_tokens: int = 16
    scorer_hidden: int = 192  # the "larger model trained longer": 3 heads x 64, 3 layers, 4x the MLE steps
    scorer_layers: int = 3
    scorer_intermediate: int = 336
    scorer_steps: int = 400
    wise_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    rows: tuple[str, ...] = DEFAULT_ROWS


@dataclass
class SeedResult:
    seed: int
    metrics: dict[str, dict[str, float]]  # row -> metric -> value
    start_dir: Path
    scorer_dir: Path
    seconds: dict[str, float]
    training: dict[str, dict[str, float]] = field(default_factory=dict)  # CPO row -> first/last step metrics


def log(message: str) -> None:
    print(f"[sequence-cpo] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- training


def _mle(base_dir: Path, task: synthetic.TaskData, steps: int, seed: int, out_dir: Path, lr: float) -> Path:
    sizes = LearningCheckSizes(sft_steps=steps, sft_batch=64, sft_lr=lr)
    return train_sft(base_dir, task, sizes, seed, out_dir)


def train_scorer(task: synthetic.TaskData, sizes: CheckSizes, seed: int, cache_dir: Path) -> Path:
    """The larger scoring model P-hat, trained once per (seed, sizes) and kept in cache_dir."""
    key = {
        "seed": seed,
        "train_sentences": sizes.train_sentences,
        "hidden": sizes.scorer_hidden,
        "layers": sizes.scorer_layers,
        "intermediate": sizes.scorer_intermediate,
        "steps": sizes.scorer_steps,
        "lr": sizes.mle_lr,
        "code": 1,  # bump when the way it is trained changes
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"scorer-{digest}"
    if (folder / "model" / "model.safetensors").is_file():
        log(f"scorer: reusing {folder / 'model'}")
        return folder / "model"
    base = synthetic.build_model(
        folder / "base", seed + 1000, sizes.scorer_hidden, sizes.scorer_layers, sizes.scorer_intermediate
    )
    model = _mle(base, task, sizes.scorer_steps, seed, folder, sizes.mle_lr)
    (folder / "key.json").write_text(json.dumps(key, indent=1))
    return model


def continue_mle(start_dir: Path, segments, sizes: CheckSizes, seed: int, out_dir: Path) -> Path:
    settings = TrainSettings(
        loss_type="sft",
        finetune="full",
        learning_rate=sizes.lr,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=sizes.weight_decay,
        max_steps=sizes.steps,
        batch_size=sizes.batch,
        max_prompt_length=64,
        max_length=128,
        save_steps=10**9,
        logging_steps=50,
    )
    examples = [{"prompt": s.prompt, "chosen": s.ref, "rejected": s.ref} for s in segments]
    recipe = CPORecipe(settings, str(start_dir), examples, out_dir, seed=seed)
    return recipe.setup().train().save(out_dir / "model")


def autoregressive_samples(
    start_dir: Path, segments, sizes: CheckSizes, seed: int, out_dir: Path, n: int = 4
) -> dict[str, list[str]]:
    """AN: n top-k 50 samples per source from the starting model (the reference), made offline as the
    generation stage makes them (generate_translations, one seeded pass per sample, one CANDIDATES file per
    sample system an-1..an-n), then read back through the schema check (models/sequence/negatives.py)."""
    tokenizer, model = load_tokenizer(str(start_dir)), load_model(str(start_dir))
    decoding = Decoding(do_sample=True, temperature=1.0, top_k=50, max_new_tokens=sizes.max_new_tokens)
    settings = json.dumps(asdict(decoding), sort_keys=True)
    prompts = [s.prompt for s in segments]
    paths = []
    for k in range(1, n + 1):
        texts = generate_translations(model, tokenizer, prompts, decoding, 500, 64, seed=seed + k, desc="AN")
        rows = [
            {"segment_id": s.id, "lp": s.lp, "system": f"an-{k}", "hypothesis": text, "model_id": str(start_dir),
             "generation": settings}
            for s, text in zip(segments, texts, strict=True)
            if text is not None
        ]  # fmt: skip
        paths.append(write_table(rows, Path(out_dir) / f"an-{k}.parquet", CANDIDATES))
    return read_autoregressive_samples(paths)


def train_cpo(
    start_dir: Path,
    segments,
    sizes: CheckSizes,
    seed: int,
    out_dir: Path,
    run: str,
    samples: dict[str, list[str]] | None = None,
) -> Path:
    """One CPO row; `samples` (segment id -> texts) for the AN rows."""
    mix, ranking = RUNS[run]
    settings = SequenceCPOSettings(
        loss="plackett_luce" if ranking else "best_of_k",
        beta=sizes.beta,
        # ranked rows: the starting model's mean-pooled states; never the scorer
        embedding_model=str(start_dir) if ranking else None,
        negatives=NegativeMix(**{**mix.model_dump(), "meanfield_share": sizes.meanfield_share}),
        learning_rate=sizes.lr,
        weight_decay=sizes.weight_decay,
        batch_size=sizes.batch,
        max_steps=sizes.steps,
        max_prompt_length=64,
        max_length=128,
        logging_steps=50,
    )
    examples = [{"id": s.id, "prompt": s.prompt, "target": s.ref} for s in segments]
    recipe = SequenceCPORecipe(settings, str(start_dir), examples, out_dir, samples, seed=seed)
    return recipe.setup().train().save(out_dir / "model")


def training_summary(metrics_path: Path) -> dict[str, float]:
    """The CPO loss, ground-truth-on-top accuracy and ground-truth log-prob at the first and last logged step
    (each on that step's batch, before its update)."""
    records = read_metrics(metrics_path)
    first, last = records[0], records[-1]
    return {
        "loss_first": first["loss"],
        "loss_last": last["loss"],
        "accuracy_last": last["rewards/accuracies"],
        "logp_gt_first": first["logps/ground_truth"],
        "logp_gt_last": last["logps/ground_truth"],
    }


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_model(model_dir: Path, scorer, segments, sizes: CheckSizes, seed: int) -> dict[str, float]:
    """Oracle metrics of greedy outputs; eq. 10 of greedy outputs and of samples, eq. 9 on samples, under
    the scorer; and the truncation margin: mean log pi(ground truth) - log pi(its strict prefixes + EOS)."""
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in segments]
    greedy = generate_completion_ids(model, prompts, eos, pad, False, sizes.max_new_tokens, seed)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in greedy]
    metrics = synthetic.evaluate_outputs([s.src for s in segments], texts)
    p_greedy, n_greedy = sequence_logps(scorer, prompts, greedy, pad)
    metrics["nll_greedy"] = length_normalised_nll(p_greedy, n_greedy)

    n = sizes.samples_per_source
    rep_prompts = [p for p in prompts for _ in range(n)]
    groups = [i for i in range(len(prompts)) for _ in range(n)]
    samples = generate_completion_ids(model, rep_prompts, eos, pad, True, sizes.max_new_tokens, seed + 1)
    q, _ = sequence_logps(model, rep_prompts, samples, pad)
    p, counts = sequence_logps(scorer, rep_prompts, samples, pad)
    metrics["nll_samples"] = length_normalised_nll(p, counts, groups)
    metrics["reverse_kl"] = reverse_kl(q, p, groups)
    metrics["truncation_margin"] = truncation_margin(model, tokenizer, segments)
    return metrics


def truncation_margin(model, tokenizer, segments) -> float:
    """Mean over sources and every strict prefix of log pi(y) - log pi(prefix + EOS): how much more likely the
    model finds the full ground truth than its truncations (what TN negatives train)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts, completions, owner, is_full = [], [], [], []
    for i, s in enumerate(segments):
        ids = tokenize_pair(tokenizer, s.prompt, s.ref, s.ref)
        content = ids["chosen_ids"][:-1]
        for j, seq in enumerate([ids["chosen_ids"]] + [content[:c] + [eos] for c in range(len(content))]):
            prompts.append(ids["chosen_prompt_ids"])
            completions.append(seq)
            owner.append(i)
            is_full.append(j == 0)
    logps = sequence_logps(model, prompts, completions, pad)[0].tolist()
    full = {owner[k]: logps[k] for k in range(len(logps)) if is_full[k]}
    return statistics.fmean(full[owner[k]] - logps[k] for k in range(len(logps)) if not is_full[k])


# ------------------------------------------------------------------------------------------------- a seed


def run_seed(sizes: CheckSizes, seed: int, work_dir: Path, cache_dir: Path) -> SeedResult:
    with one_torch_thread():
        return _run_seed(sizes, seed, Path(work_dir), Path(cache_dir))


def _run_seed(sizes: CheckSizes, seed: int, work_dir: Path, cache_dir: Path) -> SeedResult:
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args):
        began = time.perf_counter()
        out = fn(*args)
        seconds[name] = time.perf_counter() - began
        return out

    task = synthetic.make_task(
        seed,
        sizes.train_sentences,
        sizes.continue_sources,
        sizes.test_sources,
        p_drop_adj=0.0,
        p_drop_adv=0.0,
    )
    base = synthetic.build_model(work_dir / "base", seed)
    start = timed("mle", _mle, base, task, sizes.mle_steps, seed, work_dir / "start", sizes.mle_lr)
    scorer_dir = timed("scorer", train_scorer, task, sizes, seed, cache_dir)
    scorer = load_model(str(scorer_dir))
    metrics = {"start": timed("evaluate start", evaluate_model, start, scorer, task.test, sizes, seed)}
    log(f"seed {seed}: start exact match {metrics['start']['exact_match']:.3f}")
    samples = None
    if any(RUNS[run][0] is not None and RUNS[run][0].autoregressive for run in sizes.rows):
        samples = timed(
            "AN samples",
            autoregressive_samples,
            start,
            task.preference,
            sizes,
            seed,
            work_dir / "an-candidates",
        )
    dirs, training = {}, {}
    for run in sizes.rows:
        train = continue_mle if run == "mle" else partial(train_cpo, run=run, samples=samples)
        dirs[run] = timed(f"train {run}", train, start, task.preference, sizes, seed, work_dir / run)
        metrics[run] = timed(f"evaluate {run}", evaluate_model, dirs[run], scorer, task.test, sizes, seed)
        log(f"seed {seed}: {run} exact match {metrics[run]['exact_match']:.3f}")
        if run != "mle":
            training[run] = training_summary(work_dir / run / "metrics.jsonl")
    # WiSE-FT of the last CPO row (MixNR when it ran) with the starting model
    ensembled = "mixnr" if "mixnr" in dirs else next((r for r in reversed(sizes.rows) if r != "mle"), None)
    if ensembled and sizes.wise_alphas:
        began = time.perf_counter()
        grid = wise_ft_grid(start, dirs[ensembled], list(sizes.wise_alphas), work_dir / f"wise-{ensembled}")
        for alpha, folder in grid.items():
            metrics[f"wise:{ensembled}:{alpha:.2f}"] = evaluate_model(folder, scorer, task.test, sizes, seed)
        seconds["wise-ft"] = time.perf_counter() - began
    return SeedResult(seed, metrics, start, scorer_dir, seconds, training)


def run_check(
    sizes: CheckSizes, seeds: list[int], cache_dir: Path, work_dir: Path | None = None
) -> list[SeedResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="alma-r-sequence-cpo-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        for seed in seeds:
            results.append(run_seed(sizes, seed, root / f"seed{seed}", cache_dir))
    return results
