"""paraphrase.py: prompt text, problem counts and a seeded end-to-end run (tiny model, offline)."""

from __future__ import annotations

import pandas as pd
import pytest

import constants
import dataset as ds
from paraphrase import count_problems, main

FIX = constants.FIXTURES_DIR


def test_paraphrase_prompt_literal():
    expected = (
        "Paraphrase the question. Keep its meaning.\n\n"
        "Question: who founded microsoft?\nParaphrase: who was the founder of microsoft?\n\n"
        "Question: when did world war 2 end?\nParaphrase: in what year did the second world war end?\n\n"
        "Question: where is the eiffel tower?\nParaphrase: in which city can you find the eiffel tower?\n\n"
        "Question: what is the capital of france?\nParaphrase:"
    )
    assert ds.paraphrase_prompt("what is the capital of france? ") == expected


def test_count_problems():
    q = "what is the capital of france?"
    assert count_problems(q, ["which city is the capital of france?", "", "What is the capital of France?",
                              "which city is the capital of france?", " "]) == (2, 2)
    assert count_problems(q, ["a?", "b?"]) == (0, 0)


def test_myriadlama_is_refused():
    with pytest.raises(SystemExit, match="MyriadLAMA already has paraphrases"):
        main(["--dataset", "myriadlama", "--model", "tiny_llama"])


def test_end_to_end_is_seeded(tmp_path):
    args = ["--dataset", "webqa", "--model", "tiny_llama", "--device", "cpu",
            "--data-file", str(FIX / "webqa_test.jsonl"), "--fewshot-file", str(FIX / "webqa_train.jsonl"),
            "--max-samples", "2", "--num-paraphrases", "2"]
    a, b = tmp_path / "a.feather", tmp_path / "b.feather"
    assert main(args + ["--output", str(a)]) == 0
    assert main(args + ["--output", str(b)]) == 0
    df = pd.read_feather(a)
    assert list(df.columns) == ["uuid", "question", "paraphrases", "model"]
    questions = ds.load_questions("webqa", str(FIX / "webqa_test.jsonl"), str(FIX / "webqa_train.jsonl")).questions
    assert df["uuid"].tolist() == questions["uuid"].head(2).tolist()
    assert df["question"].tolist() == questions["question"].head(2).tolist()
    assert all(len(p) == 2 and all("\n" not in x for x in p) for p in df["paraphrases"])
    # same seed -> same paraphrases; round r uses seed + r -> the two rounds differ
    assert [list(p) for p in df["paraphrases"]] == [list(p) for p in pd.read_feather(b)["paraphrases"]]
    assert all(p[0] != p[1] for p in df["paraphrases"])
    with pytest.raises(FileExistsError):
        main(args + ["--output", str(a)])
