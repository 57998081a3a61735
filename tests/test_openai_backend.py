"""The OpenAI-compatible backend against a server on loopback, behind a proxy that answers 429 and 500 some of
the time: every segment ends translated exactly once, and a rerun makes no request at all. The API key is
resolved by the stage side (tasks/shared/endpoints.py), never by the backend, and never shows."""

from __future__ import annotations

import http.client
import json
import random
import threading
from dataclasses import replace

import pytest

from alma_r.config import EndpointSection, load_config
from alma_r.data.io import read_rows, write_table
from alma_r.data.schemas import CANDIDATES, SEGMENTS
from alma_r.models.generate.cache import segment_seed
from alma_r.models.generate.openai_backend import EndpointConfig, EndpointError, translate_via_endpoint
from alma_r.models.prompts import make_prompt
from alma_r.tasks.generate import run_generate
from alma_r.tasks.shared.endpoints import endpoint_config, resolve_api_key
from tests.helpers import QuietHandler, serve_on_loopback

SECRET = "sk-test-do-not-log-0123456789"


class Server:
    """A minimal OpenAI-compatible server: 'translates' by upper-casing the source line of the prompt."""

    def __init__(self):
        self.served: list[str] = []
        self.bodies: list[dict] = []
        self.auth: set[str] = set()
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = json.loads(self.read_body())
                outer.bodies.append(body)
                outer.auth.add(self.headers.get("Authorization", ""))
                prompt = body["messages"][0]["content"] if "messages" in body else body["prompt"]
                source = prompt.split("\n")[-2].split(": ", 1)[1]
                outer.served.append(source)
                text = source.upper()
                choice = (
                    {"message": {"role": "assistant", "content": text}}
                    if "messages" in body
                    else {"text": " " + text + "\n"}
                )
                self.reply_json(json.dumps({"choices": [choice]}).encode())

        self.httpd = serve_on_loopback(Handler)
        self.port = self.httpd.server_address[1]


class FaultyProxy:
    """Forwards to the server, but answers 429 (with Retry-After) or 500 to a seeded share of requests."""

    def __init__(self, upstream_port: int, fail_rate: float = 0.4, seed: int = 0):
        self.requests = 0
        self.faults = 0
        self.forwarded: list[bytes] = []  # request bodies that reached the server
        rng = random.Random(seed)
        lock = threading.Lock()
        outer = self

        class Handler(QuietHandler):
            def do_POST(self):
                body = self.read_body()
                with lock:
                    outer.requests += 1
                    roll = rng.random()
                if roll < fail_rate:
                    with lock:
                        outer.faults += 1
                    if roll < fail_rate / 2:
                        self.reply(429, headers={"Retry-After": "0"})
                    else:
                        self.reply(500)
                    return
                with lock:
                    outer.forwarded.append(body)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=10)
                conn.request("POST", self.path, body, dict(self.headers))
                response = conn.getresponse()
                self.reply(response.status, response.read(), {"Content-Type": "application/json"})

        self.httpd = serve_on_loopback(Handler)
        self.port = self.httpd.server_address[1]


SOURCES = [f"Satz Nummer {i} ist hier" for i in range(40)]


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_faults_are_retried_each_segment_once_and_a_rerun_is_free(tmp_path, monkeypatch, api):
    monkeypatch.setenv("ALMA_R_TEST_KEY", SECRET)
    server = Server()
    proxy = FaultyProxy(server.port)
    section = EndpointSection(
        base_url=f"http://127.0.0.1:{proxy.port}/v1",
        model="tiny",
        api=api,
        api_key_env="ALMA_R_TEST_KEY",
        max_concurrency=4,
        max_retries=12,
    )
    # As the generate stage builds it: the key read from the environment variable the section names.
    cfg = replace(endpoint_config(section), backoff_s=0.001)
    prompts = [make_prompt(s, "de", "en") for s in SOURCES]
    out, stats = translate_via_endpoint(cfg, prompts, tmp_path / "requests.sqlite")
    assert out == [s.upper() for s in SOURCES]
    assert sorted(server.served) == sorted(SOURCES)  # every segment translated exactly once
    assert proxy.faults > 0 and stats["retries"] == proxy.faults and stats["requests"] == proxy.requests
    assert server.auth == {f"Bearer {SECRET}"}

    before = proxy.requests
    again, stats2 = translate_via_endpoint(cfg, prompts, tmp_path / "requests.sqlite")
    assert again == out and proxy.requests == before and stats2 == {"requests": 0, "retries": 0, "cached": 40}


