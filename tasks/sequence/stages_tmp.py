"""The training stages of the sequence-cpo flow (flows/sequence_cpo.py): Dolly-style data -> tiny model -> MLE
-> autoregressive negatives -> sequence-level CPO -> WiSE-FT grid, plus the larger scoring model of eq. 9/10.

Each stage is `<name>_key` (where it writes, the content key its outputs are valid for) + `<name>_stage`
(compute or reuse, tasks/runtime/stage.py) + `<name>_task` (the cached Prefect task, tasks/runtime/prefect_stage.py). Stages
exchange files only: instructions.parquet (INSTRUCTIONS), model folders (safetensors + tokenizer) and the
generation stage's CANDIDATES files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from alma_r.config import config_base_dir, resolve_path
from alma_r.config.sequence import MleSection, SequenceRunConfig
from alma_r.data.dolly import ingest_dolly
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, INSTRUCTIONS
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer, pick_device
from alma_r.models.sequence.negatives import read_autoregressive_samples
from alma_r.models.sequence.trainer import SequenceCPORecipe, SequenceCPOSettings
from alma_r.models.sequence.wise_ft import alpha_dir_name, wise_ft_grid
from alma_r.models.tiny import build_tiny_model
from alma_r.models.train.recipe import CPORecipe, TrainSettings, plot_curves
from alma_r.tasks.runtime.prefect_stage import stage_task
from alma_r.tasks.runtime.stage import StageKey, StageResult, run_stage, stage_key

# CANDIDATES rows need an `lp`; an instruction has no translation direction.
INSTRUCTION_LP = "instruction"


def fields_hash(**fields) -> str:
    """A fingerprint of a few config fields, for a stage that depends on part of a section only."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_rows(instructions: StageResult, split: str) -> list[dict]:
    return [r for r in read_rows(instructions.path("instructions"), INSTRUCTIONS) if r["split"] == split]


def dolly_path(cfg: SequenceRunConfig) -> Path:
    return resolve_path(cfg.data.path, config_base_dir(cfg))


# --------------------------------------------------------------------------------------------------- ingest


def run_ingest(cfg: SequenceRunConfig, out_dir: Path) -> tuple[dict, dict]:
    source = dolly_path(cfg)
    path = ingest_dolly(source, out_dir / "instructions.parquet", cfg.data.dolly())
    splits = [r["split"] for r in read_rows(path, INSTRUCTIONS)]
    train, test = splits.count("train"), splits.count("test")
    if not train or not test:
        # Every later stage needs both: MLE and CPO train on one, the evaluation reads the other.
        raise ValueError(
            f"{source}: data.test_fraction={cfg.data.test_fraction} left {train} training and {test} test "
            "instructions; both splits need at least one"
        )
    return {"instructions": path}, {"examples": len(splits), "train": train, "test": test}


def ingest_key(cfg: SequenceRunConfig, run_dir: Path) -> StageKey:
    key = stage_key("ingest", cfg.section_hash("data"), files=[dolly_path(cfg)], module=__name__)
    return StageKey("ingest", Path(run_dir) / "ingest", key)


def ingest_stage(cfg: SequenceRunConfig, run_dir: Path) -> StageResult:
    """The Dolly-style file, validated, with its prompt and split -> instructions.parquet."""
    return run_stage(ingest_key(cfg, run_dir), lambda out: run_ingest(cfg, out))


ingest_task = stage_task(ingest_stage, ingest_key)


# -------------------------------------------------------------------------------------------- prepare_model


def run_prepare_model(cfg: SequenceRunConfig, instructions: StageResult, out_dir: Path) -> tuple[dict, dict]:
    if cfg.model.base != "tiny":
        return {"model": cfg.model.base}, {"built": False}
    # The tokenizer learns from the training split only (prompts, so that the template is cheap, and
    # responses): test instructions must not leak into the vocabulary.
    rows = split_rows(instructions, "train")
    texts = [r["prompt"] for r in rows] + [r["response"] for r in rows]
    path = build_tiny_model(texts, out_dir / "model", **cfg.model.tiny.model_dump(), seed=cfg.run.seed)
    return {"model": path}, {"built": True, "tokenizer_texts": len(texts)}


