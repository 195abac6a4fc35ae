"""Minimal FlexAttention pipeline: exactly 2 questions x 5 paraphrases, every step logged and timed.

    python testing/debugging/test_minimal_pipeline.py                       # SmolLM2 + fixtures, offline
    python testing/debugging/test_minimal_pipeline.py --model qwen2.5_3b_it --hub
    python testing/debugging/test_minimal_pipeline.py --dataset myriadlama --data-file my_myriadlama.jsonl

It runs flex_attention_generate.flex_generate once on the 2 questions and watches it
through its breakpoint events (it never changes the engine). It prints the packed
tokens, the attention mask, each generation step (top-k, attention per segment), the
answers with the gold answers, and the timings (load, tokenize, mask, prefill, each
decode step, total). Everything is saved to a debug folder (summary.json, tensors,
mask pictures, report.md). At the end it checks the run (PASS / FAIL lines):
spans exact, paraphrases isolated by the mask, answers equal to a run without callbacks.
The exit code is 0 only when every check passes. pytest runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

import constants  # noqa: E402
from testing import report  # noqa: E402
from testing.debugging import debug_helpers as dh  # noqa: E402

NUM_QUESTIONS = 2
NUM_PARAPHRASES = 5
DEFAULT_OUTPUT = dh.DEFAULT_DEBUG_DIR / "minimal_pipeline"


@dataclass
class PipelineRun:
    """Everything one minimal run produced (the checks read it)."""

    model: object
    tokenizer: object
    model_name: str
    data: dh.DebugData
    fusion: str
    positions: str
    combine: str
    max_new_tokens: int
    stop_ids: torch.Tensor
    compile: bool
    results: list
    log: dh.EventLog
    references: dict  # (question, step) -> AttentionReference
    masks: list  # dense prefill mask of each question
    folder: Path
    load_s: float
    total_s: float
    sections: list = field(default_factory=list)  # (title, text) of the printed views

    @property
    def packs(self) -> list:
        return [e.state["packed"] for e in self.log.of("tokenized")]


def run_pipeline(model, tokenizer, model_name: str, data: dh.DebugData, output_dir: str | Path,
                 fusion: str = "attention", positions: str = "shared", combine: str = "avg",
                 max_new_tokens: int = constants.MAX_NEW_TOKENS, stop_ids=None, compile: bool = False,
                 layer: int | None = None, load_s: float = 0.0) -> PipelineRun:
    """Run the engine once with an event log, print each step, save the debug folder."""
    import flex_attention_generate as fag
    import generate

    start = time.perf_counter()
    if stop_ids is None:
        stop_ids = generate.stop_token_ids(tokenizer, model.generation_config)
    sections: list[tuple[str, str]] = []
    references: dict = {}
    masks: list = []
    tolerance = dh.logits_tolerance(model.dtype)

    def show(title: str, text: str) -> None:
        sections.append((title, text))

    def handler(name: str, state: dict) -> None:
        clock = f"[engine time {log.engine_time():6.2f} s]"
        if name == "tokenized":
            b, pack = state["index"], state["packed"]
            print(f"\n{clock} Breakpoint 1 - question {b} tokenized: {len(pack)} tokens, {len(pack.spans)} spans")
            show(f"Question {b}: concatenation", dh.inspect_concatenation(pack.input_ids, pack.spans, tokenizer))
            show(f"Question {b}: tokens", dh.inspect_tokenization(
                pack.input_ids, tokenizer, pack.position_ids, pack.segment_ids, segment_names=pack.segment_names,
                spans=pack.spans, max_rows=None, title=f"Question {b}: every token", echo=False))
        elif name == "before_attention":
            print(f"\n{clock} Breakpoint 2 - mask built, attention implementation {state['attn_implementation']!r}")
            show("Prefill tensors", dh.inspect_step("before FlexAttention (prefill of the batch)",
                                                    input_ids=state["input_ids"], position_ids=state["position_ids"],
                                                    segment_ids=state["segment_ids"], visibility=state["visibility"]))
            masks.extend(dh.question_masks(state))
            for b, (pack, mask) in enumerate(zip(state["packed"], masks)):
                text = dh.inspect_attention_mask(mask, dh.mask_ranges(pack), state["block_mask"] if b == 0 else None,
                                                 title=f"Question {b}: attention mask (rows = queries, columns = keys)",
                                                 echo=b == 0)
                show(f"Question {b}: attention mask", text)
        elif name == "decode_step":
            b, step = state["index"], state["step"]
            pack = log.of("tokenized", b)[0].state["packed"]
            ref = dh.reference_attention(model, pack, log.generated_before(b, step), step, layer)
            references[(b, step)] = ref
            show(f"Question {b}: step {step}", dh.inspect_generation_step(
                tokenizer, step, state["token_id"], state["topk_ids"], state["topk_probs"], state["logits"],
                [s.name for s in pack.spans if s.kind == "paraphrase"], ref, state["logits"], tolerance, question=b))
        elif name == "after_step":
            pos, seg = state["new_position_ids"].tolist(), state["new_segment_ids"].tolist()
            print(f"{clock} Breakpoint 4 - question {state['index']} step {state['step']}: "
                  f"text so far {state['text']!r}; next input at positions {pos}, segments {seg}; "
                  f"cache length {state['kv_len']}; finished {state['finished']}")
        elif name == "final":
            print(f"{clock} Breakpoint 5 - question {state['index']} done: generation {state['generation']!r}")

    log = dh.EventLog(handler)
    print(dh.banner(f"Minimal pipeline: {len(data.questions)} questions x {len(data.questions[0]['paraphrases'])} "
                    f"paraphrases, model {model_name}, fusion {fusion}, positions {positions}"))
    print(f"Questions from {data.source}")
    log.start()
    results = fag.flex_generate(model, tokenizer, data.prefix, [q["paraphrases"] for q in data.questions], fusion,
                                positions, combine, max_new_tokens, on_event=log, compile=compile, stop_ids=stop_ids)
    run = PipelineRun(model, tokenizer, model_name, data, fusion, positions, combine, max_new_tokens, stop_ids,
                      compile, results, log, references, masks, Path(output_dir), load_s, 0.0, sections)
    show("Answers", print_answers(run))
    run.total_s = time.perf_counter() - start + load_s
    show("Timings", print_timings(run))
    save(run)
    return run


def print_answers(run: PipelineRun) -> str:
    lines = [dh.banner("Answers (from the packed run)")]
    for q, r in zip(run.data.questions, run.results):
        ok = dh.score(r.prediction, q["answers"])
        lines.append(f"  {'CORRECT' if ok else 'WRONG  '}  {q['question']!r} -> {r.prediction!r}   gold: {q['answers']}")
    text = "\n".join(lines)
    print(text)
    return text


def print_timings(run: PipelineRun) -> str:
    text = dh.format_timings(run.log.timings(), run.load_s, run.total_s)
    print(text)
    return text


def summary(run: PipelineRun) -> dict:
    """Plain data of the run for summary.json."""
    return {
        "title": "minimal pipeline", "model": run.model_name, "dataset": run.data.dataset, "source": run.data.source,
        "fusion": run.fusion, "positions": run.positions, "combine": run.combine, "device": str(run.model.device),
        "dtype": str(run.model.dtype), "compile": run.compile, "max_new_tokens": run.max_new_tokens,
        "event_order": run.log.order(), "timings": {"load_s": run.load_s, **run.log.timings(), "total_s": run.total_s},
        "questions": [
            {**q, "prediction": r.prediction, "generation": r.generation, "token_ids": r.token_ids,
             "correct": dh.score(r.prediction, q["answers"]), "prefill_tokens": r.prefill_tokens,
             "spans": dh.as_ranges(p.spans), "mask": dh.mask_stats(m)}
            for q, r, p, m in zip(run.data.questions, run.results, run.packs, run.masks)],
        "attention_shares": {f"q{b}_step{s}": ref.shares for (b, s), ref in run.references.items()},
    }


def save(run: PipelineRun) -> str:
    tensors = {}
    for b, (pack, mask) in enumerate(zip(run.packs, run.masks)):
        tensors |= {f"q{b}_input_ids": pack.input_ids, f"q{b}_segment_ids": pack.segment_ids,
                    f"q{b}_position_ids": pack.position_ids, f"q{b}_dense_mask": mask}
    for (b, s), ref in run.references.items():
        tensors |= {f"q{b}_step{s}_logits": ref.logits, f"q{b}_step{s}_attention": ref.weights}
    pictures = [(f"mask_q{b}.png", m, dh.mask_ranges(p), f"Question {b}: attention mask")
                for b, (p, m) in enumerate(zip(run.packs, run.masks))]
    return dh.save_debug_info(run.folder, summary(run), tensors, pictures, run.sections)


# --- checks (pytest tests; the script runs them too) ---------------------------------


@pytest.fixture(scope="module")
def pipeline_run(load_model, tmp_path_factory) -> PipelineRun:
    model, tokenizer = load_model(constants.DEFAULT_OFFLINE_MODEL)
    data = dh.load_debug_data("webqa", constants.DEFAULT_OFFLINE_MODEL, NUM_PARAPHRASES, NUM_QUESTIONS)
    return run_pipeline(model, tokenizer, constants.DEFAULT_OFFLINE_MODEL, data, tmp_path_factory.mktemp("minimal"))


def test_two_questions_five_paraphrases(pipeline_run):
    """Exactly 2 questions with 5 paraphrases each went through the engine"""
    run = pipeline_run
    assert len(run.data.questions) == NUM_QUESTIONS and len(run.results) == NUM_QUESTIONS
    for pack in run.packs:
        assert [s.kind for s in pack.spans].count("paraphrase") == NUM_PARAPHRASES


def test_spans_are_exact(pipeline_run):
    """Spans tile each pack, and each span holds exactly the tokens of its own piece"""
    run, tok = pipeline_run, pipeline_run.tokenizer
    bos = [tok.bos_token_id] if tok("a").input_ids[:1] == [tok.bos_token_id] else []
    for q, pack in zip(run.data.questions, run.packs):
        assert dh.span_problems(pack.spans, len(pack)) == []
        pieces = [run.data.prefix] + [f"Q: {p}" for p in q["paraphrases"]] + ["\nA:"]
        if run.fusion == "logits":
            pieces = [run.data.prefix] + [x for p in q["paraphrases"] for x in (f"Q: {p}", "\nA:")]
        assert len(pack.spans) == len(pieces)
        ids = pack.input_ids.tolist()
        for i, (span, piece) in enumerate(zip(pack.spans, pieces)):
            expected = (bos if i == 0 else []) + tok(piece, add_special_tokens=False).input_ids
            assert ids[span.start:span.end] == expected, f"{span.name}: tokens differ from the piece {piece!r}"
            text = tok.decode(ids[span.start + (len(bos) if i == 0 else 0):span.end])
            assert text == piece, f"{span.name} decodes to {text!r}, expected {piece!r}"


def test_shared_positions(pipeline_run):
    """Shared positions: every paraphrase starts right after the prefix; the cue follows the longest one"""
    run = pipeline_run
    if run.positions != "shared" or run.fusion != "attention":
        report.skip(f"this check is for --fusion attention --positions shared (got {run.fusion}, {run.positions})")
    for pack in run.packs:
        prefix, *paras, cue = pack.spans
        pos = pack.position_ids.tolist()
        assert pos[:prefix.end] == list(range(prefix.end))
        for s in paras:
            assert pos[s.start:s.end] == list(range(prefix.end, prefix.end + len(s))), s.name
        start = prefix.end + max(len(s) for s in paras)
        assert pos[cue.start:cue.end] == list(range(start, start + len(cue)))


def _expected_mask(spans, length: int) -> torch.Tensor:
    """Hand-built reference from the spans alone: prefix visible to all, a paraphrase sees only itself,
    the shared cue sees everything (logits fusion: a stream's cue sees its own paraphrase)."""
    group = torch.zeros(length, dtype=torch.long)
    sees_all = torch.zeros(length, dtype=torch.bool)
    for s in spans:
        if s.kind == "paraphrase" or (s.kind == "cue" and s.name != "cue"):
            group[s.start:s.end] = int(s.name.split()[-1]) + 1
        elif s.kind == "cue":
            sees_all[s.start:s.end] = True
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None]
    return (kv <= q) & ((group[kv] == 0) | (group[kv] == group[q]) | sees_all[q])