def test_a_refusal_is_not_retried_and_the_key_never_shows(tmp_path):
    class Refuse(QuietHandler):
        def do_POST(self):
            self.read_body()
            self.reply(401, b'{"error": "bad key"}')

    httpd = serve_on_loopback(Refuse)
    cfg = EndpointConfig(
        base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
        model="m",
        api_key=SECRET,
        max_retries=5,
        backoff_s=0.001,
    )
    with pytest.raises(EndpointError) as err:
        translate_via_endpoint(cfg, [make_prompt("Hallo", "de", "en")], tmp_path / "r.sqlite")
    assert "HTTP 401" in str(err.value) and SECRET not in str(err.value)
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)  # logging the config never shows the key


def test_the_secret_block_wins_over_the_environment_variable_and_none_means_no_key(monkeypatch):
    monkeypatch.setenv("ALMA_R_TEST_KEY", "from-env")
    asked = []

    def resolver(name: str) -> str:
        asked.append(name)
        return SECRET

    both = EndpointSection(
        base_url="http://x/v1", model="m", api_key_env="ALMA_R_TEST_KEY", api_key_secret="k"
    )
    assert resolve_api_key(both, resolver) == SECRET and asked == ["k"]
    env_only = EndpointSection(base_url="http://x/v1", model="m", api_key_env="ALMA_R_TEST_KEY")
    assert endpoint_config(env_only, resolver).api_key == "from-env" and asked == ["k"]
    monkeypatch.delenv("ALMA_R_TEST_KEY")
    assert endpoint_config(env_only, resolver).api_key is None
    no_key = EndpointSection(base_url="http://x/v1", model="m", api_key_env=None)
    assert endpoint_config(no_key, resolver).api_key is None and asked == ["k"]


def test_the_stage_seeds_each_request_by_its_segment_and_asks_only_for_new_segments(tmp_path, tiny_model_dir):
    """The generate stage's endpoint system: each (segment, sample) request carries the segment's seed, whatever
    the other segments; a rerun on grown data asks only for the new segments (the generation cache has the
    rest)."""
    server = Server()
    endpoint = f"{{base_url: 'http://127.0.0.1:{server.port}/v1', model: tiny, api_key_env: null}}"
    cfg = load_config(
        overrides=[
            f"generate.systems=[{{name: api, backend: openai, do_sample: true, n: 2, endpoint: {endpoint}}}]",
            f"run.root={tmp_path / 'runs'}",
        ]
    )
    segs = [
        {
            "id": f"s{i}",
            "lp": "de-en",
            "src_lang": "de",
            "tgt_lang": "en",
            "src": src,
            "ref": "r",
            "origin": "o",
            "split": "train",
        }
        for i, src in enumerate(SOURCES[:5])
    ]
    small = write_table(segs[:3], tmp_path / "small.parquet", SEGMENTS)
    grown = write_table(segs, tmp_path / "grown.parquet", SEGMENTS)
    run_generate(cfg, small, str(tiny_model_dir), None, tmp_path / "a")
    sent = {(b["messages"][0]["content"], b["seed"]) for b in server.bodies}
    assert len(server.bodies) == 6 and sent == {
        (make_prompt(s["src"], "de", "en"), segment_seed(cfg.run.seed, s["id"], k))
        for s in segs[:3]
        for k in (0, 1)
    }
    server.bodies.clear()
    outputs, counts = run_generate(cfg, grown, str(tiny_model_dir), None, tmp_path / "b")
    assert sorted(b["seed"] for b in server.bodies) == sorted(
        segment_seed(cfg.run.seed, s["id"], k) for s in segs[3:] for k in (0, 1)
    )
    assert (counts["api-1/generated"], counts["api-1/from_cache"]) == (2, 3)
    rows = read_rows(outputs["candidates/api-2"], CANDIDATES)
    assert [r["hypothesis"] for r in rows] == [s.upper() for s in SOURCES[:5]]