def prepare_model_key(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageKey:
    upstream = [instructions] if cfg.model.base == "tiny" else []
    key = stage_key("prepare_model", cfg.section_hash("model"), upstream, extra=cfg.run.seed, module=__name__)
    return StageKey("prepare_model", Path(run_dir) / "prepare_model", key)


def prepare_model_stage(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult) -> StageResult:
    """The base model: a tiny LLaMA built from the training split, or model.base handed through."""
    return run_stage(
        prepare_model_key(cfg, run_dir, instructions), lambda out: run_prepare_model(cfg, instructions, out)
    )


prepare_model_task = stage_task(prepare_model_stage, prepare_model_key)


# ------------------------------------------------------------------------------------------------------ mle


def mle_settings(cfg: SequenceRunConfig, section: MleSection) -> TrainSettings:
    """Next-token prediction on prompt + response: the CPO engine's `sft` loss (NLL of the chosen side), every
    weight trained. `section` is cfg.mle, or cfg.scorer for the scoring model."""
    return TrainSettings(
        **section.model_dump(include=set(MleSection.model_fields)),  # the scorer's model / tiny stay out
        loss_type="sft",
        seed=cfg.run.seed,
        lora=None,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def train_mle(settings: TrainSettings, base_model: str, rows: list[dict], out_dir: Path, title: str):
    """CPORecipe with loss sft: a pair whose two sides are the response is one MLE example."""
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["response"]} for r in rows]
    recipe = CPORecipe(settings, base_model, pairs, out_dir).setup().train()
    model_dir = recipe.save(out_dir / "model")
    plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png", title)
    summary = recipe.summary()
    counts = {
        "examples": summary["pairs"],
        "examples_used": summary["pairs_used"],
        "steps": summary["steps"],
        **{f"skipped_{k}": v for k, v in summary["skipped"].items()},
    }
    return {"model": model_dir, "metrics": out_dir / "metrics.jsonl"}, counts


def mle_key(cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult) -> StageKey:
    key = stage_key(
        "mle", cfg.section_hash("mle", "model"), [instructions, base], extra=cfg.run.seed, module=__name__
    )
    return StageKey("mle", Path(run_dir) / "mle", key)


def mle_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageResult:
    """The MLE model (pi_ref of CPO, alpha = 1 of WiSE-FT); resumes from its last checkpoint."""
    return run_stage(
        mle_key(cfg, run_dir, instructions, base),
        lambda out: train_mle(
            mle_settings(cfg, cfg.mle),
            base.outputs["model"],
            split_rows(instructions, "train"),
            out,
            "MLE",
        ),
        resumable=True,
    )


mle_task = stage_task(mle_stage, mle_key, gpu=True)


# ------------------------------------------------------------------------------------------------- generate


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
            {"segment_id": r["id"], "lp": INSTRUCTION_LP, "system": system, "hypothesis": text,
             "model_id": str(Path(model_dir).resolve()), "adapter": None, "generation": settings}
            for r, text in zip(rows, texts, strict=True)
            if text is not None
        ]  # fmt: skip
        outputs[f"candidates/{system}"] = write_table(
            candidates, out_dir / "candidates" / f"{system}.parquet", CANDIDATES
        )
        counts[f"{system}/generated"] = len(candidates)
        counts[f"{system}/skipped_prompt_too_long"] = len(rows) - len(candidates)
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


# ---------------------------------------------------------------------------------------------------- train


def sequence_settings(cfg: SequenceRunConfig) -> SequenceCPOSettings:
    t = cfg.train
    embedding = t.embedding_model and str(resolve_path(t.embedding_model, config_base_dir(cfg)))
    return SequenceCPOSettings(
        **t.model_dump(exclude={"loss", "embedding_model"}),
        ranking=t.loss == "plackett_luce",
        embedding_model=embedding,  # None: the starting (MLE) model's own states
        negatives=cfg.negatives.mix(),
        seed=cfg.run.seed,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    )


