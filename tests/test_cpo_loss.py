"""The CPO objective against hand-derived values and against TRL's own CPOTrainer code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alma_r.models.train.batching import collate, tokenize_pairs
from alma_r.models.train.logprobs import CompletionLogps, completion_logps
from alma_r.models.train.losses import nll_loss, preference_loss


def test_sigmoid_cpo_matches_hand_derivation():
    # Two pairs: log pi(y_w) = -2, -5; log pi(y_l) = -4, -3; chosen lengths 2 and 4 tokens; beta 0.1.
    out = preference_loss(
        torch.tensor([-2.0, -5.0]),
        torch.tensor([-4.0, -3.0]),
        torch.tensor([2, 4]),
        torch.tensor([3, 3]),
        beta=0.1,
        cpo_alpha=1.0,
    )
    # logits = (2, -2) -> losses softplus(-0.2), softplus(0.2); their mean is log(e^0.1 + e^-0.1) = 0.70815...
    preference = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2
    nll = (2 + 5) / (2 + 4)  # mean over all 6 chosen tokens of the batch, not the mean of per-row means
    assert out.preference.item() == pytest.approx(preference, abs=1e-6)
    assert out.nll.item() == pytest.approx(nll, abs=1e-6)
    assert out.loss.item() == pytest.approx(preference + nll, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.2, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.4, -0.3])


def test_sft_loss_is_nll_only():
    out = preference_loss(
        torch.tensor([-3.0]),
        torch.tensor([-1.0]),
        torch.tensor([3]),
        torch.tensor([1]),
        loss_type="sft",
        cpo_alpha=0.5,
    )
    assert out.loss.item() == pytest.approx(1.0)


def test_empty_completions_never_give_nan():
    zero = torch.zeros(2)
    for loss_type in ("sigmoid", "hinge", "ipo", "simpo", "sft"):
        out = preference_loss(
            zero,
            zero,
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            loss_type=loss_type,
        )
        assert torch.isfinite(out.loss), loss_type
    assert nll_loss(zero, torch.zeros(2, dtype=torch.long)).item() == 0.0


def _trl():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    return cpo.CPOTrainer


@pytest.mark.parametrize(
    "loss_type,label_smoothing",
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.2)],
)
def test_preference_term_equals_trl(loss_type, label_smoothing):
    CPOTrainer = _trl()
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    n_chosen, n_rejected = torch.randint(1, 12, (8,), generator=g), torch.randint(1, 12, (8,), generator=g)
    beta, gamma = 0.3, 0.7
    ours = preference_loss(
        chosen,
        rejected,
        n_chosen,
        n_rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
    )
    # TRL feeds length-averaged log-probs to ipo and simpo (average_log_prob=True in concatenated_forward).
    averaged = loss_type in ("ipo", "simpo")
    trl_self = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        accelerator=SimpleNamespace(device="cpu"),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        trl_self, chosen / n_chosen if averaged else chosen, rejected / n_rejected if averaged else rejected
    )
    torch.testing.assert_close(ours.preference, losses.mean())
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


PAIRS = [
    {
        "prompt": "Translate this from German to English:\nGerman: Guten Morgen\nEnglish:",
        "chosen": "Good morning",
        "rejected": "Good evening to all of you",
    },
    {
        "prompt": "Translate this from English to German:\nEnglish: The house is small and old.\nGerman:",
        "chosen": "Das Haus ist klein und alt.",
        "rejected": "",
    },
]


def _model(tiny_model_dir):
    from alma_r.models.loading import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def _plain_rows(examples, pad_id):
    """Chosen rows then rejected rows, right-padded, with TRL-style labels (-100 off the completion)."""
    seqs = [(e["chosen_prompt_ids"], e["chosen_ids"]) for e in examples]
    seqs += [(e["rejected_prompt_ids"], e["rejected_ids"]) for e in examples]
    T = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), T), pad_id)
    labels = torch.full((len(seqs), T), -100)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return ids, mask, labels


@pytest.mark.parametrize("convention", ["alma", "trl"])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_completion_logps_equal_trl_on_full_logits(tiny_model_dir, convention, shared_prompt):
    CPOTrainer = _trl()
    model, tokenizer = _model(tiny_model_dir)
    examples, skipped = tokenize_pairs(
        tokenizer, PAIRS, max_prompt_length=64, max_length=128, convention=convention
    )
    assert len(examples) == 2 and skipped == {"prompt_too_long": 0, "too_long": 0}
    # chunk_size 3 forces several chunks and a partial last one.
    batch = collate(examples, tokenizer.pad_token_id, shared_prompt=shared_prompt)
    same_prompts = all(e["chosen_prompt_ids"] == e["rejected_prompt_ids"] for e in examples)
    assert convention == "trl" or same_prompts  # ALMA's convention always shares the prompt tokens
    assert batch.input_ids.shape[0] == (2 if shared_prompt and same_prompts else 4)
    ours, n_tokens = CompletionLogps(model, chunk_size=3)(batch)
    ids, mask, labels = _plain_rows(examples, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    reference = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == (labels[:, 1:] != -100).sum(1).tolist()
    # The rejected side of pair 2 is an empty translation: only its EOS is scored.
    assert n_tokens[3].item() >= 1


def test_chunked_gradients_equal_full_logits(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    examples, _ = tokenize_pairs(tokenizer, PAIRS, max_prompt_length=64, max_length=128)
    ours, _ = CompletionLogps(model, chunk_size=2)(
        collate(examples, tokenizer.pad_token_id, shared_prompt=True)
    )
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ids, mask, labels = _plain_rows(examples, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    keep = labels[:, 1:] != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (token_logps * keep).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_nll_equals_cross_entropy_over_chosen_tokens(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    examples, _ = tokenize_pairs(tokenizer, PAIRS, max_prompt_length=64, max_length=128)
    logps, n_tokens = CompletionLogps(model)(collate(examples, tokenizer.pad_token_id))
    n = len(examples)
    ours = nll_loss(logps[:n], n_tokens[:n])
    ids, mask, labels = _plain_rows(examples, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits[:n, :-1]
    expected = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_plain_rows_helper_agrees_with_completion_logps(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    examples, _ = tokenize_pairs(tokenizer, PAIRS, max_prompt_length=64, max_length=128)
    ids, mask, labels = _plain_rows(examples, tokenizer.pad_token_id)
    direct, _ = completion_logps(model, ids, mask, (labels != -100).long())
    packed, _ = CompletionLogps(model)(collate(examples, tokenizer.pad_token_id, shared_prompt=True))
    torch.testing.assert_close(direct, packed, rtol=1e-5, atol=1e-4)


def test_long_prompts_are_skipped_and_counted_never_cut(tiny_model_dir):
    from alma_r.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = [
        {"prompt": "word " * 50, "chosen": "a", "rejected": "b"},
        {"prompt": "short", "chosen": "a " * 40, "rejected": "b"},
        {"prompt": "short", "chosen": "a", "rejected": "b"},
    ]
    examples, skipped = tokenize_pairs(tokenizer, pairs, max_prompt_length=20, max_length=30)
    assert skipped == {"prompt_too_long": 1, "too_long": 1}
    assert len(examples) == 1
    assert tokenizer.decode(examples[0]["chosen_prompt_ids"]) == "short"
    assert examples[0]["chosen_ids"][-1] == tokenizer.eos_token_id
