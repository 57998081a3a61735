"""A seeded synthetic translation task for the learning check: SFT is capped by flawed references, CPO is not.

The source language is a tiny English-like grammar of 94 words:

    sentence = NP Vi [Adv]  |  NP Vt NP [Adv]         NP = Det [Adj] Noun        (3-8 words)

and the target language ("German" in the ALMA prompt, really the upper-cased source words) translates word by
word, but reorders: the adjective after its noun, the verb after its object, the adverb last.

    the big dog sees a cat quickly   ->   THE DOG BIG A CAT SEES QUICKLY

Because each source word has one category, the correct translation is a pure function of the source
(`rule_translation`): the oracle scorer needs no reference. The references the model is fine-tuned on are
flawed on purpose: 65% of those whose source has an adjective drop every adjective (the harder variant also
drops the adverb from 80% of those with one). SFT learns the flaw; a metric that sees it can teach it away.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from alma_r.models.prompts import make_prompt
from alma_r.models.score.scorers import SegmentScore
from alma_r.models.tiny import build_tiny_model

# ------------------------------------------------------------------------------------------------- grammar

DET = ["the", "a", "every", "some"]
ADJ = [
    "big", "small", "red", "old", "young", "happy", "tired", "quiet", "brave", "clever",
    "green", "tall", "angry", "gentle", "hungry", "lazy", "proud", "shy", "strange", "wild",
]  # fmt: skip
NOUN = [
    "dog", "cat", "bird", "horse", "fox", "child", "teacher", "farmer", "king", "queen",
    "doctor", "sailor", "baker", "wolf", "lion", "mouse", "girl", "boy", "poet", "judge",
    "monk", "tiger", "rabbit", "bear", "owl", "goat", "pilot", "nurse", "singer", "clown",
]  # fmt: skip
VERB_INTRANSITIVE = [
    "sleeps", "runs", "laughs", "sings", "dances", "waits", "cries",
    "falls", "smiles", "swims", "jumps", "sits", "walks", "shouts",
]  # fmt: skip
VERB_TRANSITIVE = [
    "sees", "likes", "follows", "helps", "finds", "chases", "feeds",
    "calls", "watches", "meets", "teaches", "carries", "pushes", "greets",
]  # fmt: skip
ADV = [
    "quickly",
    "slowly",
    "today",
    "often",
    "quietly",
    "loudly",
    "again",
    "here",
    "now",
    "later",
    "gladly",
    "rarely",
]

CATEGORY = {
    **dict.fromkeys(DET, "det"),
    **dict.fromkeys(ADJ, "adj"),
    **dict.fromkeys(NOUN, "noun"),
    **dict.fromkeys(VERB_INTRANSITIVE, "vi"),
    **dict.fromkeys(VERB_TRANSITIVE, "vt"),
    **dict.fromkeys(ADV, "adv"),
}
SOURCE_WORDS = list(CATEGORY)
assert len(SOURCE_WORDS) == len(set(SOURCE_WORDS)) == 94, "every source word has exactly one category"

P_ADJECTIVE = 0.35  # per noun phrase
P_TRANSITIVE = 0.5
P_ADVERB = 0.5

# The ALMA prompt labels the directions; the project's prompt, tokenizer and selection code are used unchanged.
SRC_LANG, TGT_LANG = "en", "de"
LP = f"{SRC_LANG}-{TGT_LANG}"


def target_word(word: str) -> str:
    return word.upper()


def sample_source(rng: random.Random) -> str:
    def noun_phrase() -> list[str]:
        adjective = [rng.choice(ADJ)] if rng.random() < P_ADJECTIVE else []
        return [rng.choice(DET), *adjective, rng.choice(NOUN)]

    if rng.random() < P_TRANSITIVE:
        words = noun_phrase() + [rng.choice(VERB_TRANSITIVE)] + noun_phrase()
    else:
        words = noun_phrase() + [rng.choice(VERB_INTRANSITIVE)]
    if rng.random() < P_ADVERB:
        words.append(rng.choice(ADV))
    return " ".join(words)


def sample_distinct(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct sources, none of them in `exclude` (held-out and training sets never overlap)."""
    seen, out = set(exclude), []
    while len(out) < n:
        src = sample_source(rng)
        if src not in seen:
            seen.add(src)
            out.append(src)
    return out