def run_train(
    cfg: SequenceRunConfig, instructions: StageResult, mle: StageResult, samples: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    examples = [
        {"id": r["id"], "prompt": r["prompt"], "target": r["response"]}
        for r in split_rows(instructions, "train")
    ]
    an = None
    if cfg.negatives.autoregressive:
        an = read_autoregressive_samples([Path(p) for p in samples.outputs.values()])
    recipe = SequenceCPORecipe(sequence_settings(cfg), mle.outputs["model"], examples, out_dir, an)
    model_dir = recipe.setup().train().save(out_dir / "model")
    summary = recipe.summary()
    return {
        "model": model_dir,
        "metrics": out_dir / "metrics.jsonl",
        "summary": out_dir / "train_summary.json",
    }, {
        "steps": summary["steps"],
        "examples": summary["examples"],
        "skipped_too_long": summary["skipped_too_long"],
        "sequences_per_example": summary["sequences_per_example"],
        "reference_forward_passes": summary["reference_forward_passes"],
    }


def train_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult, samples: StageResult
) -> StageKey:
    key = stage_key(
        "train",
        cfg.section_hash("train", "negatives", "model"),
        [instructions, mle, samples],
        extra=cfg.run.seed,
        module=__name__,
    )
    return StageKey("train", Path(run_dir) / "train", key)


def train_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, mle: StageResult, samples: StageResult
) -> StageResult:
    """Sequence-level CPO from the MLE model: the ground truth against K-1 synthetic negatives (eq. 7 / 8)."""
    return run_stage(
        train_key(cfg, run_dir, instructions, mle, samples),
        lambda out: run_train(cfg, instructions, mle, samples, out),
    )


train_task = stage_task(train_stage, train_key, gpu=True)


# -------------------------------------------------------------------------------------------------- wise_ft


def wise_ft_key(cfg: SequenceRunConfig, run_dir: Path, mle: StageResult, cpo: StageResult) -> StageKey:
    key = stage_key("wise_ft", cfg.section_hash("wise_ft"), [mle, cpo], module=__name__)
    return StageKey("wise_ft", Path(run_dir) / "wise_ft", key)


def wise_ft_stage(cfg: SequenceRunConfig, run_dir: Path, mle: StageResult, cpo: StageResult) -> StageResult:
    """alpha * theta_MLE + (1 - alpha) * theta_CPO for every alpha of the grid -> models/alpha-<a>/."""

    def compute(out: Path):
        grid = wise_ft_grid(mle.outputs["model"], cpo.outputs["model"], cfg.wise_ft.alphas, out / "models")
        return {alpha_dir_name(a): path for a, path in grid.items()}, {"models": len(grid)}

    return run_stage(wise_ft_key(cfg, run_dir, mle, cpo), compute)


wise_ft_task = stage_task(wise_ft_stage, wise_ft_key)


# --------------------------------------------------------------------------------------------------- scorer


def run_scorer(
    cfg: SequenceRunConfig, instructions: StageResult, base: StageResult, out_dir: Path
) -> tuple[dict, dict]:
    """A tiny LLaMA larger than the policy, with the policy's tokenizer, trained with MLE on the training
    split for scorer.max_steps."""
    s = cfg.scorer
    tokenizer = load_tokenizer(base.outputs["model"], cfg.model.trust_remote_code)
    architecture = {**s.tiny.model_dump(), "vocab_size": len(tokenizer)}
    # seed + 1: not the policy's initialisation
    start = build_tiny_model([], out_dir / "init", **architecture, seed=cfg.run.seed + 1, tokenizer=tokenizer)
    settings = mle_settings(cfg, s)
    return train_mle(settings, str(start), split_rows(instructions, "train"), out_dir, "scoring model (MLE)")


def scorer_key(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageKey:
    trained = cfg.scorer.model == "train"
    key = stage_key(
        "scorer",
        cfg.section_hash("scorer", "model") if trained else cfg.section_hash("scorer"),
        [instructions, base] if trained else [],
        extra=cfg.run.seed if trained else None,
        module=__name__,
    )
    return StageKey("scorer", Path(run_dir) / "scorer", key)


def scorer_stage(
    cfg: SequenceRunConfig, run_dir: Path, instructions: StageResult, base: StageResult
) -> StageResult:
    """P-hat of eq. 9 / eq. 10: the configured model folder, or a larger tiny model trained longer."""
    where = scorer_key(cfg, run_dir, instructions, base)
    if cfg.scorer.model != "train":
        folder = resolve_path(cfg.scorer.model, config_base_dir(cfg))
        if not folder.is_dir():
            raise FileNotFoundError(f"scorer.model: {folder} is not a model folder")
        return run_stage(where, lambda out: ({"model": folder}, {"trained": False}))
    return run_stage(where, lambda out: run_scorer(cfg, instructions, base, out), resumable=True)


scorer_task = stage_task(scorer_stage, scorer_key, gpu=True)
