"""The contract of each synthetic-negative sampler (models/sequence/negatives.py)."""

from __future__ import annotations

import random

import pytest
import torch

from alma_r.data.io import SchemaError, write_table
from alma_r.data.schemas import CANDIDATES
from alma_r.models import synthetic
from alma_r.models.generate.hf_backend import Decoding, generate_translations
from alma_r.models.loading import load_model, load_tokenizer
from alma_r.models.sequence.negatives import (
    autoregressive_negatives,
    batch_negatives,
    draw_negatives,
    meanfield_negatives,
    meanfield_positions,
    read_autoregressive_samples,
    truncation_negatives,
)
from alma_r.models.sequence.settings import NegativeMix
from alma_r.models.train.batching import tokenize_pair

pytestmark = pytest.mark.usefixtures("torch_on_one_thread")


EOS = 1  # synthetic.build_tokenizer's </s>


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return synthetic.build_model(tmp_path_factory.mktemp("neg") / "model", seed=0)


@pytest.fixture(scope="module")
def rows(model_dir):
    """(tokenizer, prompts, completions) of 6 synthetic segments, completions with EOS."""
    tokenizer = load_tokenizer(str(model_dir))
    task = synthetic.make_task(1, n_train=0, n_preference=6, n_test=0, p_drop_adj=0.0)
    pairs = [tokenize_pair(tokenizer, s.prompt, s.ref, s.ref) for s in task.preference]
    return tokenizer, [p["chosen_prompt_ids"] for p in pairs], [p["chosen_ids"] for p in pairs]


def test_batch_negatives_never_use_the_rows_own_continuation():
    # rows 0 and 2 have the same text: row 0 gets neither its own (by index) nor row 2's identical text
    completions = [[5, 6, EOS], [7, EOS], [5, 6, EOS], [8, 9, 9, EOS]]
    for seed in range(50):
        out = batch_negatives(completions, 2, random.Random(seed))
        for i, negs in enumerate(out):
            assert len(negs) == 2 and all(n != completions[i] for n in negs)
            assert all(n in completions for n in negs)
    # only identical texts available: other rows by index (a tie), never an error
    same = [[5, EOS], [5, EOS]]
    assert batch_negatives(same, 1, random.Random(0)) == [[[5, EOS]], [[5, EOS]]]
    # fewer other rows than negatives: drawn with replacement, still never the own row
    out = batch_negatives([[1, EOS], [2, EOS], [3, EOS]], 4, random.Random(0))
    assert all(len(negs) == 4 and [i + 1, EOS] not in negs for i, negs in enumerate(out))
    with pytest.raises(ValueError, match="at least 2 rows"):
        batch_negatives([[1, EOS]], 1, random.Random(0))
    # a draw is a function of the seed
    assert batch_negatives(completions, 2, random.Random(3)) == batch_negatives(
        completions, 2, random.Random(3)
    )


@pytest.mark.parametrize(
    "n,share,want",
    [(1, 0.25, 1), (4, 0.25, 1), (6, 0.25, 2), (2, 0.25, 1), (10, 0.25, 3), (8, 1.0, 8), (0, 0.5, 0)],
)
def test_meanfield_position_count_rounds_half_up_with_at_least_one(n, share, want):
    # 6 * 0.25 = 1.5 -> 2 (Python's round(1.5) is also 2, but round(2.5) = 2 where we take 3: 10 * 0.25)
    assert meanfield_positions(n, share) == want


def test_meanfield_changes_the_configured_share_of_positions_and_nothing_else(model_dir, rows):
    tokenizer, prompts, completions = rows
    model = load_model(str(model_dir))
    specials = set(tokenizer.all_special_ids)
    for share in (0.25, 0.5, 1.0):
        g = torch.Generator().manual_seed(0)
        out = meanfield_negatives(
            model, prompts, completions, 5, share, g, tokenizer.eos_token_id, tokenizer.pad_token_id, specials
        )
        for completion, negs in zip(completions, out, strict=True):
            content = len(completion) - 1
            for neg in negs:
                assert len(neg) == len(completion) and neg[-1] == tokenizer.eos_token_id
                changed = [t for t in range(len(neg)) if neg[t] != completion[t]]
                assert len(changed) == meanfield_positions(content, share)
                assert all(neg[t] not in specials for t in changed)
    # seeded: the same generator seed gives the same negatives
    ids = tokenizer.eos_token_id, tokenizer.pad_token_id
    draw = lambda: meanfield_negatives(  # noqa: E731
        model, prompts, completions, 3, 0.5, torch.Generator().manual_seed(7), *ids, specials
    )
    assert draw() == draw()


