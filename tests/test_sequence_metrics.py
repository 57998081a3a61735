"""Eq. 9 (approximate reverse-KL) and eq. 10 (length-normalised NLL) against hand-computable toys."""

from __future__ import annotations

import math

import pytest
import torch

from alma_r.models import synthetic
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.sequence.metrics import (
    generate_completion_ids,
    length_normalised_nll,
    reverse_kl,
    reverse_kl_plugin,
    sequence_logps,
)
from alma_r.models.train.batching import tokenize_pair

# A toy with an enumerable support: Q and P-hat over three sequences of one prompt.
Q = [0.5, 0.3, 0.2]
P = [0.2, 0.5, 0.3]
EXACT_KL = sum(
    q * math.log(q / p) for q, p in zip(Q, P, strict=True)
)  # 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3)


pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


def test_reverse_kl_monte_carlo_converges_to_the_exact_value():
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(torch.tensor(Q), 20000, replacement=True, generator=g)  # y ~ Q
    q_logps, p_logps = torch.tensor(Q).log()[draws], torch.tensor(P).log()[draws]
    est = reverse_kl(q_logps, p_logps, groups=[0] * len(draws))
    terms = (q_logps - p_logps).double()
    se = terms.std().item() / math.sqrt(len(draws))
    assert abs(est - EXACT_KL) < 4 * se and se < 0.01
    # the paper's plug-in form over the distinct samples: here they cover the support, so it is exact
    plugin = reverse_kl_plugin(q_logps, p_logps, [[y] for y in draws.tolist()], [0] * len(draws))
    assert plugin == pytest.approx(EXACT_KL, rel=1e-6)
    # ...and below the KL when a sequence is missing (only the first two were sampled)
    partial = reverse_kl_plugin(torch.tensor(Q[:2]).log(), torch.tensor(P[:2]).log(), [[0], [1]], [0, 0])
    assert partial == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6), rel=1e-6)


def test_reverse_kl_and_nll_by_hand_with_two_prompts():
    # prompt a: samples with log Q = -1, -3 and log P-hat = -2, -2; prompt b: one sample, -0.5 vs -4.5
    q = torch.tensor([-1.0, -3.0, -0.5])
    p = torch.tensor([-2.0, -2.0, -4.5])
    groups = ["a", "a", "b"]
    assert reverse_kl(q, p, groups) == pytest.approx(((1.0 + -1.0) / 2 + 4.0) / 2)
    # eq. 10: lengths 2, 4 and 3 tokens: a -> (2/2 + 2/4)/2 = 0.75, b -> 4.5/3 = 1.5; mean 1.125
    assert length_normalised_nll(p, torch.tensor([2, 4, 3]), groups) == pytest.approx(1.125)
    assert reverse_kl(q, q) == 0.0


@pytest.fixture(scope="module")
def model_and_prompts(tmp_path_factory):
    folder = synthetic.build_model(tmp_path_factory.mktemp("seqmetrics") / "model", seed=2)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    segs = synthetic.make_task(5, n_train=0, n_preference=6, n_test=0).preference
    return tokenizer, model, segs


def test_sequence_logps_match_a_full_forward_pass(model_and_prompts):
    tokenizer, model, segs = model_and_prompts
    pairs = [tokenize_pair(tokenizer, s.prompt, s.ref, s.ref) for s in segs]
    prompts, completions = [p["chosen_prompt_ids"] for p in pairs], [p["chosen_ids"] for p in pairs]
    logps, counts = sequence_logps(model, prompts, completions, tokenizer.pad_token_id, batch_size=4)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        with torch.no_grad():
            lsm = model(torch.tensor([p + c])).logits[0].log_softmax(-1)  # (T, V), no padding
        want = sum(lsm[len(p) - 1 + t, tok].item() for t, tok in enumerate(c))
        assert logps[i].item() == pytest.approx(want, abs=1e-4) and counts[i].item() == len(c)


def test_generated_ids_are_the_projects_generations_and_samples_are_seeded(model_and_prompts):
    tokenizer, model, segs = model_and_prompts
    prompts = [tokenizer(s.prompt, add_special_tokens=False)["input_ids"] for s in segs]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = generate_completion_ids(model, prompts, eos, pad, False, 12, seed=0, batch_size=4)
    texts = generate_translations(
        model, tokenizer, [s.prompt for s in segs], Decoding(max_new_tokens=12), 4, 64
    )
    assert [tokenizer.decode(g, skip_special_tokens=True).strip() for g in greedy] == texts
    a = generate_completion_ids(model, prompts, eos, pad, True, 12, seed=1)
    assert a == generate_completion_ids(model, prompts, eos, pad, True, 12, seed=1)
    assert a != generate_completion_ids(model, prompts, eos, pad, True, 12, seed=2)
    for ids in a:
        assert pad not in ids and (eos not in ids or ids.index(eos) == len(ids) - 1) and len(ids) <= 12
    # a model's reverse-KL against itself is 0 on its own samples
    q, _ = sequence_logps(model, prompts, a, pad)
    assert reverse_kl(q, q) == 0.0
