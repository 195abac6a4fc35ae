"""Shared pytest set-up: offline hub, project root on sys.path, models loaded once."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@functools.lru_cache(maxsize=None)
def load_cached(name: str, attn_implementation: str | None = None):
    """``(model, tokenizer)`` on CPU in float32, loaded once per test session."""
    import utils

    return utils.load_model_and_tokenizer(name, device="cpu", dtype="float32", attn_implementation=attn_implementation)


@pytest.fixture(scope="session")
def load_model():
    """Fixture: ``load_model(name, attn_implementation=None) -> (model, tokenizer)``."""
    return load_cached
