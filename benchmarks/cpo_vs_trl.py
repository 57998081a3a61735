"""CPO training throughput and memory: this repo's engine (`CPORecipe`) against TRL's `CPOTrainer`.

Both engines train the same LLaMA (built here, no download) on the same real WMT'22 preference pairs, in the same
order, with the same batch size, LoRA, optimizer settings and number of steps. Each engine runs in its own fresh
Python process, so that its peak RSS is its own; the parent prints one markdown table.

    .venv/bin/python benchmarks/cpo_vs_trl.py                      # CPU: ~58M LLaMA, 12 steps of 8 pairs
    .venv/bin/python benchmarks/cpo_vs_trl.py --steps 30 --pairs 512
    .venv/bin/python benchmarks/cpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 1b --peak-tflops 989
    .venv/bin/python benchmarks/cpo_vs_trl.py --engine ours       # one engine, in this process (prints JSON)

What is fixed for a fair comparison:
- pairs: prompt = ALMA's prompt, chosen = ALMA-13B-R's published WMT'22 translation, rejected = the WMT'22
  reference; de-en and en-de alternating; pairs over the length limits are dropped *before* either engine sees them,
  so neither truncates nor skips. TRL's completions get a leading space (ours adds it itself), and the TRL child
  checks that both engines produce the same token ids for every pair.
- order: TRL's random sampler is replaced by a sequential one over the pairs laid out in our engine's order, so
  step k of both engines sees the same 8 pairs and the per-step losses are comparable.
- optimizer: AdamW, lr 1e-4 constant, no warmup, no weight decay (TRL's default; ours is set to 0), grad clip 1.0.
- gradient checkpointing: off in both (TRL's own default is on; `--gradient-checkpointing` turns it on in both).
- pairs/s: steady state, measured between the end of step 1 and the end of the last step (the first step is
  warm-up), from timestamps taken right after each optimizer/scheduler step in both engines. Setup (model load,
  tokenisation) is not timed.
- memory: peak RSS (VmHWM) of the engine's process; also the peak during train() alone (VmHWM reset before it).
  On CUDA also torch.cuda.max_memory_allocated during train().

The model and tokenizer are cached under runs/benchmarks/cache/ (runs/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

# beside this script: its folder is first on sys.path
from cpo_vs_trl_report import QUIET, report
from flops import DecoderShape, shared_prompt_step_flops, step_flops
from measure import machine_busy_seconds, matmul_peak, measure, stamp

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "runs" / "benchmarks" / "cache"
VOCAB = 32000
SIZES = {  # LLaMA shapes; head_dim 64 in both, untied embeddings
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=5504),
}
TOKENIZER_TEXT = [  # real training text of four ALMA language pairs (human_written_data/)
    "deen/train.de-en.de", "deen/train.de-en.en", "csen/train.cs-en.json",
    "ruen/train.ru-en.ru", "ruen/train.ru-en.en", "zhen/train.zh-en.zh", "zhen/train.zh-en.en",
]  # fmt: skip
DIRECTIONS = [("de", "en"), ("en", "de")]
MAX_PROMPT_LENGTH, MAX_LENGTH = 256, 512


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- model and pairs


def tokenizer_texts(data_dir: Path) -> list[str]:
    texts = []
    for rel in TOKENIZER_TEXT:
        for line in (data_dir / "human_written_data" / rel).read_text(encoding="utf-8").splitlines():
            if rel.endswith(".json"):
                texts += list(json.loads(line)["translation"].values())
            elif line.strip():
                texts.append(line)
    return texts


def build_model(args) -> Path:
    """The LLaMA and its 32k byte-level BPE tokenizer, built once and cached (safetensors, fixed seed)."""
    out = CACHE / f"llama-{args.model_size}-v{VOCAB}"
    if (out / "config.json").is_file():
        return out
    from alma_r.models.tiny import build_tiny_model

    log(f"building the {args.model_size} model and a {VOCAB}-token BPE tokenizer in {out} (once)")
    t0 = time.perf_counter()
    build_tiny_model(
        tokenizer_texts(args.data_dir), out, vocab_size=VOCAB, max_position_embeddings=1024, seed=0,
        **SIZES[args.model_size],
    )  # fmt: skip
    log(f"built in {time.perf_counter() - t0:.0f}s")
    return out


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def build_pairs(args, model_path: Path) -> list[dict]:
    """WMT'22 pairs: chosen = ALMA-13B-R's translation, rejected = the reference. Directions alternate, lines are
    visited in a seeded random order, and a pair is kept only when the TRL-convention tokenisation fits the limits
    (both engines then see every pair whole)."""
    from alma_r.models.loading import load_tokenizer
    from alma_r.models.prompts import make_prompt
    from alma_r.models.train.batching import tokenize_pairs

    tokenizer = load_tokenizer(str(model_path))
    root = args.data_dir / "outputs" / "wmt22_outputs"
    streams = []
    for src, tgt in DIRECTIONS:
        xx = f"{src}{tgt}"
        srcs = read_lines(root / "wmt-testset" / xx / f"test.{src}-{tgt}.{src}")
        refs = read_lines(root / "wmt-testset" / xx / f"test.{src}-{tgt}.{tgt}")
        hyps = read_lines(root / "ALMA-13B-R" / xx / f"test.{src}-{tgt}.{tgt}")
        order = list(range(min(len(srcs), len(refs), len(hyps))))
        random.Random(0).shuffle(order)
        streams.append(
            {"prompt": make_prompt(srcs[i], src, tgt), "chosen": hyps[i].strip(), "rejected": refs[i].strip(),
             "lp": f"{src}-{tgt}"}
            for i in order
            if srcs[i].strip() and hyps[i].strip() and refs[i].strip() and hyps[i].strip() != refs[i].strip()
        )  # fmt: skip
    pairs, dropped = [], 0
    while len(pairs) < args.pairs:
        stream = streams[len(pairs) % len(streams)]
        pair = next(stream, None)
        if pair is None:
            raise SystemExit(f"only {len(pairs)} pairs fit the length limits, {args.pairs} asked for")
        kept, _ = tokenize_pairs(tokenizer, [pair], MAX_PROMPT_LENGTH, MAX_LENGTH, "trl")
        if kept:
            pairs.append(pair)
        else:
            dropped += 1
    log(
        f"{len(pairs)} pairs ({', '.join(f'{s}-{t}' for s, t in DIRECTIONS)}); {dropped} dropped by the limits"
    )
    return pairs


def step_order(n_pairs: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The pair indices of each optimizer step, as our engine draws them (its own method, called on a stand-in)."""
    from alma_r.models.train.recipe import CPORecipe

    me = SimpleNamespace(examples=range(n_pairs), pairs_per_step=batch_size, seed=seed)
    return [CPORecipe._step_indices(me, k) for k in range(steps)]