def rule_translation(src: str, drop: frozenset[str] = frozenset()) -> str:
    """The correct translation of a grammatical source; categories in `drop` ("adj", "adv") are left out,
    which is how the flawed references are made."""
    words = src.split()
    pos = 0

    def noun_phrase() -> list[str]:
        nonlocal pos
        det = words[pos]
        pos += 1
        adjectives = []
        while CATEGORY[words[pos]] == "adj":
            adjectives.append(words[pos])
            pos += 1
        noun = words[pos]
        pos += 1
        return [det, noun] + ([] if "adj" in drop else adjectives)  # adjective after the noun

    subject = noun_phrase()
    verb = words[pos]
    pos += 1
    obj = noun_phrase() if CATEGORY[verb] == "vt" else []
    adverb = words[pos:]  # at most one
    out = subject + obj + [verb] + ([] if "adv" in drop else adverb)  # verb after the object, adverb last
    return " ".join(target_word(w) for w in out)


def has(src: str, category: str) -> bool:
    return any(CATEGORY[w] == category for w in src.split())


def flawed_reference(src: str, rng: random.Random, p_drop_adj: float, p_drop_adv: float) -> str:
    """The reference a careless translator wrote: adjectives dropped from a share of the sentences that have
    one (all of them at once), adverbs likewise."""
    drop = set()
    if has(src, "adj") and rng.random() < p_drop_adj:
        drop.add("adj")
    if has(src, "adv") and rng.random() < p_drop_adv:
        drop.add("adv")
    return rule_translation(src, frozenset(drop))


def blemish(src: str, hypothesis: str) -> str:
    """A perfect translation with one word-level flaw (the adverb dropped, else the adjectives, else the
    determiner of the subject); any other hypothesis as it is. The `imperfect` learning-check variant passes
    every candidate through it, so that no candidate is perfect and the best has the fewest flaws."""
    if hypothesis != rule_translation(src):
        return hypothesis
    for category in ("adv", "adj"):
        if has(src, category):
            return rule_translation(src, frozenset({category}))
    return " ".join(hypothesis.split()[1:])


