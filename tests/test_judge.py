"""The LLM judge against a fake OpenAI-compatible server on loopback whose answers follow a rule per item, so
that win rate, ties, invalid answers and the interval can be checked by hand."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from alma_r.models.evaluate.judge import (
    DOLLY_JUDGE_TEMPLATE,
    MARKDOWN_HEADER,
    WIKI_JUDGE_TEMPLATE,
    JudgeConfig,
    judge_against_references,
    judge_prompts,
    markdown_row,
    parse_answer,
    wilson_interval,
    write_result_json,
)
from alma_r.models.generate.openai_backend import EndpointConfig
from tests.helpers import QuietHandler, serve_on_loopback


def parse_judge_prompt(prompt: str) -> tuple[str, str, str]:
    """(query, response A, response B) of a Dolly judge prompt with one-line texts."""
    fields = {}
    for line in prompt.split("\n"):
        for key in ("Query", "Response A", "Response B"):
            if line.startswith(f" {key}: "):
                fields[key] = line[len(key) + 3 :]
    return fields["Query"], fields["Response A"], fields["Response B"]


def rule_by_query(query: str, a: str, b: str) -> str:
    """The answer the fake judge gives: the query names its behaviour, outputs start with 'out', references
    with 'ref'."""
    behaviour = query.split(":")[1]
    output_letter = "A" if a.startswith("out") else "B"
    reference_letter = "B" if output_letter == "A" else "A"
    if behaviour == "prefer-output":
        return output_letter
    if behaviour == "prefer-reference":
        return reference_letter
    if behaviour == "always-A":  # pure position bias
        return "A"
    if behaviour == "always-B":
        return "B"
    if behaviour == "sloppy":  # prefers the output, in a format that normalisation accepts
        return {"A": ' "a."\n', "B": "**B**"}[output_letter]
    if behaviour == "invalid-first":  # a sentence when the output comes first, a letter otherwise
        return "Response A is better" if output_letter == "A" else output_letter
    if behaviour == "invalid-both":
        return "I cannot decide."
    raise AssertionError(behaviour)


class FakeJudge:
    """An OpenAI-compatible chat server answering by `rule(query, a, b)`; it records every prompt it got."""

    def __init__(self, rule):
        self.prompts: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                prompt = json.loads(self.read_body())["messages"][0]["content"]
                with lock:
                    outer.prompts.append(prompt)
                self.reply_chat(rule(*parse_judge_prompt(prompt)))

        self.httpd = serve_on_loopback(Handler)
        self.endpoint = EndpointConfig(
            base_url=f"http://127.0.0.1:{self.httpd.server_address[1]}/v1",
            model="fake-judge",
            max_retries=0,
        )

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_judge():
    judges = []

    def start(rule):
        judges.append(FakeJudge(rule))
        return judges[-1]

    yield start
    for judge in judges:
        judge.close()


# 12 items: 7 wins (5 + 2 sloppy), 2 ties, 1 loss, 2 left out with 3 invalid answers between them.
BEHAVIOURS = ["prefer-output"] * 5 + ["sloppy"] * 2 + ["always-A"] * 2 + ["prefer-reference"]
BEHAVIOURS += ["invalid-first", "invalid-both"]


def items(behaviours):
    queries = [f"q{i}:{b}" for i, b in enumerate(behaviours)]
    outputs = [f"out {i}" for i in range(len(behaviours))]
    references = [f"ref {i}" for i in range(len(behaviours))]
    return queries, outputs, references


def assert_counts_add_up(run) -> None:
    """What holds for any judge run, whatever the judge answered: the result's counts agree with its items,
    and the win rate and its Wilson interval are those of the decided items."""
    r = run.result
    answers = [a for it in run.items for a in (it.answer_output_first, it.answer_reference_first)]
    letters = [parse_answer(a) for a in answers]
    assert r.items == len(run.items) and r.judgements == 2 * len(run.items) == len(answers)
    assert r.invalid == letters.count(None) and r.answered_a + r.answered_b + r.invalid == r.judgements
    decided = [it for it in run.items if it.score is not None]
    assert r.decided_items == len(decided) == r.wins + r.ties + r.losses
    for it in run.items:  # an item counts only with both answers valid
        both_valid = it.preferred_output_first is not None and it.preferred_reference_first is not None
        assert (it.score is not None) == both_valid
    if decided:
        assert r.win_rate == pytest.approx(sum(it.score for it in decided) / len(decided))
        assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(r.win_rate, len(decided)))
        assert r.ci_low <= r.win_rate <= r.ci_high
    else:
        assert r.win_rate is None and r.ci_low is None and r.ci_high is None


def test_hand_checked_mixture_both_orders_once_and_a_rerun_is_free(fake_judge, tmp_path):
    judge = fake_judge(rule_by_query)
    queries, outputs, references = items(BEHAVIOURS)
    run = judge_against_references(judge.endpoint, queries, outputs, references, tmp_path / "judge.sqlite")
    r = run.result

    # Every item asked exactly twice, once with the output as Response A and once as Response B.
    asked = Counter(parse_judge_prompt(p)[:2] for p in judge.prompts)
    assert len(judge.prompts) == 24 and set(asked.values()) == {1}
    for q, out, ref in zip(queries, outputs, references, strict=True):
        assert asked[(q, out)] == 1 and asked[(q, ref)] == 1
    assert run.request_stats == {"requests": 24, "retries": 0, "cached": 0}

    assert (r.items, r.judgements, r.invalid, r.decided_items) == (12, 24, 3, 10)
    # A answers: 5+2 (output first) + 2*2 (always-A) + 1 (prefer-reference, reference first) = 12
    assert (r.answered_a, r.answered_b) == (12, 9) and r.answered_a + r.answered_b + r.invalid == 24
    assert (r.wins, r.ties, r.losses) == (7, 2, 1)
    assert r.win_rate == pytest.approx((7 + 2 / 2) / 10)  # 0.8
    # Wilson 95% for 0.8 on n = 10: the textbook values for 8/10.
    assert (r.ci_low, r.ci_high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert r.judge_model == "fake-judge" and "orders:both" in r.signature and "template:dolly" in r.signature

    scores = [it.score for it in run.items]
    assert scores == [1.0] * 7 + [0.5] * 2 + [0.0] + [None, None]
    assert_counts_add_up(run)
    assert run.items[10].answer_output_first == "Response A is better"
    assert (
        run.items[10].preferred_output_first is None and run.items[10].preferred_reference_first == "output"
    )

    again = judge_against_references(judge.endpoint, queries, outputs, references, tmp_path / "judge.sqlite")
    assert len(judge.prompts) == 24 and again.request_stats == {"requests": 0, "retries": 0, "cached": 24}
    assert again.result == r


@pytest.mark.parametrize("behaviour", ["always-A", "always-B"])
def test_a_judge_that_only_follows_the_position_gives_exactly_one_half(fake_judge, tmp_path, behaviour):
    judge = fake_judge(rule_by_query)
    r = judge_against_references(judge.endpoint, *items([behaviour] * 6), tmp_path / "j.sqlite").result
    assert (r.wins, r.ties, r.losses, r.invalid) == (0, 6, 0, 0)
    assert r.win_rate == 0.5 and r.ci_low < 0.5 < r.ci_high


def test_all_answers_invalid_gives_no_win_rate(fake_judge, tmp_path):
    judge = fake_judge(rule_by_query)
    r = judge_against_references(judge.endpoint, *items(["invalid-both"] * 3), tmp_path / "j.sqlite").result
    assert (r.judgements, r.invalid, r.decided_items) == (6, 6, 0)
    assert r.win_rate is None and r.ci_low is None and r.ci_high is None
    assert markdown_row(r, "mle") == "| mle | fake-judge | 3 | 0 | n/a | n/a | 0 / 0 / 0 | 6 / 6 |"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("B", "B"),
        (" b\n", "B"),
        ("a.", "A"),
        ('"A"', "A"),
        ("(B)", "B"),
        ("**A**", "A"),
        ("'B'.", "B"),
        ("", None),
        ("   ", None),
        ("C", None),
        ("AB", None),
        ("A or B", None),
        ("Response A", None),
        ("A, because it is longer", None),
        ("Ä", None),
    ],
)
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_wilson_interval_hand_checked():
    # p = 1 on n trials: the interval is [n / (n + z^2), 1].
    z2 = 1.959963984540054**2
    assert wilson_interval(1.0, 5) == (pytest.approx(5 / (5 + z2)), 1.0)
    assert wilson_interval(0.0, 5) == (0.0, pytest.approx(z2 / (5 + z2)))
    low, high = wilson_interval(0.5, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_prompts_are_the_papers_templates_in_both_orders():
    prompts = judge_prompts(["Which is {bigger}?"], ["out"], ["ref"], "dolly")
    assert prompts == [
        "For the following query to a chatbot, which response is more helpful?\n Query: Which is {bigger}?\n"
        ' Response A: out\n Response B: ref\n State only "A" or "B" to indicate which response is more'
        " helpful.\n More helpful:",
        DOLLY_JUDGE_TEMPLATE.format("Which is {bigger}?", "ref", "out"),
    ]
    wiki = judge_prompts(["The cat"], ["sat."], ["ran."], "wiki")[1]
    assert wiki == WIKI_JUDGE_TEMPLATE.format("The cat", "ran.", "sat.")
    assert wiki.endswith(
        ' Continuation B: sat.\n State only "A" or "B" to indicate which continuation is '
        "more helpful.\n Better:"
    )


def test_bad_inputs_and_configs_say_what_is_wrong(tmp_path):
    endpoint = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(ValueError, match="2 queries, 1 outputs, 2 references"):
        judge_against_references(endpoint, ["a", "b"], ["x"], ["y", "z"], tmp_path / "j.sqlite")
    with pytest.raises(ValueError, match="row 1: field 'output' is NoneType"):
        judge_against_references(endpoint, ["a", "b"], ["x", None], ["y", "z"], tmp_path / "j.sqlite")
    with pytest.raises(ValueError, match="template='alpaca'"):
        JudgeConfig(template="alpaca")
    with pytest.raises(ValueError, match="confidence=1.5"):
        JudgeConfig(confidence=1.5)


def test_result_json_and_markdown_row(fake_judge, tmp_path):
    judge = fake_judge(rule_by_query)
    r = judge_against_references(judge.endpoint, *items(BEHAVIOURS), tmp_path / "j.sqlite").result
    path = write_result_json(r, tmp_path / "out" / "judge.json")
    saved = json.loads(path.read_text())
    assert saved["win_rate"] == r.win_rate and saved["invalid"] == 3 and saved["judge_model"] == "fake-judge"
    assert [p.name for p in path.parent.iterdir()] == ["judge.json"]  # no temp file left behind
    row = markdown_row(r, "cpo")
    assert row == "| cpo | fake-judge | 12 | 10 | 0.800 | 95% [0.490, 0.943] | 7 / 2 / 1 | 3 / 24 |"
    assert row.count("|") == MARKDOWN_HEADER.splitlines()[0].count("|")
