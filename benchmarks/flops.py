"""The matmul FLOPs of one training step of a LLaMA-architecture decoder, counted from its shapes and the real
(unpadded) tokens of each sequence: what an MFU figure divides by the machine's measured matmul peak.

Per sequence of n tokens, with hidden size h, L layers, a query heads and g key/value heads of size d,
intermediate size i and vocabulary V, the forward pass multiplies

    per layer   q, o:  2·n·h·(a·d) each      k, v:  2·n·h·(g·d) each      gate, up, down:  2·n·h·i each
                QKᵀ and AV:  2·a·n²·d each (the full square: dense kernels compute the masked half too)
    once        lm_head:  2·n·h·V            rotary frequencies (inv_freq ⊗ positions):  d·n

and the backward pass multiplies, for each matmul Y = X·W, dX = dY·Wᵀ when X needs a gradient and dW = Xᵀ·dY
when W is trained: the same FLOPs as the forward matmul, each. Full fine-tuning trains every weight and every
input needs its gradient (the embedding is trained), so backward = 2 x forward (less the rotary term, which has
no gradient). With LoRA (rank r on a set of projections, frozen base), each adapted projection adds
2·n·r·(in + out) forward (A then B) and trains only A and B, and an input needs its gradient only when a trained
parameter comes before it in the forward pass: the projections of the first adapted layer's first group, whose
input is the (frozen) normed embedding, compute no dX. tests/test_flops.py checks every case against
torch.utils.flop_counter on a tiny model, FLOP for FLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

# The projections of one layer, in groups that share one input, in forward order.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class DecoderShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> DecoderShape:
        """From a transformers LlamaConfig (or any config with its field names)."""
        heads = config.num_attention_heads
        return cls(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        )

    def projection(self, name: str) -> tuple[int, int]:
        """(in, out) features of a projection."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[name]


def sequence_flops(
    shape: DecoderShape, n: int, lora_rank: int | None = None, lora_targets: tuple[str, ...] = ()
) -> dict[str, int]:
    """Forward and backward matmul FLOPs of one sequence of `n` tokens: full fine-tuning when `lora_rank` is
    None, else LoRA of that rank on `lora_targets` (projection names, every layer)."""
    lora = lora_rank is not None
    targets = set(lora_targets) if lora else set()
    if lora and not targets:
        raise ValueError("LoRA without target projections trains nothing")
    unknown = targets - {p for group in GROUPS for p in group}
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}")
    # The first (layer, group) holding a trained parameter: inputs before it need no gradient.
    first = (
        min(
            (layer, g)
            for layer in range(shape.layers)
            for g, group in enumerate(GROUPS)
            if targets & set(group)
        )
        if lora
        else (-1, 0)
    )
    forward = backward = 0
    for layer in range(shape.layers):
        for g, group in enumerate(GROUPS):
            input_grad = (layer, g) > first  # full fine-tuning: first is before everything
            for name in group:
                fan_in, fan_out = shape.projection(name)
                base = 2 * n * fan_in * fan_out
                forward += base
                backward += base * input_grad + base * (not lora)
                if name in targets:
                    a, b = 2 * n * fan_in * lora_rank, 2 * n * lora_rank * fan_out
                    forward += a + b
                    backward += a + b  # dA, dB: both are trained
                    backward += b + a * input_grad  # dX of B always (A is trained), of A as the base's
            if g == 0:  # attention between the q/k/v group and o_proj
                score = 2 * shape.heads * n * n * shape.head_dim
                forward += 2 * score
                grads = {
                    p: (layer, g) > first or p in targets for p in ("q_proj", "k_proj", "v_proj")
                }  # which of q, k, v carry a gradient
                weights_grad = grads["q_proj"] or grads["k_proj"]  # the attention weights, softmax(QKᵀ)
                backward += score * (grads["q_proj"] + grads["k_proj"]) + score * (
                    weights_grad + grads["v_proj"]
                )
    head = 2 * n * shape.hidden * shape.vocab
    forward += head + shape.head_dim * n
    backward += head + head * (not lora)  # lm_head: dX always, dW when trained
    return {"forward": forward, "backward": backward, "total": forward + backward}


def step_flops(
    shape: DecoderShape, lengths: list[int], lora_rank: int | None = None, lora_targets: tuple[str, ...] = ()
) -> int:
    """Matmul FLOPs of a step over sequences of these real lengths (CPO: each pair's chosen and rejected)."""
    return sum(sequence_flops(shape, n, lora_rank, lora_targets)["total"] for n in lengths)


def shared_prompt_step_flops(
    shape: DecoderShape,
    pairs: list[tuple[int, int, int]],
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] = (),
) -> int:
    """What our engine executes on the real tokens of a step of (prompt, chosen, rejected) lengths: each pair one
    segment of p + c + r tokens (the prompt once, attention over the segment's full square), the lm_head only on
    the c + r completion positions, twice with a frozen head (the forward and, in the same pass, the gradient
    with respect to its input: models/train/logprobs.py TokenLogps) and four times with a trained one (the
    forward, its recompute in backward, dX and dW). Padding is not counted."""
    lora = lora_rank is not None
    total = 0
    for p, c, r in pairs:
        n = p + c + r
        counted_head = (
            2 * n * shape.hidden * shape.vocab * (2 + (not lora))
        )  # sequence_flops' forward, dX, dW
        head = 2 * (c + r) * shape.hidden * shape.vocab * (2 if lora else 4)
        total += sequence_flops(shape, n, lora_rank, lora_targets)["total"] - counted_head + head
    return total


def forward_flops(shape: DecoderShape, new: int, past: int, logits: int) -> int:
    """Matmul FLOPs of one forward pass over `new` tokens of one row that attend to `past` cached ones as well:
    the projections, QKᵀ and AV over (new) x (past + new) scores, lm_head on the `logits` positions that get
    logits, and the rotary frequencies of the new positions."""
    projections = sum(2 * new * i * o for group in GROUPS for i, o in map(shape.projection, group))
    attention = 2 * 2 * shape.heads * new * (past + new) * shape.head_dim
    return (
        shape.layers * (projections + attention)
        + 2 * logits * shape.hidden * shape.vocab
        + shape.head_dim * new
    )


def generation_flops(shape: DecoderShape, prompt: int, new_tokens: int, rows: int) -> int:
    """Matmul FLOPs of decoding `rows` rows (a batch's sentences x beams) whose prompts are `prompt` tokens long
    (padding included: a padded position costs what a real one does) for `new_tokens` steps, as transformers'
    generate runs it: one prefill over the prompt with logits for its last position only, then one token per row
    per step over the growing cache. A sentence's own prompt length gives its useful FLOPs."""
    prefill = forward_flops(shape, prompt, 0, 1)
    steps = sum(forward_flops(shape, 1, prompt + t, 1) for t in range(new_tokens - 1))
    return rows * (prefill + steps)