def test_mask_isolates_paraphrases(pipeline_run):
    """The engine's dense mask equals the hand-built reference; no paraphrase sees another one"""
    run = pipeline_run
    for b, (pack, mask) in enumerate(zip(run.packs, run.masks)):
        assert mask.shape == (len(pack), len(pack))
        paras = [s for s in pack.spans if s.kind == "paraphrase"]
        for a in paras:
            for c in paras:
                if a is not c:
                    seen = int(mask[a.start:a.end, c.start:c.end].sum())
                    assert seen == 0, f"question {b}: {a.name} sees {seen} pairs of {c.name}"
        assert torch.equal(mask, _expected_mask(pack.spans, len(pack))), f"question {b}: mask differs from the reference"


def test_reference_attention_matches_engine(pipeline_run):
    """The eager reference (same mask, no FlexAttention) gives the engine's logits; attention shares sum to 1"""
    run = pipeline_run
    tolerance = dh.logits_tolerance(run.model.dtype)
    assert run.references, "no decode step was analysed"
    for e in run.log.of("decode_step"):
        ref = run.references[(e.state["index"], e.state["step"])]
        diff = (e.state["logits"].float().cpu() - ref.logits).abs().max().item()
        if run.model.dtype == torch.float32:
            assert diff <= tolerance, f"question {e.state['index']} step {e.state['step']}: logits differ by {diff:.2e}"
        elif diff > tolerance:
            report.warn(f"logits differ by {diff:.2e} in {run.model.dtype} (tolerance {tolerance})")
        for shares in ref.shares:
            assert abs(sum(shares.values()) - 1) < 1e-4, shares
    report.note(f"{len(run.references)} decode steps checked")


