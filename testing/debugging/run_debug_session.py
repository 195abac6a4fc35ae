"""Debugging session: walk through the five breakpoints of the FlexAttention engine.

    python testing/debugging/run_debug_session.py                    # automated: print every breakpoint
    python testing/debugging/run_debug_session.py --interactive      # stop at each breakpoint, wait for a key
    python testing/debugging/run_debug_session.py --breakpoints 1,3  # only breakpoints 1 and 3
    python testing/debugging/run_debug_session.py --explain          # explain the breakpoints, run nothing

The five breakpoints are events of flex_attention_generate.flex_generate (it calls
``on_event(name, **state)``); this script only listens to them:

  1 after tokenization     (event "tokenized")
  2 before FlexAttention   (event "before_attention")
  3 generation loop        (event "decode_step")
  4 after each step        (event "after_step")
  5 final output           (event "final")

For each one it says what to look at and on which line of flex_attention_generate.py
to put a breakpoint in your IDE (the line is found in the source when the script runs).

Interactive keys (type the letter, then Enter): c = continue (Enter alone too),
d = show details, m = show the mask picture path, p = open pdb here, s = skip to the
end (no more stops), q = quit now (exit code 0). At the end of input (a pipe that
ends) the run continues to the end without stopping. Breakpoints 3 and 4 stop at the
first generation step only; --stop-every-step stops at every step.
"""

from __future__ import annotations

import argparse
import ast
import bdb
import pdb
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import constants  # noqa: E402
from testing.debugging import debug_helpers as dh  # noqa: E402

DEFAULT_OUTPUT = dh.DEFAULT_DEBUG_DIR / "debug_session"
WATCHED = 0  # the question the session stops for (index in the batch)
KEYS = "c=continue  d=details  m=mask picture  p=pdb  s=skip to the end  q=quit"


@dataclass(frozen=True)
class Breakpoint:
    number: int
    event: str
    title: str
    look_at: str
    variables: tuple[str, ...]  # local variables of flex_generate worth watching at this line


BREAKPOINTS = (
    Breakpoint(1, "tokenized", "after tokenization",
               "The packed prompt of one question. The spans must tile the sequence with no gap: prefix, "
               "one segment per paraphrase, then the answer cue '\\nA:'. BOS appears once. With shared "
               "positions every paraphrase starts at the same position (right after the prefix).",
               ("packs", "paraphrases_per_question", "prefix")),
    Breakpoint(2, "before_attention", "before FlexAttention",
               "The mask that the prefill will use. In the grid, a paraphrase row must show '.' under every "
               "other paraphrase (isolation), '#' under the prefix, and the cue row must see everything. "
               "The model's attention implementation must be 'self_ensemble_flex' (no silent fallback).",
               ("block_mask", "mask_mod", "tables", "attn_name")),
    Breakpoint(3, "decode_step", "generation loop (one decode step)",
               "The next-token choice: top-k probabilities, the chosen token, and where the current token "
               "looks (share of attention per segment, from a dense eager reference run with the same mask). "
               "The reference logits must equal the engine's logits.",
               ("logits", "scores", "tokens", "step")),
    Breakpoint(4, "after_step", "after each generation step",
               "The sequence after the new token: its position id (previous + 1), its segment (the cue "
               "segment in attention fusion, so it sees every paraphrase), the cache length, and which "
               "questions are finished (each one stops at its own newline or EOS).",
               ("generated", "finished", "kv_len", "block_mask")),
    Breakpoint(5, "final", "final output",
               "The generated text, the prediction (its first line), the gold answers, and the timings.",
               ("results", "timings")),
)
BY_EVENT = {b.event: b for b in BREAKPOINTS}


class QuitSession(Exception):
    """The user pressed q: stop the run."""


def assigned_names(function: str = "flex_generate", before_line: int | None = None) -> set[str]:
    """Arguments of ``function`` in flex_attention_generate.py and the names it assigns (before a line)."""
    import inspect

    import flex_attention_generate as fag

    tree = ast.parse(Path(inspect.getsourcefile(fag)).read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    names = {a.arg for a in func.args.args + func.args.kwonlyargs}
    names |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
              and (before_line is None or n.lineno < before_line)}
    return names


