"""flex_attention_generate.py: token-exact packing, positions, the mask and its BlockMask (no model forward)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixture_questions
import dataset as ds
import flex_attention_generate as fg



@pytest.fixture(scope="module")
def tokenizer(load_model):
    return load_model("tiny_llama")[1]


@pytest.fixture(scope="module")
def questions():
    return fixture_questions(2)


def standalone_ids(tokenizer, prefix, paraphrase):
    return ds.encode_prompt(tokenizer, (prefix, ds.question_segment(paraphrase), ds.ANSWER_CUE))


def test_attention_pack_is_token_exact(tokenizer, questions):
    prefix, paras = questions
    ps = paras[0][:4]
    pack = fg.pack_prompt(tokenizer, prefix, ps, "attention", "shared")
    head = ds.bos_ids(tokenizer) + ds.encode_piece(tokenizer, prefix)
    want = head + [t for p in ps for t in ds.encode_piece(tokenizer, ds.question_segment(p))] \
        + ds.encode_piece(tokenizer, ds.ANSWER_CUE)
    assert pack.input_ids.tolist() == want
    assert [s.name for s in pack.spans] == ["prefix", "paraphrase 0", "paraphrase 1", "paraphrase 2", "paraphrase 3", "cue"]
    # spans tile the pack, and each span holds exactly its piece
    assert [s.start for s in pack.spans[1:]] == [s.end for s in pack.spans[:-1]]
    assert pack.spans[-1].end == len(pack)
    assert pack.input_ids[: len(head)].tolist() == head
    for i, p in enumerate(ps):
        s = pack.spans[i + 1]
        assert pack.input_ids[s.start:s.end].tolist() == ds.encode_piece(tokenizer, ds.question_segment(p))
        assert set(pack.segment_ids[s.start:s.end].tolist()) == {i + 1}
    # shared positions: each paraphrase starts after the prefix, the cue after the longest paraphrase
    lengths = [len(s) for s in pack.spans[1:-1]]
    for s in pack.spans[1:-1]:
        assert pack.position_ids[s.start:s.end].tolist() == list(range(len(head), len(head) + len(s)))
    cue = pack.spans[-1]
    first_cue = len(head) + max(lengths)
    assert pack.position_ids[cue.start:cue.end].tolist() == list(range(first_cue, first_cue + len(cue)))
    assert pack.next_positions == (first_cue + len(cue),)
    assert pack.read_index == (len(pack) - 1,)


def test_logits_pack_streams_equal_standalone_prompts(tokenizer, questions):
    prefix, paras = questions
    ps = paras[1][:3]
    pack = fg.pack_prompt(tokenizer, prefix, ps, "logits", "shared")
    head = len(ds.bos_ids(tokenizer) + ds.encode_piece(tokenizer, prefix))
    for i, p in enumerate(ps):
        idx = [j for j in range(len(pack)) if j < head or int(pack.segment_ids[j]) == i + 1]
        assert pack.input_ids[idx].tolist() == standalone_ids(tokenizer, prefix, p)
        assert pack.position_ids[idx].tolist() == list(range(len(idx)))
        assert pack.read_index[i] == idx[-1]
        assert pack.next_positions[i] == len(idx)
    assert pack.stream_segments == (1, 2, 3)


def test_contiguous_positions_and_str(tokenizer, questions):
    prefix, paras = questions
    pack = fg.pack_prompt(tokenizer, prefix, paras[0][:3], "attention", "contiguous")
    assert pack.position_ids.tolist() == list(range(len(pack)))
    assert pack.next_positions == (len(pack),)
    text = pack.describe(tokenizer, tokens=True)
    assert "paraphrase 2" in text and "cue" in text and str(len(pack)) in text
    assert str(pack).startswith("PackedPrompt: fusion=attention, positions=contiguous")


def expected_mask(packs, max_new_tokens):
    """Hand-built [B, T, T] reference from the spans (independent of segment ids and visibility)."""
    length = max(len(p) for p in packs)
    k = packs[0].num_streams
    total = length + (max_new_tokens - 1) * k
    out = np.zeros((len(packs), total, total), dtype=bool)
    for b, pack in enumerate(packs):
        group = ["pad"] * total  # which group each cache index is in
        for s in pack.spans:
            name = s.name if pack.fusion == "attention" else (
                "prefix" if s.kind == "prefix" else f"stream {s.name.split()[-1]}")
            group[s.start:s.end] = [name] * len(s)
        for j in range(length, total):
            group[j] = "cue" if pack.fusion == "attention" else f"stream {(j - length) % k}"
        for q in range(total):
            for kv in range(q + 1):
                gq, gk = group[q], group[kv]
                if gq == "pad" or gk == "pad":
                    out[b, q, kv] = gq == gk == "pad"
                elif gq == "cue":
                    out[b, q, kv] = True
                else:
                    out[b, q, kv] = gk == "prefix" or gk == gq
    return out


@pytest.mark.parametrize("fusion", fg.FUSIONS)
def test_dense_mask_matches_hand_built_reference(tokenizer, questions, fusion):
    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:3], fusion, "shared") for ps in paras]
    assert len(packs[0]) != len(packs[1])  # the shorter pack is padded
    max_new = 4
    tables = fg.build_tables(packs, tokenizer.pad_token_id, max_new, "cpu")
    total = tables.position_ids.shape[1]
    mask = fg.dense_mask(tables.mask_mod(), len(packs), total, total, "cpu")[:, 0].numpy()
    want = expected_mask(packs, max_new)
    assert mask.shape == want.shape
    assert (mask == want).all(), f"{(mask != want).sum()} entries differ"
    assert mask.any(axis=-1).all()  # no empty row
    assert not np.triu(mask, 1).any()  # causal on the pack order


@pytest.mark.parametrize("fusion", fg.FUSIONS)
def test_decode_step_mask_is_a_slice_of_the_full_mask(tokenizer, questions, fusion):
    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:3], fusion, "shared") for ps in paras]
    tables = fg.build_tables(packs, tokenizer.pad_token_id, 5, "cpu")
    mm, k, n = tables.mask_mod(), tables.k, tables.length
    total = tables.position_ids.shape[1]
    full = fg.dense_mask(mm, 2, total, total, "cpu")
    for kv in (n, n + k, n + 3 * k):
        step = fg.dense_mask(mm, 2, k, kv + k, "cpu", offset=kv)
        assert torch.equal(step, full[:, :, kv:kv + k, :kv + k])


def test_generated_positions_continue_each_segment(tokenizer, questions):
    prefix, paras = questions
    for fusion in fg.FUSIONS:
        pack = fg.pack_prompt(tokenizer, prefix, paras[0][:3], fusion, "shared")
        tables = fg.build_tables([pack], tokenizer.pad_token_id, 4, "cpu")
        gen = tables.position_ids[0, len(pack):].view(3, pack.num_streams)
        want = torch.tensor(pack.next_positions)[None] + torch.arange(3)[:, None]
        assert torch.equal(gen, want)
        assert tables.segment_ids.shape[1] % fg.BLOCK == 0


@pytest.mark.parametrize("q_len,kv_len,offset", [(200, 200, 0), (130, 300, 0), (1, 301, 300), (3, 260, 257)])
def test_block_mask_blocks_agree_with_dense_mask(tokenizer, questions, q_len, kv_len, offset):
    """The sparse block structure (what the CUDA kernel skips) covers every allowed entry;
    'full' blocks are entirely allowed."""
    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:5], "attention", "shared") for ps in paras]
    tables = fg.build_tables(packs, tokenizer.pad_token_id, 200, "cpu")
    mm = tables.mask_mod()
    bm = fg.build_block_mask(mm, 2, q_len, kv_len, "cpu", offset=offset)
    kb = bm.BLOCK_SIZE[1]
    qb = q_len if q_len < 128 else 128  # torch 2.5.1 uses one q block for short queries (not stored in BLOCK_SIZE)
    q_pad, kv_pad = -(-q_len // qb) * qb, -(-kv_len // kb) * kb
    dense = fg.dense_mask(mm, 2, q_pad, kv_pad, "cpu", offset=offset)[:, 0]
    blocks = dense.view(2, q_pad // qb, qb, kv_pad // kb, kb)
    any_true = blocks.any(dim=(2, 4))
    all_true = blocks.all(dim=(2, 4))
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_true)
    from torch.nn.attention.flex_attention import _ordered_to_dense

    full = _ordered_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices)[:, 0].bool()
    assert torch.equal(full, all_true)  # 'full' blocks (no mask_mod call on CUDA) are exactly the all-True ones


def test_flex_attention_equals_masked_sdpa_on_random_tensors(tokenizer, questions):
    """FlexAttention with the BlockMask == softmax attention with the dense mask (GQA, 3 query heads per KV head)."""
    from torch.nn.attention.flex_attention import flex_attention

    prefix, paras = questions
    packs = [fg.pack_prompt(tokenizer, prefix, ps[:4], "attention", "shared") for ps in paras]
    tables = fg.build_tables(packs, tokenizer.pad_token_id, 1, "cpu")
    n = tables.length
    assert n % 128
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 16, generator=gen) for h in (6, 2, 2))
    mm = tables.mask_mod()
    got = flex_attention(q, k, v, block_mask=fg.build_block_mask(mm, 2, n, n, "cpu"), enable_gqa=True)
    mask = fg.dense_mask(mm, 2, n, n, "cpu")
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) / 4.0
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(3, 1)
    assert (got - want).abs().max() < 1e-5


def test_mask_mod_needs_padded_lookup():
    with pytest.raises(ValueError, match="multiple of 128"):
        fg.make_mask_mod(torch.zeros(1, 100, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool))
