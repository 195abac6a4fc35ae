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

import constants  # noqa: E402

# CLI flags that point a script at the WebQA fixtures (offline).
WEBQA_FIXTURE_ARGS = ["--data-file", str(constants.FIXTURE_FILES["webqa"]),
                      "--fewshot-file", str(constants.FIXTURE_WEBQA_TRAIN),
                      "--paraphrase-file", str(constants.FIXTURE_WEBQA_PARAPHRASES)]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: as fast for these small models, and far faster when other jobs share the 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fixture_questions(n: int) -> tuple[str, list[list[str]]]:
    """``(prefix, paraphrases of each of the first n WebQA fixture questions)``."""
    import dataset as ds

    qs = ds.load_paraphrase_dataset("webqa", "x", str(constants.FIXTURE_FILES["webqa"]), str(constants.FIXTURE_WEBQA_TRAIN),
                                    str(constants.FIXTURE_WEBQA_PARAPHRASES), max_samples=n)
    return ds.prompt_prefix("webqa", qs.few_shot), [list(p) for p in qs.questions["paraphrases"]]


@functools.lru_cache(maxsize=None)
def load_cached(name: str, attn_implementation: str | None = None):
    """``(model, tokenizer)`` on CPU in float32, loaded once per test session."""
    import utils

    return utils.load_model_and_tokenizer(name, device="cpu", dtype="float32", attn_implementation=attn_implementation)


@pytest.fixture(scope="session")
def load_model():
    """Fixture: ``load_model(name, attn_implementation=None) -> (model, tokenizer)``."""
    return load_cached
