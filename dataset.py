"""WebQA and MyriadLAMA readers, paraphrase datasets, few-shot examples and prompts.

Every loader returns a DataFrame with one row per question and the columns
``uuid, question, answers, paraphrases`` (``paraphrases[0]`` is the original
question for WebQA and the first manual template for MyriadLAMA).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

import constants

ANSWER_CUE = "\nA:"


# --- reading files and the hub ---------------------------------------------


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet, jsonl/json or feather file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    if suffix == ".feather":
        return pd.read_feather(path)
    raise ValueError(f"Unknown file type {suffix!r} for {path}. Use .parquet, .jsonl or .feather.")


def validate_columns(df: pd.DataFrame, columns: Sequence[str], source: str) -> pd.DataFrame:
    """Raise when ``df`` lacks a column or has no rows; the message names them."""
    if df.empty and len(df.columns) == 0:
        raise ValueError(f"{source} is empty (no rows, no columns). Expected the hub schema: {list(columns)}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{source} is missing the columns {missing}. Expected the hub schema: {list(columns)}.")
    if df.empty:
        raise ValueError(f"{source} has no rows.")
    return df


def load_split(dataset: str, split: str, data_file: str | None = None, cache_dir: str | None = None) -> pd.DataFrame:
    """One split in the hub schema, from ``data_file`` or from the hub (cached)."""
    columns = constants.DATASET_COLUMNS[dataset]
    if data_file:
        return validate_columns(read_table(data_file), columns, str(data_file))
    import datasets

    paths = constants.configure_cache(cache_dir)
    hub_id = constants.DATASETS[dataset]
    try:
        df = datasets.load_dataset(hub_id, split=split, cache_dir=str(paths.hf_datasets)).to_pandas()
    except (ConnectionError, OSError, ValueError) as err:
        raise RuntimeError(
            f"Cannot load {hub_id} ({split}) from the hub or the cache {paths.hf_datasets}: {err}. "
            f"Offline, pass a local file with --data-file (for example {constants.FIXTURE_FILES[dataset]})."
        ) from err
    return validate_columns(df, columns, f"{hub_id} ({split})")


# --- questions ---------------------------------------------------------------


def webqa_uuid(question: str) -> str:
    """Stable id of a WebQA question (the hub rows have none)."""
    return "webqa-" + hashlib.sha1(question.strip().encode()).hexdigest()[:12]


def webqa_questions(df: pd.DataFrame) -> pd.DataFrame:
    """Hub rows -> ``uuid, question, answers``."""
    return pd.DataFrame({
        "uuid": [webqa_uuid(q) for q in df["question"]],
        "question": df["question"].str.strip().tolist(),
        "answers": [list(a) for a in df["answers"]],
    })


def myriadlama_prompt(template: str, subject: str) -> str:
    """Template -> sentence: ``[X]`` becomes the subject and ``[Y]`` becomes ``[MASK]``."""
    return template.replace("[X]", subject).replace("[Y]", "[MASK]").strip()


def myriadlama_facts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per fact (uuid): manual prompts first, then automatic ones; all gold names."""
    facts = []
    for uuid, group in df.groupby("uuid", sort=True):
        group = group.sort_values("is_manual", ascending=False, kind="stable")
        first = group.iloc[0]
        prompts = list(dict.fromkeys(myriadlama_prompt(t, first["sub_ent"]) for t in group["template"]))
        answers = list(dict.fromkeys([*first["obj_ents"], *first["obj_aliases"]]))
        facts.append({
            "uuid": str(uuid), "question": prompts[0], "answers": answers, "paraphrases": prompts,
            "num_manual": int(group["is_manual"].sum()), "rel_uri": first["rel_uri"],
        })
    return pd.DataFrame(facts)