def explain(bp: Breakpoint, locations: dict) -> str:
    """What to look at and where to put an IDE breakpoint."""
    loc = locations.get(bp.event)
    where = loc.describe() if loc else f"PROBLEM: flex_attention_generate.py has no on_event({bp.event!r}) call"
    return "\n".join([f"What to look at: {bp.look_at}", f"IDE breakpoint, one of:\n{where}",
                      f"Variables there: {', '.join(bp.variables)}; the event data is `state` in this script."])


def explain_all() -> str:
    locations = dh.find_event_lines()
    parts = [dh.banner("The five breakpoints of flex_attention_generate.flex_generate")]
    for bp in BREAKPOINTS:
        parts += [f"\n{bp.number}. {bp.title} (event {bp.event!r})", explain(bp, locations)]
    return "\n".join(parts)


class Session:
    """The ``handler`` of an EventLog: prints the selected breakpoints and, interactively, waits for keys."""

    def __init__(self, model, tokenizer, answers: list[list[str]], selected: set[int], interactive: bool,
                 every_step: bool, folder: Path, layer: int | None = None, scores_are_probs: bool = False):
        self.model, self.tokenizer, self.answers = model, tokenizer, answers
        self.scores_are_probs = scores_are_probs  # logits fusion with max: the engine's scores are probabilities
        self.selected, self.interactive, self.every_step = selected, interactive, every_step
        self.folder, self.layer = folder, layer
        self.locations = dh.find_event_lines()
        self.log = dh.EventLog(self.handle)
        self.skipping = False
        self.explained: set[int] = set()
        self.passed: list[int] = []  # breakpoint numbers shown, in order
        self.stops: list[int] = []  # breakpoint numbers where the session waited for a key
        self.sections: list[tuple[str, str]] = []
        self.masks: list = []
        self.references: dict = {}
        self.mask_png = folder / f"mask_q{WATCHED}.png"
        self.tolerance = dh.logits_tolerance(model.dtype)

    # --- events -------------------------------------------------------------------------

    def handle(self, name: str, state: dict) -> None:
        bp = BY_EVENT[name]
        if name == "before_attention":
            self.masks = dh.question_masks(state)
            pack = state["packed"][WATCHED]
            dh.save_mask_png(self.masks[WATCHED], dh.mask_ranges(pack), self.mask_png,
                             f"Question {WATCHED}: attention mask of the prefill")
        if name == "decode_step" and state["index"] == WATCHED and bp.number in self.selected and not self.skipping:
            self.references[state["step"]] = dh.reference_attention(
                self.model, self.pack(), self.log.generated_before(WATCHED, state["step"]), state["step"], self.layer)
        if bp.number not in self.selected or (self.skipping and name != "final"):
            return
        if state.get("index", WATCHED) != WATCHED:
            if name == "final":
                print(f"(question {state['index']}: {state['generation']!r})")
            return
        self.passed.append(bp.number)
        print("\n" + self.header(bp, state))
        if bp.number not in self.explained:
            self.explained.add(bp.number)
            print(explain(bp, self.locations))
        self.sections.append((self.title(bp, state), self.view(bp, state)))
        if self.interactive and not self.skipping and (state.get("step", 0) == 0 or self.every_step):
            self.prompt(bp, state)

    def pack(self):
        return self.log.of("tokenized", WATCHED)[0].state["packed"]

    @staticmethod
    def title(bp: Breakpoint, state: dict) -> str:
        step = f", step {state['step']}" if "step" in state else ""
        return f"Breakpoint {bp.number}/5: {bp.title}{step}"

    def header(self, bp: Breakpoint, state: dict) -> str:
        return dh.banner(f"BREAKPOINT {bp.number}/5: {bp.title} (event {bp.event!r}, question {WATCHED}"
                         + (f", step {state['step']})" if "step" in state else ")"))

    # --- views ----------------------------------------------------------------------------

    def view(self, bp: Breakpoint, state: dict, details: bool = False) -> str:
        tok = self.tokenizer
        if bp.event == "tokenized":
            pack = state["packed"]
            if details:
                return dh.inspect_tokenization(pack.input_ids, tok, pack.position_ids, pack.segment_ids,
                                               segment_names=pack.segment_names, spans=pack.spans, max_rows=None) + \
                    "\n" + _echo(pack.describe(tok))
            return dh.inspect_concatenation(pack.input_ids, pack.spans, tok) + "\n" + dh.inspect_tokenization(
                pack.input_ids, tok, pack.position_ids, pack.segment_ids, segment_names=pack.segment_names,
                max_rows=12, title="Tokens (first and last rows)")
        if bp.event == "before_attention":
            pack = state["packed"][WATCHED]
            mask = self.masks[WATCHED]
            if details:
                return dh.inspect_step("prefill inputs (whole batch)", input_ids=state["input_ids"],
                                       position_ids=state["position_ids"], segment_ids=state["segment_ids"],
                                       visibility=state["visibility"], block_mask=state["block_mask"]) + "\n" + \
                    _echo("BlockMask blocks:\n" + state["block_mask"].to_string()) + "\n" + \
                    dh.inspect_attention_mask(mask, dh.mask_ranges(pack), max_cells=len(pack), max_rows=len(pack),
                                              title="Attention mask, every token")
            text = dh.inspect_attention_mask(mask, dh.mask_ranges(pack), state["block_mask"])
            return text + "\n" + _echo(f"Attention implementation set on the model: {state['attn_implementation']!r}\n"
                                       f"Mask picture: {self.mask_png}")
        if bp.event == "decode_step":
            ref = self.references.get(state["step"])
            if details:
                scores = state["scores"].float()
                probs = scores if self.scores_are_probs else scores.softmax(-1)
                top = probs.topk(20)
                layers = _echo(dh.format_layer_shares(ref)) + "\n" if ref is not None else ""
                return layers + dh.inspect_generation_step(tok, state["step"], state["token_id"], top.indices,
                                                           top.values, state["logits"], top_k=20, question=WATCHED)
            stream_names = [s.name for s in self.pack().spans if s.kind == "paraphrase"]
            return dh.inspect_generation_step(tok, state["step"], state["token_id"], state["topk_ids"],
                                              state["topk_probs"], state["logits"], stream_names, ref,
                                              state["logits"], self.tolerance, question=WATCHED)
        if bp.event == "after_step":
            return _echo(self.after_step_text(state, details))
        return _echo(self.final_text(state, details))

    def after_step_text(self, state: dict, details: bool) -> str:
        pack = self.pack()
        lines = [f"Text so far: {state['text']!r} ({len(state['generated'])} tokens)",
                 f"Cache length after this step: {state['kv_len']}; finished: {state['finished']}"]
        if state["block_mask"] is None:
            lines.append("No forward after this step: every question has finished (or the token limit is reached).")
            return "\n".join(lines)
        pos, seg = state["new_position_ids"].tolist(), state["new_segment_ids"].tolist()
        lines.append(f"The chosen token was fed back: position {pos}, segment {seg} "
                     f"({', '.join(pack.segment_names[s] for s in seg)}), cache index {state['mask_offset']}")
        import flex_attention_generate as fag

        before = self.log.of("before_attention")[0].state
        k, kv_len, offset = len(seg), state["kv_len"], state["mask_offset"]
        prefill = before["input_ids"].shape[1]  # the batch's prefill length (shorter packs are padded)
        rows = fag.dense_mask(before["mask_mod"], len(before["packed"]), k, kv_len, self.model.device,
                              offset=offset)[WATCHED, 0].cpu()
        keys = list(range(len(pack))) + list(range(prefill, kv_len))  # pads left out
        labels = dh.key_labels(pack, len(keys))
        lines.append(f"What the new token(s) saw in this step's forward (mask rows {offset}..{offset + k - 1}; "
                     "visible keys per segment):")
        for i, row in enumerate(rows):
            counts: dict[str, list[int]] = {}
            for j, key in enumerate(keys):
                name = labels[j]
                counts.setdefault(name, [0, 0])
                counts[name][0] += int(row[key])
                counts[name][1] += 1
            lines.append(f"  token {i}: " + ", ".join(f"{n} {v}/{t}" for n, (v, t) in counts.items()))
        if details:
            lines.append(dh.block_mask_summary(state["block_mask"]))
        return "\n".join(lines)

    def final_text(self, state: dict, details: bool) -> str:
        gold = self.answers[WATCHED]
        ok = dh.score(state["prediction"], gold)
        lines = [f"Generation: {state['generation']!r}", f"Prediction (first line): {state['prediction']!r}",
                 f"Gold answers: {gold} -> {'CORRECT' if ok else 'WRONG'}",
                 dh.format_timings(self.log.timings())]
        if details:
            lines.append("Tokens: " + ", ".join(f"{t}={self.tokenizer.decode([t])!r}" for t in state["token_ids"]))
        return "\n".join(lines)

    # --- keys -------------------------------------------------------------------------------

    def prompt(self, bp: Breakpoint, state: dict) -> None:
        self.stops.append(bp.number)
        while True:
            print(f"[breakpoint {bp.number}/5 {bp.title}] {KEYS}\n> ", end="", flush=True)
            line = sys.stdin.readline()
            if line == "":
                print("(end of input: continuing to the end without stopping)")
                self.interactive = False
                return
            key = line.strip().lower()[:1] or "c"
            if not sys.stdin.isatty():
                print(key)
            if key == "c":
                return
            if key == "d":
                self.view(bp, state, details=True)
            elif key == "m":
                if bp.event == "tokenized":
                    print(f"The mask is not built yet: the engine builds it just before breakpoint 2. "
                          f"The picture will be {self.mask_png}")
                else:
                    print(f"Mask picture: {self.mask_png} (open it in an image viewer or your IDE)")
            elif key == "p":
                self.debugger(state)
            elif key == "s":
                print("Skipping to the end (no more stops) ...")
                self.skipping = True
                return
            elif key == "q":
                raise QuitSession(f"Quit at breakpoint {bp.number}/5 ({bp.title}). The run was stopped; "
                                  "nothing was saved.")
            else:
                print(f"Unknown key {key!r}. Use one of: {KEYS}")

    @staticmethod
    def debugger(state: dict) -> None:
        frame, ups = sys._getframe(), 0
        while frame is not None and frame.f_code.co_name != "flex_generate":
            frame, ups = frame.f_back, ups + 1
        print(f"Opening pdb. The event data is in `state` (try: p sorted(state)). Type `up` {ups} times to reach "
              "flex_generate (the engine) and its local variables. `c` comes back here.", flush=True)
        pdb.Pdb(nosigint=True).set_trace(sys._getframe())
        print()  # pdb stops here; `state` holds the event data


