"""Shared fixtures: an isolated, quiet Prefect (one test harness per session) and a tiny local model."""

from __future__ import annotations

import os
import tempfile
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


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for the whole session (~10 s once), heartbeats off."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(), temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
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
