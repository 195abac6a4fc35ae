"""confidence.py: the agreement score and an end-to-end run on the fixtures (tiny model, offline)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import constants
import dataset as ds
import utils
from confidence import confidence_score, main
from conftest import WEBQA_FIXTURE_ARGS
from generate import stop_token_ids



def test_empty_greedy_answer_has_zero_confidence():
    assert confidence_score("", ["", "", ""]) == 0.0  # not 1.0, even though all samples "agree"
    assert confidence_score("  .  ", ["."]) == 0.0  # no words at all


def test_share_of_samples_with_the_same_lemmas():
    assert confidence_score("Paris", ["Paris", "paris.", "Paris", "Lyon"]) == 0.75
    assert confidence_score("the cities", ["The city", "city", "the city of Paris"]) == pytest.approx(1 / 3)
    assert confidence_score("Paris", ["The city of Paris"]) == 0.0  # equality, not containment
    assert confidence_score("Paris", ["", "Rome"]) == 0.0


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="at least one sampled answer"):
        confidence_score("Paris", [])


def greedy_reference(model, tokenizer, prompt: list[int], stops: torch.Tensor) -> str:
    """Plain Hugging Face greedy decoding of one prompt (no padding), first non-empty line."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=constants.MAX_NEW_TOKENS,
                         eos_token_id=stops.tolist(), pad_token_id=tokenizer.pad_token_id)
    return utils.extract_answer(tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True))


def test_end_to_end_on_fixtures(tmp_path, load_model):
    out = tmp_path / "conf.feather"
    common = ["--dataset", "webqa", "--model", "tiny_llama", "--device", "cpu",
              *WEBQA_FIXTURE_ARGS, "--max-samples", "2",
              "--num-paraphrases", "3", "--num-samples", "4", "--output", str(out)]
    # a tiny temperature makes sampling equal to greedy: the reference is 1.0 (or 0.0 for an empty answer)
    assert main(common + ["--temperature", "0.0001"]) == 0
    df = pd.read_feather(out)
    assert list(df.columns) == ["uuid", "paraphrases", "greedy_answers", "confidences", "model"]
    qs = ds.load_paraphrase_dataset("webqa", "tiny_llama", *WEBQA_FIXTURE_ARGS[1::2], max_samples=2)
    assert df["uuid"].tolist() == qs.questions["uuid"].tolist()
    assert [list(p) for p in df["paraphrases"]] == [list(p[:3]) for p in qs.questions["paraphrases"]]
    assert (df["model"] == "tiny_llama").all()

    model, tokenizer = load_model("tiny_llama")
    stops = stop_token_ids(tokenizer, model.generation_config)
    prefix = ds.prompt_prefix("webqa", qs.few_shot)
    for paraphrases, greedy, conf in zip(df["paraphrases"], df["greedy_answers"], df["confidences"]):
        assert len(greedy) == len(conf) == 3
        for p, g, c in zip(paraphrases, greedy, conf):
            prompt = ds.encode_prompt(tokenizer, ds.prompt_pieces("webqa", qs.few_shot, p))
            assert prompt == ds.encode_prompt(tokenizer, (prefix, f"Q: {p}", "\nA:"))
            assert g == greedy_reference(model, tokenizer, prompt, stops)
            assert c == (1.0 if utils.lemmatize(g) else 0.0)

    # without --overwrite an existing result is refused; with T=1 the values are shares of 4 samples in [0, 1]
    with pytest.raises(FileExistsError):
        main(common + ["--temperature", "1.0"])
    assert main(common + ["--temperature", "1.0", "--overwrite"]) == 0
    df = pd.read_feather(out)
    values = [c for row in df["confidences"] for c in row]
    assert len(values) == 6
    assert all(0.0 <= c <= 1.0 and (c * 4).is_integer() for c in values)
