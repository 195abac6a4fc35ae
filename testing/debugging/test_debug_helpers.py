"""Tests of debug_helpers: each view against hand-computed values, the attention reference against plain forwards."""

from __future__ import annotations

import json
import time

import pytest
import torch

import constants
import dataset as ds
import flex_attention_generate as fag
from testing.debugging import debug_helpers as dh

MODEL = constants.DEFAULT_OFFLINE_MODEL
PREFIX = "Answer the question.\n\nQ: what is the capital of spain?\nA: Madrid\n\n"
PARAPHRASES = ["what is the capital of france?", "which city is the capital of france?", "france's capital is?"]


@pytest.fixture(scope="module")
def smollm2(load_model):
    return load_model(MODEL)


def _segment_mask(lengths: list[int], cue_sees_all: bool = True) -> torch.Tensor:
    """Hand-built mask: range 0 = prefix (seen by all), middle ranges isolated, last range sees all."""
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    q, kv = seg[:, None], seg[None, :]
    last = len(lengths) - 1
    idx = torch.arange(len(seg))
    return (idx[None] <= idx[:, None]) & ((kv == 0) | (q == kv) | ((q == last) & cue_sees_all))


# --- text views ------------------------------------------------------------------------


def test_inspect_step_prints_and_returns_the_same_text(capsys):
    text = dh.inspect_step("demo", ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), name="abc", n=3)
    assert capsys.readouterr().out == text + "\n"
    assert "STEP: demo" in text
    assert "shape=(2, 3) dtype=torch.int64 device=cpu first=[5, 6, 7, 8, 9, 10]" in text
    assert "str len=3 'abc'" in text and "int 3" in text
    assert dh.inspect_step("quiet", echo=False, x=1) and capsys.readouterr().out == ""


def test_describe_value_cuts_long_tensors():
    text = dh.describe_value(torch.arange(20), max_values=4)
    assert text.endswith("first=[0, 1, 2, 3, ...]"), text


def test_span_problems_finds_gaps_overlaps_and_wrong_ends():
    assert dh.span_problems([("a", 0, 3), ("b", 3, 5)], 5) == []
    assert dh.span_problems([("a", 0, 3), ("b", 4, 5)], 5) == ["gap: tokens [3, 4) belong to no span (before 'b')"]
    assert dh.span_problems([("a", 0, 3), ("b", 2, 5)], 5) == ["overlap: span 'b' starts at 2, but the previous span ends at 3"]
    assert dh.span_problems([("a", 0, 3)], 5) == ["the spans end at 3, but the sequence has 5 tokens"]


def test_inspect_concatenation_and_tokenization_on_real_pieces(smollm2, capsys):
    _, tok = smollm2
    pieces = ["Intro text.\n\n", "Q: who?", "\nA:"]
    parts = [tok(p, add_special_tokens=False).input_ids for p in pieces]
    ids, spans, at = [], [], 0
    for name, part in zip(["prefix", "paraphrase 0", "cue"], parts):
        spans.append((name, at, at + len(part)))
        ids += part
        at += len(part)
    text = dh.inspect_concatenation(torch.tensor(ids), spans, tok)
    assert f"OK: the 3 spans tile [0, {len(ids)}) with no gap and no overlap." in text
    assert f"prefix | paraphrase 0: {ids[len(parts[0]) - 1]}={tok.decode([ids[len(parts[0]) - 1]])!r}" in text
    broken = dh.inspect_concatenation(ids, [spans[0], spans[2]], tok, echo=False)
    assert "PROBLEM" in broken and "gap" in broken

    seg = [i for i, p in enumerate(parts) for _ in p]
    table = dh.inspect_tokenization(torch.tensor(ids), tok, position_ids=list(range(len(ids))), segment_ids=seg,
                                    segment_names=["prefix", "paraphrase 0", "cue"], max_rows=None)
    assert capsys.readouterr().out.endswith(table + "\n")
    for name, piece in zip(["prefix", "paraphrase 0", "cue"], pieces):
        assert f"{piece!r}" in table and name in table
    rows = [line for line in table.splitlines() if line[:5].strip().isdigit()]
    assert len(rows) == len(ids)
    assert "rows not shown" in dh.inspect_tokenization(ids, tok, max_rows=4, echo=False)
    with pytest.raises(ValueError, match="position has 2 values"):
        dh.inspect_tokenization(ids, tok, position_ids=[0, 1], echo=False)


# --- masks -------------------------------------------------------------------------------


def test_mask_grid_small_mask_exact():
    mask = _segment_mask([2, 2, 2, 1])
    ranges = [("prefix", 0, 2), ("p0", 2, 4), ("p1", 4, 6), ("cue", 6, 7)]
    grid = dh.mask_grid(mask, ranges).splitlines()
    body = [line for line in grid if line[:8].strip() in ("prefix", "p0", "p1", "cue", "")][2:]
    expected = [
        "prefix  #.|..|..|.", "        ##|..|..|.",
        "p0      ##|#.|..|.", "        ##|##|..|.",
        "p1      ##|..|#.|.", "        ##|..|##|.",
        "cue     ##|##|##|#",
    ]
    assert [line for line in body if "|" in line and "+" not in line] == expected
    assert "columns (keys): A=prefix, B=p0, C=p1, D=cue" in grid


