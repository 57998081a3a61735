"""Generation throughput: alma-r's transformers backend vs ALMA's way, on the same model and prompts.

    .venv/bin/python benchmarks/generate_throughput.py [--sources 500] [--beams 5] [--max-new-tokens 24]

ALMA's evaluation (run_llmmt.py) tokenises every prompt padded to `max_source_length` (256) and decodes fixed
batches in file order. alma-r sorts prompts by length (longest first) and pads each batch only to its own longest
prompt. Both decode with beam 5 and the same limits, on 500 real WMT'22 de->en / en->de sources, with a tiny
LLaMA built locally (random weights: every output runs to max_new_tokens, so both do the same decoding work).
On a GPU machine add `--device cuda` (and later the vLLM backend) to measure there.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", type=int, default=500)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
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
    prompts = [prompts[i] for i in keep]
    decoding = Decoding(num_beams=args.beams, max_new_tokens=args.max_new_tokens)
    params = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    ours = generate_translations(model, tokenizer, prompts, decoding, args.batch_size, args.max_source_length)
    ours_s = time.perf_counter() - t0
    print(f"alma-r backend: {ours_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    theirs = alma_way(model, tokenizer, prompts, decoding, args.batch_size, args.max_source_length)
    alma_s = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))

    print(
        f"{len(prompts)} WMT'22 prompts (de->en, en->de; prompt tokens mean {sum(lengths) / len(lengths):.0f}, "
        f"max {max(lengths)}), beam {args.beams}, max {args.max_new_tokens} new tokens, batch {args.batch_size}, "
        f"tiny LLaMA {params / 1e6:.1f}M params on {args.device}\n"
    )
    print("| backend | seconds | sentences/s |")
    print("|---|---|---|")
    print(
        f"| ALMA's way (pad to {args.max_source_length}, file order) | {alma_s:.1f} | {len(prompts) / alma_s:.2f} |"
    )
    print(
        f"| alma-r transformers (length-sorted, pad per batch) | {ours_s:.1f} | {len(prompts) / ours_s:.2f} |"
    )
    print(f"\nspeed-up: {alma_s / ours_s:.2f}x; identical outputs: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