def _echo(text: str) -> str:
    print(text, flush=True)
    return text


# --- command line ------------------------------------------------------------------------


def parse_breakpoints(text: str | None) -> set[int]:
    if not text:
        return {b.number for b in BREAKPOINTS}
    try:
        chosen = {int(x) for x in text.split(",") if x.strip()}
    except ValueError as err:
        raise SystemExit(f"--breakpoints must be numbers from 1 to 5, like 1,3 (got {text!r}).") from err
    if not chosen or not chosen <= {1, 2, 3, 4, 5}:
        raise SystemExit(f"--breakpoints must be numbers from 1 to 5, like 1,3 (got {text!r}).")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--automated", action="store_true", help="run to the end and print every breakpoint (default)")
    mode.add_argument("--interactive", action="store_true", help="stop at each breakpoint and wait for a key")
    mode.add_argument("--explain", action="store_true", help="only explain the five breakpoints (no model is loaded)")
    parser.add_argument("--breakpoints", help="comma list of breakpoints to show, like 1,3 (default: all five)")
    parser.add_argument("--stop-every-step", action="store_true",
                        help="interactive: stop at breakpoints 3 and 4 for every step, not only the first")
    return dh.add_debug_args(parser, DEFAULT_OUTPUT, max_samples=1)


def summary(session: Session, data: dh.DebugData, results: list, args, load_s: float, total_s: float) -> dict:
    return {
        "title": "debug session", "model": args.model, "dataset": data.dataset, "source": data.source,
        "fusion": args.fusion, "positions": args.positions, "combine": args.combine,
        "mode": "interactive" if args.interactive else "automated", "breakpoints_shown": session.passed,
        "stops": session.stops, "event_order": session.log.order(),
        "timings": {"load_s": load_s, **session.log.timings(), "total_s": total_s},
        "questions": [{**q, "prediction": r.prediction, "generation": r.generation,
                       "correct": dh.score(r.prediction, q["answers"])} for q, r in zip(data.questions, results)],
        "attention_shares": {f"step{s}": ref.shares for s, ref in session.references.items()},
    }