def test_mask_grid_downsampled_keeps_isolated_blocks_empty():
    lengths = [200, 30, 31, 29, 3]
    mask = _segment_mask(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    ranges = [(n, s, s + length) for n, s, length in zip(["prefix", "p0", "p1", "p2", "cue"], starts, lengths)]
    lines = dh.mask_grid(mask, ranges, max_cells=40, max_rows=16).splitlines()
    rows = {name: [] for name, _, _ in ranges}
    current, width = None, max(len(n) for n in rows) + 2
    for line in lines[2:]:
        if line.startswith("columns"):
            break
        label = line[:width].strip()
        if label in rows:
            current = label
        if "|" in line and not set(line.strip()) <= set("-+"):
            rows[current].append(line[width:].split("|"))
    for i, name in enumerate(["p0", "p1", "p2"], start=1):
        for cells in rows[name]:
            assert set(cells[0]) == {"#"}, "a paraphrase sees the whole prefix"
            for j in (1, 2, 3):
                if j != i:
                    assert set(cells[j]) == {"."}, f"{name} must not see range {j}"
    assert rows["cue"] and all(set("".join(cells[:4])) == {"#"} for cells in rows["cue"]), "the cue sees everything"


def test_mask_stats_against_hand_counts():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    stats = dh.mask_stats(causal)
    assert (stats["visible"], stats["total"], stats["causal_pairs"]) == (10, 16, 10)
    assert stats["sparsity"] == pytest.approx(6 / 16) and stats["hidden_causal_share"] == 0
    causal[3, 1] = False
    causal[0, 2] = True
    stats = dh.mask_stats(causal)
    assert stats["hidden_causal_share"] == pytest.approx(1 / 10) and stats["visible_above_diagonal"] == 1


def test_block_mask_summary_counts_blocks():
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, q, kv: kv <= q, 1, None, 300, 300, device="cpu")
    text = dh.block_mask_summary(bm)
    assert "shape=(1, 1, 384, 384)" in text and "3 full + 3 partial of 9" in text and "33.3%" in text


def test_mask_png_and_inspect_attention_mask(tmp_path, capsys):
    import matplotlib.image

    lengths = [90, 9, 11, 8, 3]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    ranges = [(n, s, s + length) for n, s, length in zip(["prefix", "p0", "p1", "p2", "cue"], starts, lengths)]
    text = dh.inspect_attention_mask(_segment_mask(lengths), ranges, png_path=tmp_path / "m.png")
    assert capsys.readouterr().out == text + "\n"
    assert f"Picture: {tmp_path / 'm.png'}" in text and "Visible above the diagonal (must be 0): 0" in text
    image = matplotlib.image.imread(tmp_path / "m.png")
    height, width = image.shape[:2]
    assert width > 1.5 * height, "a zoom panel is added next to the whole mask when the prefix is long"
    rgb = image[..., :3].reshape(-1, 3)
    assert (rgb.min(axis=1) > 0.99).any() and (rgb.max(axis=1) - rgb.min(axis=1) > 0.3).any(), "white and colour"


# --- attention reference -------------------------------------------------------------


