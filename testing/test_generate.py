"""generate.py: KV-cache decoding against a no-cache reference, method identities, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

import constants
import dataset as ds
import generate
from conftest import ROOT, WEBQA_FIXTURE_ARGS, fixture_questions

FIX = constants.FIXTURES_DIR
TINY = ["tiny_llama", "tiny_qwen2"]
MAX_NEW = 8


def fixture_prompts(tokenizer, n_questions: int = 2, n_paraphrases: int = 3) -> list[list[int]]:
    """Token ids of ``n_paraphrases`` prompts for each of ``n_questions`` fixture questions (lengths differ)."""
    prefix, questions = fixture_questions(n_questions)
    return [ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE))
            for paras in questions for p in paras[:n_paraphrases]]


def reference_decode(model, prompt_ids, group_size, combine, stop_ids, max_new=MAX_NEW):
    """No cache, no padding: every step runs each prompt in full, one question at a time."""
    out = []
    stops = set(stop_ids.tolist())
    for q in range(len(prompt_ids) // group_size):
        streams = [list(p) for p in prompt_ids[q * group_size:(q + 1) * group_size]]
        gen = []
        for _ in range(max_new):
            with torch.no_grad():
                logits = torch.stack([model(torch.tensor([s])).logits[0, -1].float() for s in streams])
            token = int(combine(logits).argmax())
            gen.append(token)
            if token in stops:
                break
            for s in streams:
                s.append(token)
        out.append(gen)
    return out


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["per_prompt", "avg", "max"])
def test_kv_cache_decode_equals_no_cache_reference(load_model, name, method):
    model, tokenizer = load_model(name)
    prompts = fixture_prompts(tokenizer)
    stops = generate.stop_token_ids(tokenizer)
    group = 1 if method == "per_prompt" else 3
    reference_combine = {
        "per_prompt": lambda l: l[0],
        "avg": lambda l: l.sum(0) / l.shape[0],
        "max": lambda l: torch.softmax(l, -1).amax(0),
    }[method]
    got = generate.ensemble_generate(model, tokenizer, prompts, group, method, max_new_tokens=MAX_NEW, stop_ids=stops)
    want = reference_decode(model, prompts, group, reference_combine, stops)
    assert got == want
    assert all(len(g) > 0 for g in got)


@pytest.mark.parametrize("method", ["avg", "max", "weighted_avg", "weighted_max"])
def test_ensemble_of_one_equals_per_prompt(load_model, method):
    model, tokenizer = load_model("tiny_qwen2")
    prompts = fixture_prompts(tokenizer, n_questions=3, n_paraphrases=1)
    weights = torch.ones(len(prompts), 1) if method.startswith("weighted") else None
    single = generate.ensemble_generate(model, tokenizer, prompts, 1, "per_prompt", max_new_tokens=MAX_NEW)
    ensemble = generate.ensemble_generate(model, tokenizer, prompts, 1, method, weights, max_new_tokens=MAX_NEW)
    assert ensemble == single


def test_weighted_avg_equal_weights_equals_avg(load_model):
    model, tokenizer = load_model("tiny_llama")
    prompts = fixture_prompts(tokenizer)
    avg = generate.ensemble_generate(model, tokenizer, prompts, 3, "avg", max_new_tokens=MAX_NEW)
    weighted = generate.ensemble_generate(model, tokenizer, prompts, 3, "weighted_avg", torch.full((2, 3), 0.4),
                                          max_new_tokens=MAX_NEW)
    assert weighted == avg


def test_combine_logits_values():
    logits = torch.tensor([[[1.0, 3.0, 0.0], [3.0, 0.0, 1.0]]])
    assert torch.allclose(generate.combine_logits(logits, "avg"), torch.tensor([[2.0, 1.5, 0.5]]))
    probs = torch.softmax(logits, -1)[0]
    assert torch.allclose(generate.combine_logits(logits, "max"), torch.maximum(probs[0], probs[1])[None])
    w = torch.tensor([[1.0, 3.0]])
    assert torch.allclose(generate.combine_logits(logits, "weighted_avg", w), torch.tensor([[2.5, 0.75, 0.75]]))
    assert torch.equal(generate.combine_logits(logits, "weighted_max", w), logits[:, 1])


@pytest.mark.parametrize("method", ["weighted_avg", "weighted_max"])
def test_all_zero_confidences_raise_clear_error(method):
    logits = torch.randn(2, 3, 5)
    weights = torch.tensor([[0.2, 0.5, 0.1], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="all confidences of a question are 0"):
        generate.combine_logits(logits, method, weights)


def test_each_question_stops_at_its_own_newline(load_model):
    """A question that stops early does not stop the others, and keeps its stop token last."""
    model, tokenizer = load_model("smollm2_135m_it")
    prompts = fixture_prompts(tokenizer, n_questions=3, n_paraphrases=1)
    stops = generate.stop_token_ids(tokenizer)
    got = generate.ensemble_generate(model, tokenizer, prompts, 1, "per_prompt", max_new_tokens=12, stop_ids=stops)
    alone = [generate.ensemble_generate(model, tokenizer, [p], 1, "per_prompt", max_new_tokens=12, stop_ids=stops)[0]
             for p in prompts]
    assert got == alone
    for ids in got:
        assert ids[-1] in stops.tolist()
        assert not set(ids[:-1]) & set(stops.tolist())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_writes_columns_and_refuses_overwrite(tmp_path):
    out = tmp_path / "avg.feather"
    args = ["--dataset", "webqa", "--model", "smollm2_135m_it", "--method", "avg", "--num-ensemble", "3",
            *WEBQA_FIXTURE_ARGS, "--max-samples", "2", "--device", "cpu", "--output", str(out)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    df = pd.read_feather(out)
    assert set(constants.RESULT_COLUMNS) <= set(df.columns)
    assert len(df) == 2 and (df["num_paraphrases"] == 3).all()
    assert all(len(p) == 3 for p in df["prompts"])
    answers = ds.read_table(FIX / "webqa_test.jsonl").set_index("question")["answers"]
    questions = [p[0] for p in df["paraphrases"]]
    assert [list(a) for a in df["answers"]] == [list(answers[q]) for q in questions]  # every alias kept
    assert "Done: 2 rows" in first.stdout
    mtime = out.stat().st_mtime_ns
    second = run_cli(*args)
    assert second.returncode != 0
    assert "--overwrite" in second.stderr
    assert out.stat().st_mtime_ns == mtime


def test_cli_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--num-ensemble" in result.stdout and "--overwrite" in result.stdout
