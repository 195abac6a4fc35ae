"""flex_attention_generate.py: packed prefill against standalone forwards and the dense-mask sdpa path."""

from __future__ import annotations

import pytest
import torch

from conftest import fixture_questions
import dataset as ds
import flex_attention_generate as fg

MODELS = ["tiny_llama", "tiny_qwen2", "smollm2_135m_it"]
TOL = 1e-4


@pytest.fixture(scope="module")
def questions():
    return fixture_questions(2)


def standalone_logits(model, ids) -> torch.Tensor:
    """Plain forward of one prompt with the model's own causal attention (no custom mask)."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("name", MODELS)
def test_paraphrases_are_isolated_in_the_packed_prefill(load_model, questions, name):
    """Every token of paraphrase i in the pack == a standalone forward of prefix + paraphrase i."""
    model, tokenizer = load_model(name)
    prefix, paras = questions
    ps = paras[0][:4]
    pack = fg.pack_prompt(tokenizer, prefix, ps, "attention", "shared")
    assert len(pack) % 128 and len(pack) > 128
    logits = fg.packed_logits(model, tokenizer, [pack])[0]
    head = ds.bos_ids(tokenizer) + ds.encode_piece(tokenizer, prefix)
    for i, p in enumerate(ps):
        span = pack.spans[i + 1]
        ref = standalone_logits(model, head + ds.encode_piece(tokenizer, ds.question_segment(p)))
        diff = (logits[span.start:span.end] - ref[len(head):]).abs().max().item()
        assert diff <= TOL, f"{name} paraphrase {i}: max abs diff {diff}"
        assert (logits[span.end - 1] - ref[-1]).abs().max().item() <= TOL
    assert (logits[: len(head)] - standalone_logits(model, head)).abs().max().item() <= TOL
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2_135m_it"])
def test_logits_streams_equal_their_standalone_prompts(load_model, questions, name):
    model, tokenizer = load_model(name)
    prefix, paras = questions
    ps = paras[1][:3]
    pack = fg.pack_prompt(tokenizer, prefix, ps, "logits", "shared")
    logits = fg.packed_logits(model, tokenizer, [pack])[0]
    for i, p in enumerate(ps):
        ref = standalone_logits(model, ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE)))
        assert (logits[pack.read_index[i]] - ref[-1]).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["tiny_qwen2", "smollm2_135m_it"])
@pytest.mark.parametrize("fusion,positions", [("attention", "shared"), ("attention", "contiguous"), ("logits", "shared")])
def test_block_mask_path_equals_dense_sdpa_path(load_model, questions, name, fusion, positions):
    """Same model, same mask_mod: FlexAttention + BlockMask vs sdpa + dense bool mask from create_mask.
    A batch of two packs of different lengths (padding included); all real tokens compared."""
    model, tokenizer = load_model(name)
    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:3], fusion, positions) for ps in paras]
    flex = fg.packed_logits(model, tokenizer, packs)
    dense = fg.packed_logits(model, tokenizer, packs, attn_implementation="sdpa")
    for b, pack in enumerate(packs):
        diff = (flex[b, : len(pack)] - dense[b, : len(pack)]).abs().max().item()
        assert diff <= TOL, f"{name} {fusion}/{positions} question {b}: {diff}"


def test_dense_eager_path_uses_an_additive_mask(load_model, questions):
    """The eager reference needs a float mask (a bool one would be added as 0/1)."""
    model, tokenizer = load_model("tiny_llama")
    prefix, paras = questions
    pack = fg.pack_prompt(tokenizer, prefix, paras[0][:3], "attention", "shared")
    flex = fg.packed_logits(model, tokenizer, [pack])
    eager = fg.packed_logits(model, tokenizer, [pack], attn_implementation="eager")
    assert (flex - eager).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2_135m_it"])
def test_compiled_path_padding_is_exact(load_model, questions, name, monkeypatch):
    """The CUDA path pads q/k/v to 128-multiples and repeats K/V when the GQA group is not a power of 2
    (SmolLM2: 3). Checked here with eager flex_attention standing in for the compiled one."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(fg, "_compiled_flex_attention", lambda: flex_attention)
    model, tokenizer = load_model(name)
    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:3], "attention", "shared") for ps in paras]
    exact = fg.packed_logits(model, tokenizer, packs)
    padded = fg.packed_logits(model, tokenizer, packs, attn_implementation=fg.ATTN_NAME_COMPILED,
                              pad_to_blocks=True)
    for b, pack in enumerate(packs):
        assert (exact[b, : len(pack)] - padded[b, : len(pack)]).abs().max().item() <= TOL


def test_attention_function_refuses_other_masks(load_model):
    """No silent causal fallback: without a BlockMask the registered attention raises."""
    model, tokenizer = load_model("tiny_llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with fg.flex_attention_enabled(model), torch.inference_mode():
        with pytest.raises(TypeError, match="not a BlockMask"):
            model(ids)
        with pytest.raises(TypeError, match="not a BlockMask"):
            model(ids, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert model.config._attn_implementation == "sdpa"


def test_compile_on_cpu_is_refused(load_model):
    model, _ = load_model("tiny_llama")
    with pytest.raises(ValueError, match="needs CUDA"):
        with fg.flex_attention_enabled(model, compile=True):
            pass
