"""Benchmark: self-ensemble generation speed of four methods on the same questions.

(a) earlier approach: packed sequence, full recompute every step, no KV cache, one question at a time
(b) generate.py --method avg: N separate prompts (prefix repeated), KV cache
(c) flex_attention_generate.py --fusion attention: one pack per question, KV cache
(d) flex_attention_generate.py --fusion logits --combine avg: one pack, N streams, KV cache

Every method decodes exactly --max-new-tokens tokens (stops are ignored), so tokens/s compare
fairly. Each method runs once on a small warm-up first (the first eager flex_attention call traces).
It uses ONE torch thread by default: with a 135M model on CPU every step is many tiny ops, and
on a shared 2-core machine extra OpenMP threads mostly wait for each other, which hides the
differences between the methods. Pass --threads 0 for torch's default.

Example:
    python testing/benchmarks/bench_generation.py --model smollm2_135m_it --num-questions 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import constants  # noqa: E402  (sets HF_HOME before transformers is imported)
import dataset as ds  # noqa: E402
import utils  # noqa: E402

FIX = constants.FIXTURES_DIR


def load_questions(num_questions: int, num_paraphrases: int) -> tuple[str, list[list[str]]]:
    """Prefix and paraphrases of the first WebQA fixture questions."""
    qs = ds.load_paraphrase_dataset("webqa", "x", str(FIX / "webqa_test.jsonl"), str(FIX / "webqa_train.jsonl"),
                                    str(FIX / "webqa_paraphrases.jsonl"), max_samples=num_questions)
    return ds.prompt_prefix("webqa", qs.few_shot), [list(p)[:num_paraphrases] for p in qs.questions["paraphrases"]]


def methods(model, tokenizer, prefix: str, questions: Sequence[Sequence[str]], max_new: int, stops):
    """``{label: run()}``; each run returns ``(token ids per question, prefill tokens, forward tokens)``."""
    import flex_attention_generate as fg
    import generate

    n = len(questions[0])

    def earlier():
        outs = [fg.recompute_generate(model, tokenizer, prefix, ps, "attention", "contiguous", "avg", max_new,
                                      stop_ids=stops, ignore_stops=True) for ps in questions]
        prefill = sum(o.prefill_tokens for o in outs)
        forward = sum(o.prefill_tokens * max_new + max_new * (max_new - 1) // 2 for o in outs)
        return [o.token_ids for o in outs], prefill, forward

    def ensemble():
        prompts = [ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE))
                   for ps in questions for p in ps]
        ids = generate.ensemble_generate(model, tokenizer, prompts, n, "avg", max_new_tokens=max_new, stop_ids=stops,
                                         ignore_stops=True)
        prefill = sum(len(p) for p in prompts)
        return ids, prefill, prefill + len(prompts) * (max_new - 1)

    def flex(fusion: str):
        def run():
            outs = fg.flex_generate(model, tokenizer, prefix, questions, fusion, "shared", "avg", max_new,
                                    stop_ids=stops, ignore_stops=True)
            prefill = sum(o.prefill_tokens for o in outs)
            k = 1 if fusion == "attention" else n
            return [o.token_ids for o in outs], prefill, prefill + len(outs) * k * (max_new - 1)
        return run

    return {
        "(a) earlier: packed, full recompute": earlier,
        "(b) generate.py --method avg": ensemble,
        "(c) flex --fusion attention": flex("attention"),
        "(d) flex --fusion logits (avg)": flex("logits"),
    }


def timed(run: Callable) -> tuple[float, tuple]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=constants.DEFAULT_OFFLINE_MODEL)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--num-questions", type=int, default=3)
    parser.add_argument("--num-paraphrases", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 = torch's default (default: 1)")
    parser.add_argument("--check", action="store_true", help="exit with 1 when a goal is missed")
    args = parser.parse_args(argv)

    import torch

    import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = utils.load_model_and_tokenizer(args.model, args.device, dtype="float32")
    stops = generate.stop_token_ids(tokenizer, model.generation_config)
    prefix, questions = load_questions(args.num_questions, args.num_paraphrases)
    print(f"Model {args.model} on {model.device}, {torch.get_num_threads()} threads; {len(questions)} questions x "
          f"{args.num_paraphrases} paraphrases; {args.max_new_tokens} new tokens each (stops ignored).")

    warm = methods(model, tokenizer, prefix, questions[:1], 2, stops)
    for run in warm.values():
        run()
    rows, tokens = [], {}
    for label, run in methods(model, tokenizer, prefix, questions, args.max_new_tokens, stops).items():
        seconds, (ids, prefill, forward) = timed(run)
        tokens[label] = ids
        rows.append((label, seconds, len(questions) * args.max_new_tokens / seconds, prefill, forward))
        print(f"  {label}: {seconds:.2f} s")

    time_a, time_b, prefill_b = rows[0][1], rows[1][1], rows[1][3]
    header = f"| {'method':<38} | {'seconds':>7} | {'tok/s':>6} | {'prefill tok':>11} | {'forward tok':>11} | " \
             f"{'speed-up vs (a)':>15} | {'speed-up vs (b)':>15} |"
    print()
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, seconds, tps, prefill, forward in rows:
        print(f"| {label:<38} | {seconds:7.2f} | {tps:6.2f} | {prefill:11d} | {forward:11d} | "
              f"{time_a / seconds:14.2f}x | {time_b / seconds:14.2f}x |")
    labels = list(tokens)
    print(f"\n(d) tokens == (b) tokens: {tokens[labels[3]] == tokens[labels[1]]}")
    goals = {
        "(c) >= 5x faster than (a)": time_a / rows[2][1] >= 5,
        "(d) faster than (b)": rows[3][1] < time_b,
        "prefill tokens of (c) and (d) below (b)": rows[2][3] < prefill_b and rows[3][3] < prefill_b,
    }
    for goal, ok in goals.items():
        print(f"goal {goal}: {'met' if ok else 'MISSED'}")
    return 1 if args.check and not all(goals.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