def test_meanfield_samples_the_models_next_token_distribution(model_dir, rows):
    """At one position, the frequency of each replacement matches the model's own probability there (from a
    separate full forward pass), renormalised without the original token and the special tokens."""
    tokenizer, prompts, completions = rows
    model = load_model(str(model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # a peaked distribution, so that frequencies are measurable
    prompt, completion = prompts[0], completions[0][:1] + [tokenizer.eos_token_id]  # one content token
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1].float()
    specials = set(tokenizer.all_special_ids)
    logits[sorted(specials | {completion[0]})] = float("-inf")
    want = logits.softmax(-1)
    out = meanfield_negatives(
        model,
        [prompt],
        [completion],
        4000,
        1.0,
        torch.Generator().manual_seed(0),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        specials,
    )[0]
    assert all(neg[1] == tokenizer.eos_token_id for neg in out)  # the final EOS is never resampled
    counts = torch.bincount(torch.tensor([neg[0] for neg in out]), minlength=len(want)).double() / len(out)
    top = want.argsort(descending=True)[:3]
    assert want[top[0]] > 0.2
    for tok in top.tolist():
        se = (want[tok] * (1 - want[tok]) / len(out)).sqrt()
        assert abs(counts[tok] - want[tok]) < 5 * se + 1e-3, (tok, counts[tok].item(), want[tok].item())


def test_truncation_negatives_are_a_strict_prefix_plus_eos():
    completions = [[5, 6, 7, 8, EOS], [9, EOS], [4, 4, 4]]  # the last has no EOS: all of it is content
    out = truncation_negatives(completions, 3, EOS, random.Random(0))
    for completion, negs in zip(completions, out, strict=True):
        content = completion[:-1] if completion[-1] == EOS else completion
        assert len(negs) == 3
        for neg in negs:
            assert neg[-1] == EOS and len(neg) - 1 < len(content) and neg[:-1] == content[: len(neg) - 1]
    assert sorted(len(n) for n in out[0]) == sorted(
        set(len(n) for n in out[0])
    )  # distinct cuts when possible
    assert out[1] == [[EOS]] * 3  # one content token: the only strict prefix is empty
    with pytest.raises(ValueError, match="row 0"):
        truncation_negatives([[EOS]], 1, EOS, random.Random(0))


def test_autoregressive_negatives_come_from_the_generation_stages_parquet(model_dir, rows, tmp_path):
    tokenizer, prompts, completions = rows
    model = load_model(str(model_dir))
    task = synthetic.make_task(1, n_train=0, n_preference=6, n_test=0, p_drop_adj=0.0)
    decoding = Decoding(do_sample=True, top_k=50, max_new_tokens=8)
    paths = []
    for k in range(1, 4):  # a system with n = 3 writes <name>-1..-3, one seeded pass each (tasks/generate.py)
        texts = generate_translations(
            model, tokenizer, [s.prompt for s in task.preference], decoding, 8, 64, seed=k
        )
        rows_k = [
            {"segment_id": s.id, "lp": s.lp, "system": f"an-{k}", "hypothesis": t, "model_id": "m",
             "generation": "{}"}
            for s, t in zip(task.preference, texts, strict=True)
        ]  # fmt: skip
        paths.append(write_table(rows_k, tmp_path / f"an-{k}.parquet", CANDIDATES))
    samples = read_autoregressive_samples(paths)
    assert set(samples) == {s.id for s in task.preference} and all(len(v) == 3 for v in samples.values())
    tokenised = [
        [tokenize_pair(tokenizer, s.prompt, t, t)["chosen_ids"] for t in samples[s.id]]
        for s in task.preference
    ]
    # a sample equal to the ground truth is skipped while others are left
    tokenised[0][1] = list(completions[0])
    out = autoregressive_negatives(completions, tokenised, 2, random.Random(0))
    for row, negs in enumerate(out):
        assert len(negs) == 2 and all(n in tokenised[row] for n in negs)
    assert completions[0] not in out[0]
    # a file that is not a CANDIDATES table is refused by the schema check
    write_table(
        [{"segment_id": "x"}],
        tmp_path / "bad.parquet",
        __import__("pyarrow").schema([("segment_id", "string")]),
    )
    with pytest.raises(SchemaError):
        read_autoregressive_samples([tmp_path / "bad.parquet"])


def test_top_k_reaches_transformers_sampling(model_dir, rows):
    """top_k = 1 sampling is greedy decoding: the knob is passed to generate()."""
    tokenizer, _, _ = rows
    model = load_model(str(model_dir))
    prompts = [s.prompt for s in synthetic.make_task(2, 0, 5, 0).preference]
    greedy = generate_translations(model, tokenizer, prompts, Decoding(max_new_tokens=8), 8, 64)
    top1 = generate_translations(
        model, tokenizer, prompts, Decoding(do_sample=True, top_k=1, max_new_tokens=8), 8, 64
    )
    full = generate_translations(
        model, tokenizer, prompts, Decoding(do_sample=True, top_k=0, max_new_tokens=8), 8, 64
    )
    assert top1 == greedy and full != greedy


def test_mix_draws_every_kind_in_column_order(model_dir, rows):
    tokenizer, prompts, completions = rows
    model = load_model(str(model_dir))
    mix = NegativeMix()  # 3 BN + 5 MN + 3 TN
    assert mix.total == 11 and mix.kinds() == ["bn"] * 3 + ["mn"] * 5 + ["tn"] * 3
    kw = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, model=model)
    out = draw_negatives(mix, prompts, completions, seed=5, **kw)
    assert out == draw_negatives(mix, prompts, completions, seed=5, **kw)
    assert out != draw_negatives(mix, prompts, completions, seed=6, **kw)
    for i, negs in enumerate(out):
        assert len(negs) == 11
        assert all(n in completions and n != completions[i] for n in negs[:3])
        assert all(len(n) == len(completions[i]) for n in negs[3:8])
        assert all(n[-1] == tokenizer.eos_token_id and len(n) < len(completions[i]) for n in negs[8:])
    with pytest.raises(ValueError, match="not all 0"):
        NegativeMix(batch=0, meanfield=0, truncation=0)
    with pytest.raises(ValueError, match="meanfield_share"):
        NegativeMix(meanfield_share=0.0)
    with pytest.raises(ValueError, match="need the model"):
        draw_negatives(NegativeMix(), prompts, completions, seed=0, eos_id=1, pad_id=3)