def test_answers_come_from_packed_run(pipeline_run):
    """The answers equal the engine's own output without callbacks, token for token"""
    import flex_attention_generate as fag

    run = pipeline_run
    plain = fag.flex_generate(run.model, run.tokenizer, run.data.prefix, [q["paraphrases"] for q in run.data.questions],
                              run.fusion, run.positions, run.combine, run.max_new_tokens, compile=run.compile,
                              stop_ids=run.stop_ids)
    for b, (mine, ref) in enumerate(zip(run.results, plain)):
        assert mine.token_ids == ref.token_ids, f"question {b}: {mine.generation!r} != {ref.generation!r}"
        assert mine.prefill_tokens == len(run.packs[b])
    finals = [e.state["prediction"] for e in run.log.of("final")]
    assert finals == [r.prediction for r in plain]
    report.note("answers: " + ", ".join(repr(r.prediction) for r in plain))


def test_debug_folder(pipeline_run):
    """The debug folder holds summary.json, tensors, the mask pictures and report.md, matching the run"""
    import matplotlib.image

    run = pipeline_run
    data = json.loads((run.folder / dh.SUMMARY_FILE).read_text())
    assert [q["prediction"] for q in data["questions"]] == [r.prediction for r in run.results]
    order = data["event_order"]
    assert order[:3] == ["tokenized", "before_attention", "decode_step"] and order[-1] == "final", order
    for b, pack in enumerate(run.packs):
        png = run.folder / f"mask_q{b}.png"
        assert matplotlib.image.imread(png).shape[0] > 200, png
        saved = torch.load(run.folder / dh.TENSOR_DIR / f"q{b}_input_ids.pt", weights_only=True)
        assert torch.equal(saved, pack.input_ids)
        assert torch.equal(torch.load(run.folder / dh.TENSOR_DIR / f"q{b}_dense_mask.pt", weights_only=True), run.masks[b])
    text = (run.folder / dh.REPORT_FILE).read_text()
    assert "Question 0: attention mask" in text and "Answers" in text and "Timings" in text
    report.note(f"folder: {run.folder}")