def split_facts(facts: pd.DataFrame, seed: int = constants.SEED, k: int = constants.FEW_SHOT_K,
                n_test: int = constants.MYRIADLAMA_TEST_FACTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded ``(train, test)`` split of facts. Small files keep ``k`` facts for few-shot."""
    n_test = min(n_test, len(facts) - k)
    if n_test < 1:
        raise ValueError(f"Need more than {k} facts for a few-shot split, got {len(facts)}.")
    test_ids = set(random.Random(seed).sample(sorted(facts["uuid"]), n_test))
    is_test = facts["uuid"].isin(test_ids)
    return facts[~is_test].reset_index(drop=True), facts[is_test].reset_index(drop=True)


def sample_few_shot(rows: pd.DataFrame, k: int = constants.FEW_SHOT_K, seed: int = constants.SEED) -> list[tuple[str, str]]:
    """``k`` seeded ``(question, first answer)`` pairs from rows with ``question`` and ``answers``."""
    if len(rows) < k:
        raise ValueError(f"Need {k} few-shot examples, but only {len(rows)} rows are available.")
    picked = rows.iloc[sorted(random.Random(seed).sample(range(len(rows)), k))]
    return [(q, list(a)[0]) for q, a in zip(picked["question"], picked["answers"])]


@dataclass
class QuestionSet:
    """Questions to answer and the few-shot examples for their prompts."""

    dataset: str
    questions: pd.DataFrame
    few_shot: list[tuple[str, str]]


def load_questions(dataset: str, data_file: str | None = None, fewshot_file: str | None = None,
                   cache_dir: str | None = None, seed: int = constants.SEED, k: int = constants.FEW_SHOT_K) -> QuestionSet:
    """Evaluation questions and few-shot examples.

    WebQA: questions from ``test``, few-shot from ``train`` (``--fewshot-file``). With only
    ``--data-file``, ``k`` seeded rows of that file become the few-shot examples and
    are left out of the questions. MyriadLAMA: seeded fact split of one file or the hub.
    """
    if dataset == "myriadlama":
        train, test = split_facts(myriadlama_facts(load_split(dataset, "train", data_file, cache_dir)), seed, k)
        return QuestionSet(dataset, test, sample_few_shot(train, k, seed))
    questions = webqa_questions(load_split(dataset, "test", data_file, cache_dir))
    if data_file and not fewshot_file:
        few_shot = sample_few_shot(questions, k, seed)
        questions = questions[~questions["question"].isin([q for q, _ in few_shot])].reset_index(drop=True)
        print(f"Few-shot: {k} rows of {data_file} (left out of the questions). Use --fewshot-file to take them from a train file.")
        return QuestionSet(dataset, questions, few_shot)
    train = webqa_questions(load_split(dataset, "train", fewshot_file, cache_dir))
    return QuestionSet(dataset, questions, sample_few_shot(train, k, seed))


# --- paraphrase datasets -----------------------------------------------------


def paraphrase_path(model: str, cache_dir: str | None = None) -> Path:
    """Default feather file of the WebQA paraphrases made by ``model``."""
    safe_model = model.strip("/").replace("/", "__")
    return constants.cache_paths(cache_dir).paraphrases / "webqa" / f"{safe_model}.feather"


def paraphrase_command(model: str, data_file: str | None, output: Path | str) -> str:
    """The paraphrase.py command that creates a missing paraphrase file."""
    data = f" --data-file {data_file}" if data_file else ""
    return f"python paraphrase.py --dataset webqa --model {model}{data} --output {output}"


def attach_webqa_paraphrases(questions: pd.DataFrame, paraphrase_file: str | os.PathLike, command: str) -> pd.DataFrame:
    """Add ``paraphrases = [question, *generated]`` from a file with ``uuid, paraphrases``."""
    if not Path(paraphrase_file).is_file():
        raise FileNotFoundError(f"The WebQA paraphrase file {paraphrase_file} does not exist. Create it with:\n  {command}")
    table = validate_columns(read_table(paraphrase_file), ("uuid", "paraphrases"), str(paraphrase_file))
    generated = dict(zip(table["uuid"], table["paraphrases"]))
    missing = [u for u in questions["uuid"] if u not in generated]
    if missing:
        raise ValueError(f"{paraphrase_file} has no paraphrases for {len(missing)} questions (first: {missing[0]}). "
                         f"Create them with:\n  {command}")
    out = questions.copy()
    out["paraphrases"] = [[q, *list(generated[u])] for q, u in zip(out["question"], out["uuid"])]
    return out


def load_paraphrase_dataset(dataset: str, model: str, data_file: str | None = None, fewshot_file: str | None = None,
                            paraphrase_file: str | None = None, cache_dir: str | None = None,
                            max_samples: int | None = None, seed: int = constants.SEED) -> QuestionSet:
    """Questions with their paraphrases (``paraphrases`` column) and few-shot examples."""
    qs = load_questions(dataset, data_file, fewshot_file, cache_dir, seed)
    if max_samples is not None:
        qs.questions = qs.questions.head(max_samples).reset_index(drop=True)
    if dataset == "webqa":
        path = paraphrase_file or paraphrase_path(model, cache_dir)
        qs.questions = attach_webqa_paraphrases(qs.questions, path, paraphrase_command(model, data_file, path))
    return qs


def select_paraphrases(paraphrases: Sequence[str], indexs: Sequence[int] | None, n: int) -> list[str]:
    """Paraphrases at ``indexs`` (default: the first ``n``); errors when a row has too few."""
    indexs = list(indexs) if indexs else list(range(n))
    if max(indexs) >= len(paraphrases):
        raise ValueError(f"Paraphrase index {max(indexs)} asked, but a question has only {len(paraphrases)} paraphrases.")
    return [paraphrases[i] for i in indexs]


# --- prompts -----------------------------------------------------------------


def few_shot_block(few_shot: Sequence[tuple[str, str]]) -> str:
    return "\n\n".join(f"Q: {q}\nA: {a}" for q, a in few_shot)


def prompt_prefix(dataset: str, few_shot: Sequence[tuple[str, str]]) -> str:
    """Shared prefix of every prompt: instruction and few-shot examples."""
    return f"{constants.INSTRUCTIONS[dataset]}\n\n{few_shot_block(few_shot)}\n\n"


def question_segment(question: str) -> str:
    return f"Q: {question}"


def prompt_pieces(dataset: str, few_shot: Sequence[tuple[str, str]], question: str) -> tuple[str, str, str]:
    """``(prefix, question segment, answer cue)``; joined they are the prompt text."""
    return prompt_prefix(dataset, few_shot), question_segment(question), ANSWER_CUE


def build_prompt(dataset: str, few_shot: Sequence[tuple[str, str]], question: str) -> str:
    """``{instruction}\\n\\n{few_shot}\\n\\nQ: {question}\\nA:``."""
    return "".join(prompt_pieces(dataset, few_shot, question))


PARAPHRASE_INSTRUCTION = "Paraphrase the question. Keep its meaning."
# Hand-written examples (not fixture questions) for paraphrase.py.
PARAPHRASE_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("who founded microsoft?", "who was the founder of microsoft?"),
    ("when did world war 2 end?", "in what year did the second world war end?"),
    ("where is the eiffel tower?", "in which city can you find the eiffel tower?"),
)


def paraphrase_prompt(question: str) -> str:
    """Few-shot prompt for paraphrase.py: instruction, example pairs, ``Question: {q}\\nParaphrase:``."""
    examples = "\n\n".join(f"Question: {q}\nParaphrase: {p}" for q, p in PARAPHRASE_EXAMPLES)
    return f"{PARAPHRASE_INSTRUCTION}\n\n{examples}\n\nQuestion: {question.strip()}\nParaphrase:"


def bos_ids(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token itself, else ``[]``."""
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids and ids[0] == bos else []


def encode_piece(tokenizer, text: str) -> list[int]:
    """Token ids of one piece, without special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_prompt(tokenizer, pieces: Sequence[str]) -> list[int]:
    """BOS (once, if used) + each piece encoded on its own. Every method tokenizes prompts this way."""
    return bos_ids(tokenizer) + [t for piece in pieces for t in encode_piece(tokenizer, piece)]


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive chunks of ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