def lora_config(args) -> dict:
    return {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": args.lora_targets.split(",")}


def flops_per_step(
    model_path: Path, examples: list[dict], order: list[list[int]], args
) -> dict[str, list[int]]:
    """FLOPs of each step (benchmarks/flops.py) on real, unpadded tokens. "model": both sequences of every pair,
    prompt included, lm_head on every position, as the plain layout computes them; the same count for both
    engines, so its MFU ranks them as pairs/s does. "executed": what the engine itself runs; TRL's is the plain
    count, ours encodes each prompt once and runs the head on completion positions only (shared_prompt_step_flops)."""
    from transformers import AutoConfig

    shape = DecoderShape.of(AutoConfig.from_pretrained(model_path))
    rank, targets = (None, ()) if args.finetune == "full" else (16, tuple(args.lora_targets.split(",")))
    model, executed = [], []
    for idx in order:
        lengths = [len(examples[i][f"{s}_prompt_ids"]) + len(examples[i][f"{s}_ids"]) for i in idx
                   for s in ("chosen", "rejected")]  # fmt: skip
        model.append(step_flops(shape, lengths, rank, targets))
        pairs = [(len(examples[i]["chosen_prompt_ids"]), len(examples[i]["chosen_ids"]),
                  len(examples[i]["rejected_ids"])) for i in idx]  # fmt: skip
        executed.append(
            shared_prompt_step_flops(shape, pairs, rank, targets) if args.engine == "ours" else model[-1]
        )
    return {"model": model, "executed": executed}


# ---------------------------------------------------------------------------------------------- measuring


def token_counts(model_path: Path, pairs: list[dict], order: list[list[int]], multiple: int = 1) -> dict:
    """Per step: the real tokens of both sequences of each pair (prompt counted twice, as in a plain layout), and
    the padded tokens each engine's layout pushes through the decoder (ours: the rows collate packs, each pair a
    segment of prompt + chosen + rejected, padded to a multiple of `multiple`, the run's pad_to_multiple_of; TRL:
    two rows per pair, chosen and rejected, each with the prompt)."""
    from alma_r.models.loading import load_tokenizer
    from alma_r.models.train.batching import collate, tokenize_pairs

    ex, _ = tokenize_pairs(load_tokenizer(str(model_path)), pairs, MAX_PROMPT_LENGTH, MAX_LENGTH, "trl")
    real, ours, trl = [], [], []
    for idx in order:
        batch = [ex[i] for i in idx]
        lens = [(len(e["chosen_prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in batch]
        real.append(sum(2 * p + c + r for p, c, r in lens))
        ours.append(collate(batch, 0, shared_prompt=True, pad_to_multiple_of=multiple).input_ids.numel())
        trl.append(2 * len(batch) * max(p + max(c, r) for p, c, r in lens))
    return {"real": real, "padded_ours": ours, "padded_trl": trl, "examples": ex}


def our_settings(args):
    """Our engine's TrainSettings for the benchmark's fixed setup (the TRL child mirrors each of them)."""
    from alma_r.models.train.settings import TrainSettings

    bf16 = args.dtype == "bfloat16"
    return TrainSettings(
        loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, learning_rate=1e-4, lr_scheduler="constant",
        warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, batch_size=args.batch_size,
        tokenization="trl", shared_prompt=True, lora=lora_config(args), save_steps=10**9, logging_steps=1,
        max_prompt_length=MAX_PROMPT_LENGTH, max_length=MAX_LENGTH,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision="bf16" if bf16 else "no",
        finetune=args.finetune, **dict(item.split("=", 1) for item in args.ours_set),
    )  # fmt: skip


def run_ours(args, model_path: Path, pairs: list[dict], work: Path) -> dict:
    from alma_r.models.train.metrics import read_metrics
    from alma_r.models.train.recipe import CPORecipe

    recipe = CPORecipe(our_settings(args), str(model_path), pairs, work / "ours", seed=0, dtype=args.dtype)
    recipe = recipe.setup()
    assert len(recipe.examples) == len(pairs), recipe.skipped
    ends: list[tuple] = []
    scheduler_step = recipe.scheduler.step

    def stamped_step(*a, **kw):  # the scheduler steps right after the optimizer: the end of an optimizer step
        out = scheduler_step(*a, **kw)
        ends.append(stamp())
        return out

    recipe.scheduler.step = stamped_step
    result = measure(args, recipe.model, lambda: recipe.train(), ends)
    result["losses"] = [r["loss"] for r in read_metrics(recipe.metrics_path)]
    result["device"] = str(recipe.device)
    return result


def run_trl(args, model_path: Path, pairs: list[dict], order: list[list[int]], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from alma_r.models.loading import load_tokenizer

    class InOurOrder(CPOTrainer):  # the dataset is already laid out in our engine's step order
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    ends: list[tuple] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **kw):  # after optimizer.step, scheduler.step and zero_grad
            ends.append(stamp())

    laid_out = [pairs[i] for step in order for i in step]
    ds = Dataset.from_list(
        [
            {"prompt": p["prompt"], "chosen": " " + p["chosen"], "rejected": " " + p["rejected"]}
            for p in laid_out
        ]
    )
    bf16 = args.dtype == "bfloat16"
    config = CPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, cpo_alpha=1.0, loss_type="sigmoid", max_length=MAX_LENGTH, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=args.device == "cpu", bf16=bf16, remove_unused_columns=False,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=args.gradient_checkpointing,
        disable_tqdm=True,
    )  # fmt: skip
    lora = lora_config(args)
    peft_config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=getattr(torch, args.dtype), use_safetensors=True
    )
    trainer = InOurOrder(
        model=model, args=config, train_dataset=ds, processing_class=load_tokenizer(str(model_path)),
        peft_config=peft_config if args.finetune == "lora" else None, callbacks=[Stamp()],
    )  # fmt: skip
    # The token streams must be identical to ours, pair by pair, or the comparison means nothing.
    ours = token_counts(model_path, laid_out, [])["examples"]
    for k, (row, e) in enumerate(zip(trainer.train_dataset, ours, strict=True)):
        for side in ("chosen", "rejected"):
            mine = e[f"{side}_prompt_ids"] + e[f"{side}_ids"]
            if row[f"{side}_input_ids"] != mine:
                raise SystemExit(f"pair {k} ({side}): TRL's token ids differ from ours")
    result = measure(args, trainer.model, trainer.train, ends)
    result["losses"] = [
        h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h
    ]
    result["device"] = str(trainer.args.device)
    return result


# ------------------------------------------------------------------------------------------------ the run


def prepare(args) -> tuple[Path, list[dict], list[list[int]], dict]:
    model_path = build_model(args)
    pairs_file = args.pairs_file or CACHE / f"pairs-{args.model_size}-{args.pairs}.json"
    if Path(pairs_file).is_file():
        pairs = json.loads(Path(pairs_file).read_text(encoding="utf-8"))
    else:
        pairs = build_pairs(args, model_path)
        Path(pairs_file).write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    order = step_order(len(pairs), args.steps, args.batch_size, seed=0)
    meta_file = model_path / "bench_meta.json"
    if not meta_file.is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        meta = {
            "params": sum(p.numel() for p in m.parameters()),
            "embedding_params": m.get_input_embeddings().weight.numel(),
            "vocab": m.config.vocab_size,
        }
        meta_file.write_text(json.dumps(meta))
    return model_path, pairs, order, json.loads(meta_file.read_text())


def child(args) -> dict:
    model_path, pairs, order, meta = prepare(args)
    with tempfile.TemporaryDirectory(prefix="cpo-bench-") as work:
        if args.engine == "ours":
            result = run_ours(args, model_path, pairs, Path(work))
        else:
            result = run_trl(args, model_path, pairs, order, Path(work))
    counts = token_counts(model_path, pairs, order, our_settings(args).pad_to_multiple_of)
    steady_real = sum(counts["real"][1:])
    result.update(
        engine=args.engine,
        steps=len(result["step_ends"]),
        real_tokens_per_step=sum(counts["real"]) / len(order),
        padded_tokens_per_step=sum(counts[f"padded_{args.engine}"]) / len(order),
        tokens_per_second=steady_real / result["steady_seconds"],
    )
    flops = flops_per_step(model_path, counts["examples"], order, args)
    result.update(flops_per_step=flops["model"], executed_flops_per_step=flops["executed"])
    return result


def spawn(args, engine: str, out: Path, pairs_file: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--engine",
        engine,
        "--json-out",
        str(out),
        "--pairs-file",
        str(pairs_file),
    ]
    for flag in (
        "steps",
        "pairs",
        "batch_size",
        "device",
        "dtype",
        "model_size",
        "lora_targets",
        "finetune",
    ):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    for item in args.ours_set:
        cmd += ["--ours-set", item]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our engine picks CUDA whenever it sees one
    if args.wait_quiet:  # a shared machine: start only after `wait_quiet` seconds in which nothing else ran
        t0 = time.perf_counter()
        while True:
            busy0 = machine_busy_seconds()
            time.sleep(args.wait_quiet)
            if (machine_busy_seconds() - busy0) / args.wait_quiet < QUIET:
                break
        if time.perf_counter() - t0 > args.wait_quiet + 1:
            log(f"waited {time.perf_counter() - t0:.0f}s for the machine to be quiet")
    log(f"running {engine} in a fresh process")
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)  # Trainer prints its logs on stdout
    log(f"{engine}: process finished in {time.perf_counter() - t0:.0f}s")
    return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("both", "ours", "trl"), default="both")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: base weights in bf16 and bf16 autocast, in both engines")  # fmt: skip
    p.add_argument("--model-size", choices=tuple(SIZES), default="small")
    p.add_argument("--finetune", choices=("lora", "full"), default="lora",
                   help="lora: a new adapter in both engines (TRL through peft_config); full: every weight")  # fmt: skip
    p.add_argument("--lora-targets", default="down_proj", help="comma-separated; ALMA-R's choice by default")
    p.add_argument(
        "--ours-set", action="append", default=[], metavar="KEY=VALUE",
        help="one of our engine's train settings (e.g. activation_recompute=off, logits_chunk_size=1024), to "
        "measure what it gives; repeatable",
    )  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per engine, alternating; each step's fastest time counts"
    )
    p.add_argument(
        "--wait-quiet", type=float, default=0, help="seconds of idle machine to wait for before each run"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None,
        help="also give MFU against this datasheet peak (dense, this dtype); the measured peak is always given",
    )  # fmt: skip
    p.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("ALMA_DATA"),
        required="ALMA_DATA" not in os.environ,
        help="a copy of ALMA's data folder (github.com/fe1ixxu/ALMA: human_written_data/, outputs/); "
        "default $ALMA_DATA",
    )
    p.add_argument("--pairs-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU")
    CACHE.mkdir(parents=True, exist_ok=True)

    if args.engine != "both":
        result = child(args)
        text = json.dumps(result, indent=1)
        if args.json_out:
            args.json_out.write_text(text)
        else:
            print(text)
        return

    t0 = time.perf_counter()
    model_path, pairs, _, meta = prepare(args)  # built once here, so that neither child pays for it
    # The denominator of MFU, measured now, on this machine, for this dtype and the children's thread count.
    peak = matmul_peak(args.dtype, args.device)
    log(f"matmul peak ({args.dtype}, 2048 x 2048, {args.device}): {peak / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="cpo-bench-") as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
        runs = {"ours": [], "trl": []}
        for k in range(args.repeats):  # alternate, so that a slow spell on the machine hits both engines
            for engine in runs:
                runs[engine].append(spawn(args, engine, Path(tmp) / f"{engine}-{k}.json", pairs_file))
    print(report(args, SIZES[args.model_size], runs["ours"], runs["trl"], meta, len(pairs), peak))
    print(f"\n(total benchmark wall time {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