def word_edit_distance(a: list[str], b: list[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def oracle_score(src: str, hypothesis: str) -> float:
    """1 - word edit distance / longer length, against the rule-based translation: 1.0 only when exact."""
    want, got = rule_translation(src).split(), hypothesis.split()
    longer = max(len(want), len(got))
    return 1.0 - word_edit_distance(want, got) / longer if longer else 1.0


class OracleScorer:
    """The task's perfect quality metric, behind the project's scorer interface (models/score/scorers.py).

    Reference-free: like KIWI it sees only the source and the candidate, so the flawed reference competes
    with the samples on equal terms."""

    uses_reference = False
    model_id = "synthetic-oracle|word-edit-distance|v1"

    def __init__(self):
        self.segments_scored = 0

    def score(self, items: list[dict]) -> list[SegmentScore]:
        self.segments_scored += len(items)
        return [SegmentScore(oracle_score(it["src"], it["mt"])) for it in items]


# -------------------------------------------------------------------------------------------------- data


@dataclass
class Segment:
    """One source sentence as the project's stages see it (the `segments` contract's fields we need)."""

    id: str
    src: str
    ref: str
    lp: str = LP
    src_lang: str = SRC_LANG
    tgt_lang: str = TGT_LANG

    def as_row(self) -> dict:
        return dict(self.__dict__)

    @property
    def prompt(self) -> str:
        return make_prompt(self.src, self.src_lang, self.tgt_lang)


@dataclass
class TaskData:
    train: list[Segment]  # SFT data (flawed references)
    preference: list[Segment]  # sources for candidates (flawed references, one candidate among the others)
    test: list[Segment]  # held-out; evaluated against the rule-based translation, never the reference


def make_task(
    seed: int,
    n_train: int,
    n_preference: int,
    n_test: int,
    p_drop_adj: float = 0.65,
    p_drop_adv: float = 0.0,
) -> TaskData:
    """Three disjoint sets of distinct sources, a pure function of the seed."""
    rng = random.Random(seed)
    test_src = sample_distinct(rng, n_test)
    pref_src = sample_distinct(rng, n_preference, set(test_src))
    train_src = sample_distinct(rng, n_train, set(test_src) | set(pref_src))

    def segments(name: str, sources: list[str]) -> list[Segment]:
        return [
            Segment(f"{name}-{i}", src, flawed_reference(src, rng, p_drop_adj, p_drop_adv))
            for i, src in enumerate(sources)
        ]

    return TaskData(segments("train", train_src), segments("pref", pref_src), segments("test", test_src))


# ---------------------------------------------------------------------------------------- tokenizer, model

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def prompt_words() -> list[str]:
    """The words of ALMA's prompt around the source (e.g. 'Translate', 'this', ..., 'German:')."""
    return list(dict.fromkeys(make_prompt("", SRC_LANG, TGT_LANG).split()))


def build_tokenizer():
    """A word-level tokenizer: one id per word (specials, prompt words, source words, target words), split on
    whitespace. Newlines in the prompt are whitespace; decoding joins the words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        list(SPECIAL_TOKENS.values()) + prompt_words() + SOURCE_WORDS + [target_word(w) for w in SOURCE_WORDS]
    )
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def build_model(
    out_dir: Path, seed: int, hidden_size: int = 128, layers: int = 2, intermediate_size: int = 224
) -> Path:
    """A randomly initialised LLaMA (width 128, 2 layers of 2 heads x 64, ~350k parameters) and the word-level
    tokenizer, saved (safetensors) to `out_dir` atomically: the folder the project's loaders and trainer take."""
    return build_tiny_model(
        [],
        out_dir,
        vocab_size=0,  # unused: the word-level tokenizer is given
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,  # the longest prompt + translation is 24 tokens
        seed=seed,
        tokenizer=build_tokenizer(),
    )


# ------------------------------------------------------------------------------------------------ metrics


def evaluate_outputs(sources: list[str], hypotheses: list[str | None]) -> dict[str, float]:
    """Exact match against the rule-based translation, overall and on sentences without an adjective (a
    model that games the metric, e.g. by repeating phrases, fails there too); the share of adjectives and
    adverbs whose translation appears in the output; the mean oracle score."""
    exact, exact_no_adj, n_no_adj = 0, 0, 0
    adj_kept = adj_total = adv_kept = adv_total = 0
    oracle = 0.0
    for src, hyp in zip(sources, hypotheses, strict=True):
        hyp = hyp or ""
        ok = hyp.split() == rule_translation(src).split()
        exact += ok
        if not has(src, "adj"):
            n_no_adj += 1
            exact_no_adj += ok
        out_words = Counter(hyp.split())
        for w in src.split():  # each occurrence counts once ("a big dog sees a big cat" has two)
            category, found = CATEGORY[w], out_words[target_word(w)] > 0
            out_words[target_word(w)] -= found
            if category == "adj":
                adj_total += 1
                adj_kept += found
            elif category == "adv":
                adv_total += 1
                adv_kept += found
        oracle += oracle_score(src, hyp)
    n = max(len(sources), 1)
    return {
        "exact_match": exact / n,
        "adjective_kept": adj_kept / max(adj_total, 1),
        "adverb_kept": adv_kept / max(adv_total, 1),
        "exact_match_no_adjective": exact_no_adj / max(n_no_adj, 1),
        "oracle": oracle / n,
    }