def tensors(session: Session) -> dict:
    """Tensors of the watched question for the debug folder."""
    pack = session.pack()
    out = {"input_ids": pack.input_ids, "segment_ids": pack.segment_ids, "position_ids": pack.position_ids}
    if session.masks:
        out["dense_mask"] = session.masks[WATCHED]
    for step, ref in session.references.items():
        out |= {f"step{step}_logits": ref.logits, f"step{step}_attention": ref.weights}
    return out


def checks(session: Session) -> list[str]:
    """Problems found on the way (empty = none)."""
    problems = []
    for e in session.log.of("tokenized"):
        problems += [f"question {e.state['index']}: {p}" for p in dh.span_problems(e.state["packed"].spans,
                                                                                  len(e.state["packed"]))]
    for e in session.log.of("decode_step", WATCHED):
        ref = session.references.get(e.state["step"])
        if ref is not None:
            diff = (e.state["logits"].float().cpu() - ref.logits).abs().max().item()
            if diff > session.tolerance:
                problems.append(f"step {e.state['step']}: reference logits differ from the engine by {diff:.2e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.explain:
        print(explain_all())
        return 0
    selected = parse_breakpoints(args.breakpoints)
    start = time.perf_counter()
    constants.configure_cache(args.cache_dir)
    import flex_attention_generate as fag

    data = dh.load_debug_data(args.dataset, args.model, args.num_paraphrases, args.max_samples, args.data_file,
                              args.fewshot_file, args.paraphrase_file, args.hub, args.cache_dir, args.seed)
    print(f"Loading {args.model} ...", flush=True)
    model, tokenizer, stops, load_s = dh.load_model(args.model, args.device, args.cache_dir)
    print(f"Loaded in {load_s:.1f} s on {model.device} ({model.dtype}). Questions from {data.source}.")
    mode = "interactive" if args.interactive else "automated"
    print(f"Mode: {mode}. Breakpoints: {', '.join(str(n) for n in sorted(selected))}. "
          f"Watching question {WATCHED}: {data.questions[WATCHED]['question']!r}")
    folder = Path(args.output_dir)
    session = Session(model, tokenizer, [q["answers"] for q in data.questions], selected, args.interactive,
                      args.stop_every_step, folder, args.layer, args.fusion == "logits" and args.combine == "max")
    compile = model.device.type == "cuda" and not args.no_compile
    session.log.start()
    try:
        results = fag.flex_generate(model, tokenizer, data.prefix, [q["paraphrases"] for q in data.questions],
                                    args.fusion, args.positions, args.combine, args.max_new_tokens,
                                    on_event=session.log, compile=compile, stop_ids=stops)
    except QuitSession as stop:
        print(f"\n{stop}")
        return 0
    except bdb.BdbQuit:
        print("\npdb was quit: the run was stopped; nothing was saved.")
        return 0
    total_s = time.perf_counter() - start
    print("\n" + dh.banner("End of the session"))
    print(f"Breakpoints shown, in order: {' '.join(str(n) for n in session.passed) or 'none'}")
    masks = []
    if session.masks:
        masks = [(session.mask_png.name, session.masks[WATCHED], dh.mask_ranges(session.pack()),
                  f"Question {WATCHED}: attention mask of the prefill")]
    dh.save_debug_info(folder, summary(session, data, results, args, load_s, total_s), tensors(session), masks,
                       session.sections)
    problems = checks(session)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"Done in {total_s:.1f} s. {'No problems found.' if not problems else 'Problems found: exit code 1.'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
