"""flex_attention_generate.py: breakpoint events and the CLI."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch

import constants
import flex_attention_generate as fg
from conftest import ROOT, WEBQA_FIXTURE_ARGS, fixture_questions

KEYS = {
    "tokenized": {"index", "question", "packed", "tokenizer"},
    "before_attention": {"block_mask", "mask_mod", "visibility", "attn_implementation", "dense_mask", "packed",
                         "input_ids", "position_ids", "segment_ids", "model", "tokenizer"},
    "decode_step": {"index", "step", "logits", "scores", "topk_ids", "topk_probs", "token_id", "token_text"},
    "after_step": {"index", "step", "generated", "text", "new_position_ids", "new_segment_ids", "kv_len",
                   "finished", "block_mask", "mask_offset"},
    "final": {"index", "result", "generation", "prediction", "token_ids", "timings"},
}


@pytest.fixture(scope="module")
def questions():
    return fixture_questions(2)


@pytest.mark.parametrize("fusion", fg.FUSIONS)
def test_events_fire_in_order_with_documented_state(load_model, questions, fusion):
    model, tokenizer = load_model("tiny_llama")
    prefix, paras = questions
    batch = [ps[:3] for ps in paras]
    events = []
    results = fg.flex_generate(model, tokenizer, prefix, batch, fusion, max_new_tokens=3, ignore_stops=True,
                               on_event=lambda name, **state: events.append((name, state)))
    names = [n for n, _ in events]
    k = 1 if fusion == "attention" else 3
    step_events = [n for s in range(3) for n in ["decode_step"] * 2 + ["after_step"] * 2]
    assert names == ["tokenized"] * 2 + ["before_attention"] + step_events + ["final"] * 2
    for name, state in events:
        assert set(state) == KEYS[name], name

    before = events[2][1]
    assert before["attn_implementation"] == fg.ATTN_NAME
    length = before["input_ids"].shape[1]
    dense = before["dense_mask"]()
    assert dense.shape == (2, 1, length, length) and dense.dtype == torch.bool
    pack = events[0][1]["packed"]
    assert isinstance(pack, fg.PackedPrompt) and pack is before["packed"][0]
    assert torch.equal(before["segment_ids"][0, : len(pack)], pack.segment_ids)

    vocab = model.config.vocab_size
    for name, s in events:
        if name == "decode_step":
            assert s["logits"].shape == (k, vocab)
            assert s["token_id"] == int(s["scores"].argmax()) == int(s["topk_ids"][0])
            assert s["token_text"] == tokenizer.decode([s["token_id"]])
            assert torch.all(s["topk_probs"][:-1] >= s["topk_probs"][1:])
        if name == "after_step":
            r = results[s["index"]]
            assert s["generated"] == r.token_ids[: s["step"] + 1]
            if s["step"] < 2:  # a forward over the new tokens happened
                assert s["kv_len"] == length + (s["step"] + 1) * k
                assert s["mask_offset"] == length + s["step"] * k
                assert torch.equal(s["new_position_ids"], torch.tensor(r.packed.next_positions) + s["step"])
                assert s["new_segment_ids"].tolist() == list(r.packed.stream_segments)
                assert s["block_mask"] is not None
            else:  # the last token needs no forward
                assert s["block_mask"] is None and s["kv_len"] == length + 2 * k
    finals = [s for n, s in events if n == "final"]
    assert [f["token_ids"] for f in finals] == [r.token_ids for r in results]
    assert finals[0]["timings"]["steps"] == 3


def test_no_callback_means_no_extra_work(load_model, questions, monkeypatch):
    """Without on_event no dense mask and no top-k are computed."""
    model, tokenizer = load_model("tiny_llama")
    prefix, paras = questions

    def forbidden(*args, **kwargs):
        raise AssertionError("computed without a callback")

    monkeypatch.setattr(fg, "dense_mask", forbidden)
    monkeypatch.setattr(torch.Tensor, "topk", forbidden)
    out = fg.flex_generate(model, tokenizer, prefix, [paras[0][:2]], max_new_tokens=2, ignore_stops=True)
    assert len(out[0].token_ids) == 2


def test_stopped_questions_get_no_more_step_events(load_model, questions):
    model, tokenizer = load_model("tiny_llama")
    prefix, paras = questions
    batch = [ps[:2] for ps in paras]
    free = fg.flex_generate(model, tokenizer, prefix, batch, max_new_tokens=4, ignore_stops=True)
    stop = torch.tensor([free[0].token_ids[0]])  # question 0 stops at once
    events = []
    fg.flex_generate(model, tokenizer, prefix, batch, max_new_tokens=4, stop_ids=stop,
                     on_event=lambda name, **s: events.append((name, s.get("index"), s.get("step"))))
    q0 = [(n, step) for n, i, step in events if i == 0 and n in ("decode_step", "after_step")]
    assert q0 == [("decode_step", 0), ("after_step", 0)]


def test_cli_help():
    out = subprocess.run([sys.executable, "flex_attention_generate.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--fusion", "--positions", "--combine", "--no-compile", "--num-paraphrases", "--indexs"):
        assert flag in out.stdout


@pytest.mark.parametrize("fusion", fg.FUSIONS)
def test_cli_writes_result_columns(tmp_path, fusion):
    output = tmp_path / "flex.feather"
    argv = ["--dataset", "webqa", "--model", "tiny_llama", "--device", "cpu", "--indexs", "0,2,4",
            "--fusion", fusion, "--max-new-tokens", "3", "--max-samples", "2", "--output", str(output),
            *WEBQA_FIXTURE_ARGS]
    assert fg.main(argv) == 0
    df = pd.read_feather(output)
    extra = ["fusion", "positions", "num_paraphrases", "prefill_tokens", "paraphrase_index"]
    assert list(df.columns) == list(constants.RESULT_COLUMNS) + extra
    assert len(df) == 2
    assert set(df["method"]) == {"flex_attention" if fusion == "attention" else "flex_logits_avg"}
    assert set(df["fusion"]) == {fusion} and set(df["positions"]) == {"shared"}
    assert set(df["num_paraphrases"]) == {3} and set(df["paraphrase_index"]) == {-1}
    assert all(len(p) == 3 for p in df["paraphrases"])
    assert (df["prefill_tokens"] > 100).all()
    with pytest.raises(FileExistsError):
        fg.main(argv)
