"""The head's log-softmax with its gradient written by hand (models/train/logprobs.py `TokenLogps`) against
autograd through `log_softmax(h @ W.T).gather(target)`, for a trained and a frozen head, every chunking, float32
and bfloat16; and the engine's imports (no pyarrow)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alma_r.models.train.batching import collate, tokenize_pairs
from alma_r.models.train.logprobs import CompletionLogps, TokenLogps, _chunk_logps, plain_linear_weight

PAIRS = [
    {"prompt": "Translate German to English:\nGerman: Guten Morgen.\nEnglish:", "chosen": "Good morning.",
     "rejected": "Good evening."},
    {"prompt": "Translate English to German:\nEnglish: The house is red.\nGerman:", "chosen": "Das Haus ist rot.",
     "rejected": "Das Haus."},
]  # fmt: skip


def _reference(hidden, weight, targets):
    return (hidden @ weight.t()).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def _inputs(n=37, h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # distinct per row: the backward's scaling is checked row by row
    return hidden, weight, targets, upstream


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 100])
@pytest.mark.parametrize("head_trained", [True, False])
def test_token_logps_equal_autograd_through_log_softmax(chunk_size, head_trained):
    hidden, weight, targets, upstream = _inputs()
    results = []
    for fn in ("ours", "reference"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(head_trained)
        if fn == "ours":
            out = TokenLogps.apply(h, w, targets, chunk_size, torch.float32)
        else:
            out = _reference(h, w, targets)
        (out * upstream).sum().backward()
        results.append((out.detach(), h.grad, w.grad))
    (ours, dh, dw), (ref, ref_dh, ref_dw) = results
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, ref_dh, rtol=1e-5, atol=1e-6)
    if head_trained:
        torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-6)
    else:
        assert dw is None


def test_token_logps_without_gradients_returns_values_only():
    hidden, weight, targets, _ = _inputs()
    with torch.no_grad():
        out = TokenLogps.apply(hidden.requires_grad_(), weight, targets, 8, torch.float32)
    assert not out.requires_grad
    torch.testing.assert_close(out, _reference(hidden.detach(), weight, targets), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_trained", [True, False])
def test_token_logps_in_bfloat16_follow_the_autocast_head(head_trained):
    """Under bf16 autocast the head module computes its matmuls in bfloat16 and the log-softmax in float32; so
    does TokenLogps. Both are rounded differently only by the order of float32 sums: equal to bf16 precision."""
    hidden, weight, targets, upstream = _inputs(n=64, h=32, v=300)
    head = torch.nn.Linear(32, 300, bias=False)
    results = []
    for fn in ("ours", "module"):
        head.weight = torch.nn.Parameter(weight.clone(), requires_grad=head_trained)
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fn == "ours":
                out = TokenLogps.apply(h, head.weight, targets, 16, torch.bfloat16)
            else:
                out = _chunk_logps(head, h, targets)
        (out * upstream).sum().backward()
        results.append((out.detach(), h.grad, head.weight.grad))
    (ours, dh, dw), (ref, ref_dh, ref_dw) = results
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(dh, ref_dh, rtol=2e-2, atol=2e-2)
    if head_trained:
        torch.testing.assert_close(dw, ref_dw, rtol=2e-2, atol=2e-2)


def test_plain_linear_weight_only_for_a_plain_bias_free_linear():
    plain = torch.nn.Linear(4, 6, bias=False)
    assert plain_linear_weight(plain) is plain.weight
    assert plain_linear_weight(torch.nn.Linear(4, 6, bias=True)) is None

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA layer or a head that post-processes its logits
        pass

    assert plain_linear_weight(Wrapped(4, 6, bias=False)) is None


def _lora_model(tiny_model_dir, target_modules):
    from alma_r.models.loading import add_lora, load_model, load_tokenizer

    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), 8, 16, 0.0, target_modules)
    return model, load_tokenizer(str(tiny_model_dir))


class _ModuleHead(torch.nn.Linear):
    """The same head, but not exactly an nn.Linear: CompletionLogps calls it as a module (the other path)."""


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_lora_gradients_equal_on_the_hand_written_and_the_module_path(tiny_model_dir, shared_prompt):
    """With LoRA the head is frozen: TokenLogps forms d log p / d hidden in its forward and keeps no logits.
    The adapter's gradients must equal those of the head called as a module (checkpointed log_softmax)."""
    model, tokenizer = _lora_model(tiny_model_dir, ["q_proj", "down_proj"])
    head = model.get_output_embeddings()
    assert plain_linear_weight(head) is head.weight and not head.weight.requires_grad
    examples, _ = tokenize_pairs(tokenizer, PAIRS, max_prompt_length=64, max_length=128)
    batch = collate(examples, tokenizer.pad_token_id, shared_prompt=shared_prompt)
    upstream = torch.tensor([1.0, -0.5, 0.25, 2.0])
    runs = []
    for path in ("hand-written", "module"):
        if path == "module":
            swapped = _ModuleHead(head.in_features, head.out_features, bias=False)
            swapped.weight = head.weight
            model.set_output_embeddings(swapped)
        model.zero_grad()
        logps, n_tokens = CompletionLogps(model, chunk_size=3)(batch)
        (logps * upstream).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((logps.detach(), n_tokens, grads))
    (ours, ours_n, ours_grads), (ref, ref_n, ref_grads) = runs
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_n.tolist() == ref_n.tolist()
    assert ours_grads.keys() == ref_grads.keys() and any("lora_B" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_lora_adapted_head_takes_the_module_path(tiny_model_dir):
    model, _ = _lora_model(tiny_model_dir, ["lm_head"])
    assert plain_linear_weight(model.get_output_embeddings()) is None


def test_the_cpo_engine_imports_no_pyarrow():
    """The engine writes no Parquet (its atomic writes are data/files.py's): importing it must not load pyarrow,
    ~50 MB of resident memory. A caller that reads its pairs from Parquet (the flow's train stage) pays that."""
    code = "import sys; import alma_r.models.train.recipe; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
