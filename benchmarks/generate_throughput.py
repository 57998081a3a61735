"""Beam-5 evaluation decoding: alma-r's transformers backend vs ALMA's, on the same model and prompts, with the
FLOPs each ran.

    .venv/bin/python benchmarks/generate_throughput.py [--sources 500] [--beams 5] [--max-new-tokens 24]

ALMA's evaluation (run_llmmt.py, evals/*.sh) tokenises every prompt padded to `max_source_length` (256) and
decodes batches of `per_device_eval_batch_size` (2) in file order. alma-r sorts prompts by length (longest
first) and pads each batch only to its own longest prompt (evaluate.batch_size: 8). Three runs, side by side:
ALMA as its scripts run it, alma-r at its default, and both at one batch size (16: what sorting and per-batch
padding give alone). 500 real WMT'22 de->en / en->de sources, a tiny LLaMA built locally (random weights: every
output runs to max_new_tokens, so both do the same decoding steps).

FLOPs (benchmarks/flops.py, checked against torch's FLOP counter on generate() in tests/test_flops.py): a forward
pre-hook records what each forward pass ran (rows, new tokens, cached tokens), so "executed" is exact, padding
included; "useful" is what each sentence needs with its own prompt length. On a GPU machine add `--device cuda`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from alma_r.config import SAMPLE_DIR
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.prompts import make_prompt, postprocess
from alma_r.models.tiny import build_tiny_model
from benchmarks.cpo_vs_trl_report import cpu_model
from benchmarks.flops import DecoderShape, forward_flops, generation_flops

SHARED = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "alma"
    / "outputs"
    / "wmt22_outputs"
    / "wmt-testset"
)


def sources(n: int) -> list[tuple[str, str, str]]:
    out = []
    for folder, s, t in (("deen", "de", "en"), ("ende", "en", "de")):
        base = SHARED if SHARED.is_dir() else SAMPLE_DIR / "wmt22"
        lines = (base / folder / f"test.{s}-{t}.{s}").read_text(encoding="utf-8").splitlines()
        out += [(line, s, t) for line in lines[: n // 2]]
    return out[:n]


@torch.inference_mode()
def alma_way(
    model, tokenizer, prompts: list[str], decoding: Decoding, batch_size: int, max_source_length: int
):
    """Every prompt left-padded to max_source_length, batches in file order (ALMA's run_llmmt.py)."""
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            prompts[start : start + batch_size],
            add_special_tokens=False,
            padding="max_length",
            return_token_type_ids=False,
            max_length=max_source_length,
            truncation=True,
            return_tensors="pt",
        ).to(model.device)
        gen = model.generate(
            **enc,
            num_beams=decoding.num_beams,
            max_new_tokens=decoding.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [
            postprocess(t)
            for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return out


class ExecutedFlops:
    """A forward pre-hook that adds up the matmul FLOPs of every forward pass the model runs."""

    def __init__(self, model):
        self.shape, self.total = DecoderShape.of(model.config), 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        keep = kwargs.get("logits_to_keep", 0)
        logits = ids.shape[1] if not keep else keep
        self.total += ids.shape[0] * forward_flops(self.shape, ids.shape[1], past, logits)

    def take(self) -> int:
        total, self.total = self.total, 0
        return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--alma-batch-size", type=int, default=2, help="ALMA's evals/*.sh")
    parser.add_argument("--batch-size", type=int, default=8, help="alma-r's evaluate.batch_size default")
    parser.add_argument("--same-batch-size", type=int, default=16, help="both engines, for the padding alone")
    parser.add_argument("--max-source-length", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = sources(args.sources)
    prompts = [make_prompt(s, a, b) for s, a, b in data]
    tmp = Path(tempfile.mkdtemp(prefix="alma-r-gen-bench-"))
    model_dir = build_tiny_model(
        [s for s, _, _ in data],
        tmp / "model",
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        seed=0,
    )
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), device=args.device)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    keep = [i for i, n in enumerate(lengths) if n <= args.max_source_length]  # same prompts for both
    prompts, lengths = [prompts[i] for i in keep], [lengths[i] for i in keep]
    decoding = Decoding(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    params = sum(p.numel() for p in model.parameters())
    shape = DecoderShape.of(model.config)
    useful = sum(generation_flops(shape, n, args.max_new_tokens, args.beams) for n in lengths)
    counter = ExecutedFlops(model)

    runs = [
        ("alma-r transformers (length-sorted, pad per batch)", args.batch_size, "ours"),
        (f"ALMA's way (pad to {args.max_source_length}, file order)", args.alma_batch_size, "alma"),
        ("alma-r transformers (length-sorted, pad per batch)", args.same_batch_size, "ours"),
        (f"ALMA's way (pad to {args.max_source_length}, file order)", args.same_batch_size, "alma"),
    ]
    rows, outputs = [], {}
    for name, batch, engine in runs:
        t0 = time.perf_counter()
        if engine == "ours":
            out = generate_translations(model, tokenizer, prompts, decoding, batch, args.max_source_length)
        else:
            out = alma_way(model, tokenizer, prompts, decoding, batch, args.max_source_length)
        seconds = time.perf_counter() - t0
        outputs[(engine, batch)] = out
        rows.append((name, batch, seconds, counter.take()))
        print(f"{name}, batch {batch}: {seconds:.1f} s", flush=True)

    print(
        f"\n{len(prompts)} WMT'22 prompts (de->en, en->de; prompt tokens mean {sum(lengths) / len(lengths):.0f}, "
        f"max {max(lengths)}), beam {args.beams}, {args.max_new_tokens} new tokens, tiny LLaMA "
        f"{params / 1e6:.1f}M params on {args.device}; {cpu_model()}, {torch.get_num_threads()} threads\n"
    )
    print("| backend | batch | seconds | sentences/s | executed GFLOP | useful share | useful GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, seconds, executed in rows:
        print(
            f"| {name} | {batch} | {seconds:.1f} | {len(prompts) / seconds:.2f} | {executed / 1e9:.1f} | "
            f"{useful / executed:.2f} | {useful / seconds / 1e9:.2f} |"
        )
    (_, b1, ours_s, _), (_, b2, alma_s, _), (_, b3, ours_same, _), (_, _, alma_same, _) = rows
    ours, alma = outputs[("ours", b1)], outputs[("alma", b2)]
    same = sum(a == b for a, b in zip(ours, alma, strict=True))
    same_batch = sum(a == b for a, b in zip(outputs[("ours", b3)], outputs[("alma", b3)], strict=True))
    print(
        f"\nalma-r (batch {b1}) vs ALMA as its scripts run it (batch {b2}): {alma_s / ours_s:.2f}x, identical "
        f"outputs {same}/{len(prompts)}; at one batch size ({b3}): {alma_same / ours_same:.2f}x, identical "
        f"{same_batch}/{len(prompts)}. Useful FLOPs: {useful / 1e9:.1f} G (each prompt at its own length)."
    )


if __name__ == "__main__":
    main()
