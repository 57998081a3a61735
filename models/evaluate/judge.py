"""Pairwise LLM-judge win rate of a model's outputs against the ground truth (paper 003, Section 5 "Evaluation").

The paper asks GPT-3.5 which of two responses is more helpful, with the templates below, and counts how often
the model's response is preferred to the ground truth. GPT judges prefer whichever answer comes first (or
second) for reasons unrelated to content (position bias, Wang et al. 2023); the paper cancels it only across
systems (every system suffers the same bias against the same ground truth). Here every comparison is asked in
BOTH orders, output as "Response A" and output as "Response B", so that the bias cancels within each item.

Definitions (decided here, the paper gives none beyond "the win rate over all test instructions"):

- An answer is valid when, after stripping whitespace and ASCII punctuation at both ends and upper-casing, it
  is exactly "A" or "B" ("A", " b.", '"A"', "(B)", "**A**" are valid; "Response A", "A or B", "AB", "" are not).
  The raw answer is kept on every item, so an invalid one can be read.
- Per item, each valid answer prefers the output or the reference. Item score: 1 if the output is preferred in
  both orders (win), 0.5 if the orders disagree (tie: the judge followed the position), 0 if the reference is
  preferred in both (loss).
- An item with an invalid answer in either order is left out of the win rate (its single valid answer would
  carry exactly the position bias the two orders are there to cancel); the number of items left out and of
  invalid answers are reported. With every answer invalid the win rate and its interval are None.
- Win rate = mean item score over the decided items = (wins + ties / 2) / decided items.
- 95% confidence interval: Wilson score interval with n = decided items and p = the win rate. For a score in
  {0, 0.5, 1} the per-item variance E[s^2] - p^2 is at most p(1 - p) (s^2 <= s on [0, 1]), so the binomial
  interval is exact without ties and conservative with them; unlike the normal approximation it stays inside
  [0, 1] and is not degenerate at 0 or 1.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

from alma_r.data.files import write_json_atomic, write_text_atomic
from alma_r.models.generate.openai_backend import EndpointConfig, complete_via_endpoint

# Paper 003, Section 5 "Evaluation", the query template for Dolly instruction following, verbatim (the paper's
# "\n" are newlines; each is followed by a space, as printed). The slots are query, response A, response B.
DOLLY_JUDGE_TEMPLATE = (
    "For the following query to a chatbot, which response is more helpful?\n"
    " Query: {}\n"
    " Response A: {}\n"
    " Response B: {}\n"
    ' State only "A" or "B" to indicate which response is more helpful.\n'
    " More helpful:"
)

# Paper 003, Appendix A.2 "Query template of Wiki text generation", verbatim except two repairs of the text as
# printed: the slots appear as "{" (the closing braces were lost; Section 5 prints them as "{}"), and the
# typographic quotes around A and B are ASCII quotes, as in the Section 5 template. Slots: prefix, A, B.
WIKI_JUDGE_TEMPLATE = (
    "For the following prefix, which continuation is better?\n"
    " Prefix: {}\n"
    " Continuation A: {}\n"
    " Continuation B: {}\n"
    ' State only "A" or "B" to indicate which continuation is more helpful.\n'
    " Better:"
)

TEMPLATES = {"dolly": DOLLY_JUDGE_TEMPLATE, "wiki": WIKI_JUDGE_TEMPLATE}

# The two positions of the model's output, asked for every item in this order.
ORDERS = ("output_first", "reference_first")

_STRIP = string.whitespace + string.punctuation


@dataclass(frozen=True)
class JudgeConfig:
    template: str = field(
        default="dolly",
        metadata={"help": "'dolly' (paper Section 5, instruction following) or 'wiki' (Appendix A.2)."},
    )
    max_tokens: int = field(
        default=8,
        metadata={
            "help": "Tokens the judge may answer with. A valid answer is one letter; 8 leaves room for a "
            "longer answer to show up as invalid rather than be cut down to a letter."
        },
    )
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy: one judge, one answer."})
    confidence: float = field(default=0.95, metadata={"help": "Level of the Wilson interval, in (0, 1)."})
    extra_body: dict | None = field(
        default=None,
        metadata={
            "help": "Further request parameters, e.g. {'logit_bias': {...}} to restrict the judge's first "
            "token to A and B. None (the paper's protocol): the judge answers freely."
        },
    )

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"JudgeConfig.template={self.template!r}: expected one of {sorted(TEMPLATES)}")
        if self.max_tokens < 1:
            raise ValueError(f"JudgeConfig.max_tokens={self.max_tokens}: expected at least 1")
        if not 0 < self.confidence < 1:
            raise ValueError(f"JudgeConfig.confidence={self.confidence}: expected a value in (0, 1)")


@dataclass(frozen=True)
class ItemJudgement:
    """One item asked in both orders: the raw answers, whom each valid one preferred, and the item score."""

    index: int
    answer_output_first: str  # the judge's raw text when the output was Response A
    answer_reference_first: str  # ... when the output was Response B
    preferred_output_first: str | None  # "output", "reference", or None (invalid answer)
    preferred_reference_first: str | None
    score: float | None  # 1 win, 0.5 tie, 0 loss; None when an answer was invalid


@dataclass(frozen=True)
class JudgeResult:
    judge_model: str
    template: str
    signature: str  # every setting that changes the numbers
    items: int
    judgements: int  # 2 x items: both orders
    invalid: int  # judgements whose answer was not "A" or "B"
    answered_a: int  # valid answers "A"; answered_a + answered_b + invalid = judgements
    answered_b: int
    decided_items: int  # items with both answers valid; the win rate is over these
    wins: int
    ties: int
    losses: int
    win_rate: float | None  # (wins + ties / 2) / decided_items; None when no item was decided
    ci_low: float | None
    ci_high: float | None
    confidence: float
    ci_method: str = "wilson over decided items"


@dataclass(frozen=True)
class JudgeRun:
    result: JudgeResult
    items: list[ItemJudgement]
    request_stats: dict  # requests sent, retries, answered from the cache (differs between reruns)


def parse_answer(text: str) -> str | None:
    """'A' or 'B' when the answer is that letter alone, up to whitespace, punctuation and case; else None."""
    letter = text.strip(_STRIP).upper()
    return letter if letter in ("A", "B") else None


def wilson_interval(p: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n={n}, expected at least one trial")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def judge_prompts(queries: list[str], outputs: list[str], references: list[str], template: str) -> list[str]:
    """Two prompts per item, in ORDERS: [item 0 output first, item 0 reference first, item 1 ..., ...]."""
    text = TEMPLATES[template]
    prompts = []
    for query, output, reference in zip(queries, outputs, references, strict=True):
        prompts.append(text.format(query, output, reference))
        prompts.append(text.format(query, reference, output))
    return prompts


def _preferred(letter: str | None, order: str) -> str | None:
    if letter is None:
        return None
    output_letter = "A" if order == "output_first" else "B"
    return "output" if letter == output_letter else "reference"


def score_answers(answers: list[str]) -> list[ItemJudgement]:
    """Items from the judge's raw answers, two per item in ORDERS."""
    if len(answers) % 2:
        raise ValueError(f"score_answers: {len(answers)} answers, expected two per item")
    items = []
    for i in range(len(answers) // 2):
        first, second = answers[2 * i], answers[2 * i + 1]
        p1 = _preferred(parse_answer(first), "output_first")
        p2 = _preferred(parse_answer(second), "reference_first")
        score = None if p1 is None or p2 is None else ((p1 == "output") + (p2 == "output")) / 2
        items.append(ItemJudgement(i, first, second, p1, p2, score))
    return items


def summarise(
    items: list[ItemJudgement], judge_model: str, template: str, signature: str, confidence: float = 0.95
) -> JudgeResult:
    letters = [parse_answer(a) for it in items for a in (it.answer_output_first, it.answer_reference_first)]
    scores = [it.score for it in items if it.score is not None]
    wins, ties, losses = scores.count(1.0), scores.count(0.5), scores.count(0.0)
    win_rate = ci_low = ci_high = None
    if scores:
        win_rate = (wins + ties / 2) / len(scores)
        ci_low, ci_high = wilson_interval(win_rate, len(scores), confidence)
    return JudgeResult(
        judge_model=judge_model,
        template=template,
        signature=signature,
        items=len(items),
        judgements=len(letters),
        invalid=letters.count(None),
        answered_a=letters.count("A"),
        answered_b=letters.count("B"),
        decided_items=len(scores),
        wins=wins,
        ties=ties,
        losses=losses,
        win_rate=win_rate,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence=confidence,
    )


def signature(endpoint: EndpointConfig, cfg: JudgeConfig) -> str:
    extra = json.dumps(cfg.extra_body, sort_keys=True) if cfg.extra_body else "none"
    return (
        f"judge:{endpoint.model}|api:{endpoint.api}|template:{cfg.template}|orders:both"
        f"|max_tokens:{cfg.max_tokens}|temperature:{cfg.temperature}|extra:{extra}"
        f"|ci:wilson{cfg.confidence:g}"
    )


def _check_texts(name: str, texts: list) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"judge: row {i}: field '{name}' is {type(text).__name__}, expected a string")