def test_timings(pipeline_run):
    """Timings exist for load, tokenize, mask, prefill, every decode step and the total"""
    run = pipeline_run
    t = run.log.timings()
    for key in ("tokenize_s", "mask_s", "prefill_s", "engine_total_s"):
        assert key in t and t[key] >= 0, key
    steps = run.results[0].timings["steps"]
    assert len(t["decode_steps_s"]) == steps, (t["decode_steps_s"], steps)
    assert run.total_s >= t["engine_total_s"]
    report.note(f"prefill {t['prefill_s']:.2f} s, {steps} decode steps, total {run.total_s:.1f} s")


CHECKS = [test_two_questions_five_paraphrases, test_spans_are_exact, test_shared_positions,
          test_mask_isolates_paraphrases, test_reference_attention_matches_engine, test_answers_come_from_packed_run,
          test_debug_folder, test_timings]


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return dh.add_debug_args(parser, DEFAULT_OUTPUT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    constants.configure_cache(args.cache_dir)
    data = dh.load_debug_data(args.dataset, args.model, NUM_PARAPHRASES, NUM_QUESTIONS, args.data_file,
                              args.fewshot_file, args.paraphrase_file, args.hub, args.cache_dir, args.seed)
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer, stops, load_s = dh.load_model(args.model, args.device, args.cache_dir)
    print(f"Loaded in {load_s:.1f} s on {model.device} ({model.dtype}).")
    compile = model.device.type == "cuda" and not args.no_compile
    run = run_pipeline(model, tokenizer, args.model, data, args.output_dir, args.fusion, args.positions, args.combine,
                       args.max_new_tokens, stops, compile, args.layer, load_s)
    return report.run({"Checks on this run": CHECKS}, {"pipeline_run": lambda: run})


if __name__ == "__main__":
    raise SystemExit(main())
