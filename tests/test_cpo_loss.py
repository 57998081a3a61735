"""The CPO objective against hand-derived values and against TRL's own CPOTrainer code."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alma_r.models.cpo_loss import nll_loss, preference_loss
from alma_r.models.cpo_trainer import collate, tokenize_pairs
from alma_r.models.logprobs import completion_logps


def test_sigmoid_cpo_matches_hand_derivation():
    # Two pairs: log pi(y_w) = -2, -5; log pi(y_l) = -4, -3; chosen lengths 2 and 4 tokens; beta 0.1.
    out = preference_loss(torch.tensor([-2.0, -5.0]), torch.tensor([-4.0, -3.0]), torch.tensor([2, 4]),
                          torch.tensor([3, 3]), beta=0.1, cpo_alpha=1.0)
    # logits = (2, -2) -> losses softplus(-0.2), softplus(0.2); their mean is log(e^0.1 + e^-0.1) = 0.70815...
    preference = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2
    nll = (2 + 5) / (2 + 4)  # mean over all 6 chosen tokens of the batch, not the mean of per-row means
    assert out.preference.item() == pytest.approx(preference, abs=1e-6)
    assert out.nll.item() == pytest.approx(nll, abs=1e-6)
    assert out.loss.item() == pytest.approx(preference + nll, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.2, -0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.4, -0.3])


def test_sft_loss_is_nll_only():
    out = preference_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([3]), torch.tensor([1]),
                          loss_type="sft", cpo_alpha=0.5)
    assert out.loss.item() == pytest.approx(1.0)


def test_empty_completions_never_give_nan():
    zero = torch.zeros(2)
    for loss_type in ("sigmoid", "hinge", "ipo", "simpo", "sft"):
        out = preference_loss(zero, zero, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                              loss_type=loss_type)
        assert torch.isfinite(out.loss), loss_type
    assert nll_loss(zero, torch.zeros(2, dtype=torch.long)).item() == 0.0


def _trl():
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    return cpo.CPOTrainer


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0),
                                                       ("ipo", 0.0), ("simpo", 0.0), ("simpo", 0.2)])
def test_preference_term_equals_trl(loss_type, label_smoothing):
    CPOTrainer = _trl()
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    n_chosen, n_rejected = torch.randint(1, 12, (8,), generator=g), torch.randint(1, 12, (8,), generator=g)
    beta, gamma = 0.3, 0.7
    ours = preference_loss(chosen, rejected, n_chosen, n_rejected, beta=beta, loss_type=loss_type,
                           label_smoothing=label_smoothing, simpo_gamma=gamma)
    # TRL feeds length-averaged log-probs to ipo and simpo (average_log_prob=True in concatenated_forward).
    averaged = loss_type in ("ipo", "simpo")
    trl_self = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                               simpo_gamma=gamma, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        trl_self, chosen / n_chosen if averaged else chosen, rejected / n_rejected if averaged else rejected)
    torch.testing.assert_close(ours.preference, losses.mean())
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def _batch(tiny_model_dir):
    from alma_r.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    pairs = [
        {"prompt": "Translate this from German to English:\nGerman: Guten Morgen\nEnglish:",
         "chosen": "Good morning", "rejected": "Good evening to all of you"},
        {"prompt": "Translate this from English to German:\nEnglish: The house is small and old.\nGerman:",
         "chosen": "Das Haus ist klein und alt.", "rejected": ""},
    ]
    examples, skipped = tokenize_pairs(tokenizer, pairs, max_prompt_length=64, max_length=128)
    assert len(examples) == 2 and skipped == {"prompt_too_long": 0, "too_long": 0}
    return model, collate(examples, tokenizer.pad_token_id), tokenizer


def test_completion_logps_equal_full_logits_and_trl(tiny_model_dir):
    CPOTrainer = _trl()
    model, batch, _ = _batch(tiny_model_dir)
    # chunk_size 3 forces several chunks and a partial last one.
    ours, n_tokens = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                      chunk_size=3)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    reference = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-4)
    assert n_tokens.tolist() == (labels[:, 1:] != -100).sum(1).tolist()
    # The rejected side of pair 2 is an empty translation: only its EOS is scored.
    assert n_tokens[3].item() >= 1


def test_chunked_gradients_equal_full_logits(tiny_model_dir):
    model, batch, _ = _batch(tiny_model_dir)
    ours, _ = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                               chunk_size=2)
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["completion_mask"][:, 1:].bool()
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    (token_logps * mask).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_nll_equals_cross_entropy_over_chosen_tokens(tiny_model_dir):
    model, batch, _ = _batch(tiny_model_dir)
    logps, n_tokens = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = batch["input_ids"].shape[0] // 2
    ours = nll_loss(logps[:n], n_tokens[:n])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:n, :-1]
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:n, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_long_prompts_are_skipped_and_counted_never_cut(tiny_model_dir):
    from alma_r.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = [{"prompt": "word " * 50, "chosen": "a", "rejected": "b"},
             {"prompt": "short", "chosen": "a " * 40, "rejected": "b"},
             {"prompt": "short", "chosen": "a", "rejected": "b"}]
    examples, skipped = tokenize_pairs(tokenizer, pairs, max_prompt_length=20, max_length=30)
    assert skipped == {"prompt_too_long": 1, "too_long": 1}
    assert len(examples) == 1
    assert tokenizer.decode(examples[0]["prompt_ids"]) == "short"
    assert examples[0]["chosen_ids"][-1] == tokenizer.eos_token_id