def judge_against_references(
    endpoint: EndpointConfig,
    queries: list[str],
    outputs: list[str],
    references: list[str],
    cache_path: Path,
    cfg: JudgeConfig | None = None,
) -> JudgeRun:
    """Ask the judge about every (query, output, reference) in both orders; the win rate of the outputs.

    Requests go through the project's OpenAI-compatible backend: bounded concurrency, retries, and a SQLite
    cache at `cache_path`, so that a rerun asks nothing twice."""
    cfg = cfg or JudgeConfig()
    if not len(queries) == len(outputs) == len(references):
        raise ValueError(
            f"judge: {len(queries)} queries, {len(outputs)} outputs, {len(references)} references: "
            "expected one of each per item"
        )
    for name, texts in (("query", queries), ("output", outputs), ("reference", references)):
        _check_texts(name, texts)
    prompts = judge_prompts(queries, outputs, references, cfg.template)
    answers, stats = complete_via_endpoint(
        endpoint,
        prompts,
        cache_path,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        extra=cfg.extra_body,
    )
    items = score_answers(answers)
    result = summarise(items, endpoint.model, cfg.template, signature(endpoint, cfg), cfg.confidence)
    return JudgeRun(result=result, items=items, request_stats=stats)


def write_result_json(result: JudgeResult, path: Path) -> Path:
    return write_json_atomic(Path(path), asdict(result))


def write_items_jsonl(items: list[ItemJudgement], path: Path) -> Path:
    lines = [json.dumps(asdict(it), ensure_ascii=False) for it in items]
    return write_text_atomic(Path(path), "".join(line + "\n" for line in lines))


MARKDOWN_HEADER = (
    "| system | judge | items | decided | win rate | CI | wins / ties / losses | invalid answers |\n"
    "|---|---|---|---|---|---|---|---|"
)


def markdown_row(result: JudgeResult, system: str) -> str:
    """One row under MARKDOWN_HEADER; 'n/a' where no item was decided."""
    if result.win_rate is None:
        rate, ci = "n/a", "n/a"
    else:
        rate = f"{result.win_rate:.3f}"
        ci = f"{result.confidence:.0%} [{result.ci_low:.3f}, {result.ci_high:.3f}]"
    return (
        f"| {system} | {result.judge_model} | {result.items} | {result.decided_items} | {rate} | {ci} "
        f"| {result.wins} / {result.ties} / {result.losses} | {result.invalid} / {result.judgements} |"
    )
