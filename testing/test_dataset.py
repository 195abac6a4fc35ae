"""Loaders, paraphrase datasets, prompts and prompt encoding, on the hand-written fixtures (offline, fast)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

import constants
import dataset

FIX = constants.FIXTURES_DIR
WEBQA_TEST = FIX / "webqa_test.jsonl"
WEBQA_TRAIN = FIX / "webqa_train.jsonl"
WEBQA_PARA = FIX / "webqa_paraphrases.jsonl"
LAMA = FIX / "myriadlama.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Independent reader (plain json), the reference for the loaders."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the fixture files themselves ---------------------------------------------


def test_fixture_files_follow_hub_schemas():
    train, test = read_jsonl(WEBQA_TRAIN), read_jsonl(WEBQA_TEST)
    assert (len(train), len(test)) == (8, 12)
    for row in train + test:
        assert set(row) == {"url", "question", "answers"}
        assert row["url"].startswith("http://www.freebase.com/view/en/")
        assert row["question"] == row["question"].lower() and row["question"].endswith("?")
        assert isinstance(row["answers"], list) and row["answers"]
    assert sum(len(r["answers"]) >= 2 for r in test) >= 3

    para = read_jsonl(WEBQA_PARA)
    assert {r["question"] for r in para} == {r["question"] for r in train + test}
    for row in para:
        assert len(row["paraphrases"]) == 5
        assert all(p == p.lower() and p.endswith("?") for p in row["paraphrases"])

    lama = read_jsonl(LAMA)
    assert len(lama) == 100
    assert set(lama[0]) == set(constants.DATASET_COLUMNS["myriadlama"])
    per_fact = pd.DataFrame(lama).groupby("uuid")["is_manual"].agg(["sum", "count"])
    assert len(per_fact) == 10
    assert (per_fact["sum"] == 5).all() and (per_fact["count"] == 10).all()
    assert all("[X]" in r["template"] and "[Y]" in r["template"] for r in lama)


# --- WebQA ----------------------------------------------------------------------


def test_webqa_uuid_is_full_sha1_prefix():
    q = "what is the capital of france?"
    assert dataset.webqa_uuid(q) == "webqa-" + hashlib.sha1(q.encode()).hexdigest()[:12]
    assert dataset.webqa_uuid("  " + q + " ") == dataset.webqa_uuid(q)


def test_webqa_questions_from_test_file_and_fewshot_from_train():
    qs = dataset.load_questions("webqa", data_file=str(WEBQA_TEST), fewshot_file=str(WEBQA_TRAIN))
    raw = read_jsonl(WEBQA_TEST)
    assert list(qs.questions.columns) == ["uuid", "question", "answers"]
    assert len(qs.questions) == 12
    assert qs.questions["question"].tolist() == [r["question"] for r in raw]
    # every alias kept, as a full list (not answers[0], not one character)
    assert [list(a) for a in qs.questions["answers"]] == [r["answers"] for r in raw]
    assert list(qs.questions["answers"][1]) == ["Portuguese", "Portuguese Language"]
    # full uuid strings
    expected = ["webqa-" + hashlib.sha1(r["question"].encode()).hexdigest()[:12] for r in raw]
    assert qs.questions["uuid"].tolist() == expected
    # few-shot: 5 (question, first alias) pairs from the train file
    train = {r["question"]: r["answers"][0] for r in read_jsonl(WEBQA_TRAIN)}
    assert len(qs.few_shot) == constants.FEW_SHOT_K
    assert all(train[q] == a for q, a in qs.few_shot)


def test_webqa_without_fewshot_file_leaves_fewshot_rows_out():
    qs = dataset.load_questions("webqa", data_file=str(WEBQA_TEST))
    shot_questions = {q for q, _ in qs.few_shot}
    assert len(qs.questions) == 12 - constants.FEW_SHOT_K
    assert not shot_questions & set(qs.questions["question"])
    assert shot_questions | set(qs.questions["question"]) == {r["question"] for r in read_jsonl(WEBQA_TEST)}


def test_webqa_paraphrase_dataset_prepends_original_question():
    qs = dataset.load_paraphrase_dataset(
        "webqa", "smollm2_135m_it", data_file=str(WEBQA_TEST), fewshot_file=str(WEBQA_TRAIN),
        paraphrase_file=str(WEBQA_PARA), max_samples=4)
    para = {r["question"]: r["paraphrases"] for r in read_jsonl(WEBQA_PARA)}
    assert len(qs.questions) == 4
    for q, paraphrases in zip(qs.questions["question"], qs.questions["paraphrases"]):
        assert paraphrases == [q, *para[q]]
        assert len(paraphrases) == 6


def test_missing_paraphrase_file_names_the_command(tmp_path):
    missing = tmp_path / "none.feather"
    with pytest.raises(FileNotFoundError) as err:
        dataset.load_paraphrase_dataset("webqa", "smollm2_135m_it", data_file=str(WEBQA_TEST),
                                        fewshot_file=str(WEBQA_TRAIN), paraphrase_file=str(missing))
    message = str(err.value)
    assert "python paraphrase.py" in message
    assert "--model smollm2_135m_it" in message and str(missing) in message


def test_paraphrase_file_without_some_questions_is_an_error(tmp_path):
    rows = read_jsonl(WEBQA_PARA)[:-1]  # drop the last test question
    part = write_jsonl(tmp_path / "part.jsonl", rows)
    with pytest.raises(ValueError, match="no paraphrases for 1 questions"):
        dataset.load_paraphrase_dataset("webqa", "m", data_file=str(WEBQA_TEST),
                                        fewshot_file=str(WEBQA_TRAIN), paraphrase_file=str(part))


# --- bad files --------------------------------------------------------------------


def test_missing_columns_are_named(tmp_path):
    rows = [{"url": r["url"], "question": r["question"]} for r in read_jsonl(WEBQA_TEST)]
    path = write_jsonl(tmp_path / "no_answers.jsonl", rows)
    with pytest.raises(ValueError, match=r"missing the columns \['answers'\]"):
        dataset.load_questions("webqa", data_file=str(path))

    lama = [{k: v for k, v in r.items() if k not in ("obj_aliases", "is_manual")} for r in read_jsonl(LAMA)]
    path = write_jsonl(tmp_path / "lama.jsonl", lama)
    with pytest.raises(ValueError) as err:
        dataset.load_questions("myriadlama", data_file=str(path))
    assert "obj_aliases" in str(err.value) and "is_manual" in str(err.value)
    assert "uuid" not in str(err.value).split("Expected")[0]


def test_empty_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty") as err:
        dataset.load_questions("webqa", data_file=str(empty))
    assert str(empty) in str(err.value)

    no_rows = tmp_path / "no_rows.feather"
    pd.DataFrame({"url": [], "question": [], "answers": []}).to_feather(no_rows)
    with pytest.raises(ValueError, match="has no rows"):
        dataset.load_questions("webqa", data_file=str(no_rows))

    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.load_questions("webqa", data_file=str(tmp_path / "absent.jsonl"))


# --- MyriadLAMA ---------------------------------------------------------------------


def test_myriadlama_facts_manual_first_and_placeholders_replaced():
    raw = read_jsonl(LAMA)
    facts = dataset.myriadlama_facts(dataset.load_split("myriadlama", "train", str(LAMA)))
    assert len(facts) == 10
    assert sorted(facts["uuid"]) == sorted({r["uuid"] for r in raw})
    assert all(len(u) == 36 for u in facts["uuid"])  # full uuid4 strings
    for fact in facts.itertuples():
        rows = [r for r in raw if r["uuid"] == fact.uuid]
        subject = rows[0]["sub_ent"]
        manual = [r["template"].replace("[X]", subject).replace("[Y]", "[MASK]") for r in rows if r["is_manual"]]
        auto = [r["template"].replace("[X]", subject).replace("[Y]", "[MASK]") for r in rows if not r["is_manual"]]
        assert fact.paraphrases == manual + auto
        assert fact.question == manual[0]
        assert fact.num_manual == 5
        assert fact.answers == rows[0]["obj_ents"] + rows[0]["obj_aliases"]
        assert not any("[X]" in p or "[Y]" in p for p in fact.paraphrases)
        assert all("[MASK]" in p and subject in p for p in fact.paraphrases)


def test_myriadlama_prompt_literal():
    assert dataset.myriadlama_prompt("[Y] is the capital of [X].", "France") == "[MASK] is the capital of France."


def test_myriadlama_questions_and_fewshot_are_disjoint():
    qs = dataset.load_questions("myriadlama", data_file=str(LAMA))
    assert len(qs.questions) == 5 and len(qs.few_shot) == 5
    assert not {q for q, _ in qs.few_shot} & set(qs.questions["question"])
    # few-shot answers are the gold object names of their facts
    gold = {r["template"].replace("[X]", r["sub_ent"]).replace("[Y]", "[MASK]"): r["obj_ents"][0]
            for r in read_jsonl(LAMA)}
    assert all(gold[q] == a for q, a in qs.few_shot)


def test_seeded_split_is_deterministic():
    facts = dataset.myriadlama_facts(dataset.load_split("myriadlama", "train", str(LAMA)))
    train_a, test_a = dataset.split_facts(facts, seed=42)
    train_b, test_b = dataset.split_facts(facts, seed=42)
    assert test_a["uuid"].tolist() == test_b["uuid"].tolist()
    assert train_a["uuid"].tolist() == train_b["uuid"].tolist()
    assert set(train_a["uuid"]).isdisjoint(test_a["uuid"])
    assert len(train_a) + len(test_a) == 10
    seeds = {tuple(sorted(dataset.split_facts(facts, seed=s)[1]["uuid"])) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    rows = dataset.webqa_questions(dataset.read_table(WEBQA_TRAIN))
    assert dataset.sample_few_shot(rows, 5, 42) == dataset.sample_few_shot(rows, 5, 42)
    with pytest.raises(ValueError, match="Need more than 5 facts"):
        dataset.split_facts(facts.head(5))


# --- prompts -----------------------------------------------------------------------------


def test_prompt_format_is_exact():
    shots = [("what is the capital of spain?", "Madrid"), ("who invented the telephone?", "Alexander Graham Bell")]
    expected = (
        "Answer the question based on general world knowledge. Provide a short and direct answer.\n\n"
        "Q: what is the capital of spain?\nA: Madrid\n\n"
        "Q: who invented the telephone?\nA: Alexander Graham Bell\n\n"
        "Q: what is the capital of france?\nA:"
    )
    assert dataset.build_prompt("webqa", shots, "what is the capital of france?") == expected
    assert "".join(dataset.prompt_pieces("webqa", shots, "what is the capital of france?")) == expected
    prefix, segment, cue = dataset.prompt_pieces("webqa", shots, "what is the capital of france?")
    assert segment == "Q: what is the capital of france?" and cue == "\nA:"

    lama = dataset.build_prompt("myriadlama", [("The capital of France is [MASK].", "Paris")],
                                "Ulm is the birthplace of [MASK].")
    assert lama == ("Predict the [MASK] in the sentence in one word.\n\n"
                    "Q: The capital of France is [MASK].\nA: Paris\n\n"
                    "Q: Ulm is the birthplace of [MASK].\nA:")


def test_encode_prompt_is_bos_plus_pieces():
    import utils

    tokenizer = utils.load_tokenizer("smollm2_135m_it")
    pieces = ("Answer briefly.\n\nQ: a?\nA: b\n\n", "Q: what is the capital of france?", "\nA:")
    ids = dataset.encode_prompt(tokenizer, pieces)
    assert tokenizer.bos_token_id == 1 and ids[0] == 1 and 1 not in ids[1:]  # BOS once, first
    expected = [1]
    for piece in pieces:
        expected += tokenizer(piece, add_special_tokens=False).input_ids
    assert ids == expected
    assert tokenizer.decode(ids[1:]) == "".join(pieces)
    # the answer cue is its own tokens at the end, never merged into the question
    cue = tokenizer("\nA:", add_special_tokens=False).input_ids
    assert ids[-len(cue):] == cue


def test_bos_ids_empty_when_tokenizer_adds_no_bos():
    class NoBos:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            return type("Enc", (), {"input_ids": [ord(c) for c in text]})()

    assert dataset.bos_ids(NoBos()) == []
    assert dataset.encode_prompt(NoBos(), ["ab", "c"]) == [97, 98, 99]


def test_select_paraphrases_and_batched():
    paras = ["p0", "p1", "p2", "p3"]
    assert dataset.select_paraphrases(paras, None, 2) == ["p0", "p1"]
    assert dataset.select_paraphrases(paras, [0, 2], 5) == ["p0", "p2"]
    with pytest.raises(ValueError, match="only 4 paraphrases"):
        dataset.select_paraphrases(paras, [4], 1)
    assert [list(b) for b in dataset.batched(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]