def test_reference_attention_isolates_paraphrases_and_matches_plain_forwards(smollm2):
    model, tok = smollm2
    pack = fag.pack_prompt(tok, PREFIX, PARAPHRASES)
    para = [s for s in pack.spans if s.kind == "paraphrase"]
    rows = [para[1].end - 1, pack.read_index[0]]
    ref = dh.reference_attention(model, pack, [], 0, query_index=rows)
    paraphrase_row, cue_row = ref.shares
    for name, share in paraphrase_row.items():
        if name in ("paraphrase 0", "paraphrase 2", "cue"):
            assert share == 0.0, f"a paraphrase token gives {share} of its attention to {name}"
    assert paraphrase_row["prefix"] + paraphrase_row["paraphrase 1"] == pytest.approx(1.0, abs=1e-5)
    assert sum(cue_row.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(cue_row[s.name] > 0 for s in para)

    # The paraphrase row must equal a plain causal forward of prefix + that paraphrase.
    alone = ds.bos_ids(tok) + ds.encode_piece(tok, PREFIX) + ds.encode_piece(tok, ds.question_segment(PARAPHRASES[1]))
    with torch.inference_mode():
        plain = model(input_ids=torch.tensor([alone])).logits[0, -1].float()
    assert (plain - ref.logits[0]).abs().max().item() < 1e-3

    # The cue row must equal the engine's own first-step logits (FlexAttention path).
    seen = {}
    fag.flex_generate(model, tok, PREFIX, [PARAPHRASES], max_new_tokens=1,
                      on_event=lambda name, **s: seen.setdefault(name, s))
    assert (seen["decode_step"]["logits"][0].float().cpu() - ref.logits[1]).abs().max().item() < 1e-3
    assert ref.layer_weights.shape == (model.config.num_hidden_layers, 2, len(pack))
    assert torch.allclose(ref.layer_weights.mean(0), ref.weights)


def test_reference_attention_logits_fusion_streams_are_isolated(smollm2):
    model, tok = smollm2
    pack = fag.pack_prompt(tok, PREFIX, PARAPHRASES, fusion="logits")
    ref = dh.reference_attention(model, pack, [], 0)
    assert ref.query_index == list(pack.read_index)
    for i, shares in enumerate(ref.shares):
        own = {"prefix", f"paraphrase {i}", f"cue {i}"}
        assert sum(v for k, v in shares.items() if k in own) == pytest.approx(1.0, abs=1e-5)
        assert all(v == 0.0 for k, v in shares.items() if k not in own), shares


def test_inspect_generation_step_text(smollm2, capsys):
    model, tok = smollm2
    pack = fag.pack_prompt(tok, PREFIX, PARAPHRASES[:2], fusion="logits")
    ref = dh.reference_attention(model, pack, [], 0)
    probs = ref.logits.mean(0).softmax(-1)
    top = probs.topk(5)
    chosen = int(top.indices[0])
    text = dh.inspect_generation_step(tok, 0, chosen, top.indices, top.values, ref.logits, ["p0", "p1"], ref,
                                      engine_logits=ref.logits)
    assert capsys.readouterr().out == text + "\n"
    assert f"1. {chosen:>7} {tok.decode([chosen])!r:<18} p={float(top.values[0]):.4f}  <- chosen" in text
    assert "Per stream" in text and "  p0 " in text and "  p1 " in text
    assert "sum" in text and "1.0000" in text and "max abs diff 0.00e+00 (OK" in text
    assert "cue 0" in text and "cue 1" in text
    assert len(dh.format_layer_shares(ref).splitlines()) == model.config.num_hidden_layers + 2


# --- saving, events, locations -------------------------------------------------------------


def test_save_debug_info_writes_every_file(tmp_path, capsys):
    mask = _segment_mask([3, 2, 2, 1])
    ranges = [("prefix", 0, 3), ("p0", 3, 5), ("p1", 5, 7), ("cue", 7, 8)]
    text = dh.save_debug_info(tmp_path, {"title": "t", "answer": "Paris", "values": torch.tensor([1, 2])},
                              {"ids": torch.arange(4)}, [("mask.png", mask, ranges, "demo")], [("View", "grid text")])
    assert capsys.readouterr().out == text + "\n"
    summary = json.loads((tmp_path / dh.SUMMARY_FILE).read_text())
    assert summary["answer"] == "Paris" and summary["values"] == [1, 2]
    assert set(summary["files"]) == {"tensors/ids.pt", "mask.png", "summary.json", "report.md"}
    assert torch.equal(torch.load(tmp_path / "tensors" / "ids.pt", weights_only=True), torch.arange(4))
    report = (tmp_path / dh.REPORT_FILE).read_text()
    assert "## View" in report and "grid text" in report and "![mask](mask.png)" in report
    assert (tmp_path / "mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_event_log_times_the_engine_without_the_callbacks():
    log = dh.EventLog(lambda name, state: time.sleep(0.15))
    log.start()
    time.sleep(0.05)
    log("tokenized", index=0)
    time.sleep(0.05)
    log("before_attention")
    time.sleep(0.2)
    log("decode_step", index=0, step=0, token_id=7)
    time.sleep(0.1)
    log("after_step", index=0, step=0)
    log("decode_step", index=0, step=1, token_id=8)
    log("after_step", index=0, step=1)
    log("final", index=0)
    t = log.timings()
    assert t["tokenize_s"] == pytest.approx(0.05, abs=0.04)
    assert t["mask_s"] == pytest.approx(0.05, abs=0.04)
    assert t["prefill_s"] == pytest.approx(0.2, abs=0.05)
    assert t["decode_steps_s"][0] == pytest.approx(0.1, abs=0.05) and len(t["decode_steps_s"]) == 2
    assert t["debug_callbacks_s"] >= 7 * 0.15
    assert t["engine_total_s"] == pytest.approx(0.4, abs=0.1)
    assert log.order() == ["tokenized", "before_attention", "decode_step", "after_step", "decode_step",
                           "after_step", "final"]
    assert log.generated_before(0, 1) == [7] and log.generated_before(0, 2) == [7, 8]


def test_find_event_lines_point_at_the_calls():
    locations = dh.find_event_lines()
    assert set(fag.EVENTS) <= set(locations)
    source = open(fag.__file__).read().splitlines()
    for name in fag.EVENTS:
        loc = locations[name]
        assert f'on_event("{name}"' in source[loc.call_line - 1], (name, source[loc.call_line - 1])
        assert source[loc.guard_line - 1].strip() == "if on_event:"
        assert loc.function == "flex_generate"
        assert f"flex_attention_generate.py:{loc.guard_line}  (`if on_event:` in flex_generate()" in loc.describe()


def test_demo_script_writes_a_debug_folder(tmp_path):
    assert dh.main(["--output-dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"tensors", "mask.png", "summary.json", "report.md"}
    assert json.loads((tmp_path / "summary.json").read_text())["tokens"] == 38
