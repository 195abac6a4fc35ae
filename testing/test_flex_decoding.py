"""flex_attention_generate.py: KV-cache decoding against full recompute, the logit ensemble and plain greedy."""

from __future__ import annotations

import pytest
import torch

from conftest import fixture_questions
import dataset as ds
import flex_attention_generate as fg
import generate

MAX_NEW = 6


@pytest.fixture(scope="module")
def questions():
    return fixture_questions(3)


@pytest.fixture(scope="module")
def stops(load_model):
    return generate.stop_token_ids(load_model("tiny_llama")[1])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("fusion,positions,combine", [
    ("attention", "shared", "avg"), ("attention", "contiguous", "avg"), ("logits", "shared", "max"),
])
def test_kv_cache_decoding_equals_full_recompute(load_model, questions, stops, name, fusion, positions, combine):
    """Batched cached decoding == one question at a time, whole pack recomputed every step (no cache)."""
    model, tokenizer = load_model(name)
    prefix, paras = questions
    batch = [ps[:3] for ps in paras[:2]]
    got = fg.flex_generate(model, tokenizer, prefix, batch, fusion, positions, combine, MAX_NEW, stop_ids=stops,
                           ignore_stops=True)
    for ps, g in zip(batch, got):
        want = fg.recompute_generate(model, tokenizer, prefix, ps, fusion, positions, combine, MAX_NEW,
                                     stop_ids=stops, ignore_stops=True)
        assert g.token_ids == want.token_ids
        assert len(g.token_ids) == MAX_NEW
        assert g.prefill_tokens == len(g.packed)


def test_recompute_with_dense_sdpa_mask_agrees(load_model, questions, stops):
    """The no-cache reference itself: BlockMask/FlexAttention == dense mask/sdpa, token for token."""
    model, tokenizer = load_model("tiny_qwen2")
    prefix, paras = questions
    flex = fg.recompute_generate(model, tokenizer, prefix, paras[2][:4], max_new_tokens=MAX_NEW, stop_ids=stops,
                                 ignore_stops=True)
    dense = fg.recompute_generate(model, tokenizer, prefix, paras[2][:4], max_new_tokens=MAX_NEW, stop_ids=stops,
                                  ignore_stops=True, attn_implementation="sdpa")
    assert flex.token_ids == dense.token_ids


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "smollm2_135m_it"])
@pytest.mark.parametrize("combine", ["avg", "max"])
def test_logits_fusion_equals_generate_ensemble(load_model, questions, stops, name, combine):
    """--fusion logits == generate.py --method avg/max, token for token (stops on)."""
    model, tokenizer = load_model(name)
    prefix, paras = questions
    batch = [ps[:3] for ps in paras[:2]]
    max_new = 8
    got = fg.flex_generate(model, tokenizer, prefix, batch, "logits", "shared", combine, max_new, stop_ids=stops)
    prompts = [ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE)) for ps in batch for p in ps]
    want = generate.ensemble_generate(model, tokenizer, prompts, 3, combine, max_new_tokens=max_new, stop_ids=stops)
    assert [g.token_ids for g in got] == want
    if name == "smollm2_135m_it":  # a real model answers and stops at its newline
        assert any(g.token_ids[-1] in set(stops.tolist()) for g in got)


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2_135m_it"])
def test_one_paraphrase_equals_plain_greedy(load_model, questions, stops, name):
    """--fusion attention with N=1 is plain greedy decoding of that prompt (HF generate as the reference)."""
    model, tokenizer = load_model(name)
    prefix, paras = questions
    batch = [[ps[0]] for ps in paras[:2]]
    got = fg.flex_generate(model, tokenizer, prefix, batch, "attention", "shared", max_new_tokens=MAX_NEW,
                           stop_ids=stops)
    for (p,), g in zip(batch, got):
        ids = ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE))
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=stops.tolist(),
                                 pad_token_id=tokenizer.pad_token_id)
        assert g.token_ids == out[0, len(ids):].tolist()


def test_each_question_stops_on_its_own(load_model, questions):
    """A stop in one question does not end the batch; the other keeps decoding."""
    model, tokenizer = load_model("tiny_llama")
    prefix, paras = questions
    batch = [ps[:2] for ps in paras[:2]]
    free = fg.flex_generate(model, tokenizer, prefix, batch, max_new_tokens=MAX_NEW, ignore_stops=True,
                            stop_ids=torch.tensor([tokenizer.eos_token_id]))
    # make question 0's third token a stop token
    stop = torch.tensor([free[0].token_ids[2]])
    assert stop.item() not in free[1].token_ids[:-1] or free[1].token_ids.index(stop.item()) > 2
    got = fg.flex_generate(model, tokenizer, prefix, batch, max_new_tokens=MAX_NEW, stop_ids=stop)
    assert got[0].token_ids == free[0].token_ids[:3]
    cut = free[1].token_ids.index(stop.item()) + 1 if stop.item() in free[1].token_ids else MAX_NEW
    assert got[1].token_ids == free[1].token_ids[:cut]
