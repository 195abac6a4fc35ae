"""Generate WebQA paraphrases with the model (CLI).

Each question gets ``--num-paraphrases`` paraphrases from a few-shot prompt
(``dataset.paraphrase_prompt``). Sampling: temperature 1.5, top-p 0.9, 30 new
tokens; the first non-empty line is kept. Round ``r`` uses seed ``--seed + r``,
so the paraphrases of one question differ. The output is the paraphrase file that
generate.py and confidence.py read. MyriadLAMA needs no such file: its templates
are already paraphrases.

Example:
    python paraphrase.py --dataset webqa --model qwen2.5_3b_it
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import constants
import dataset as ds
import utils
from generate import left_pad, stop_token_ids

TEMPERATURE = 1.5
TOP_P = 0.9
MAX_NEW_TOKENS = 30


def generate_paraphrases(model, tokenizer, questions: Sequence[str], num_paraphrases: int, seed: int,
                         temperature: float = TEMPERATURE, top_p: float = TOP_P,
                         max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[str]]:
    """``num_paraphrases`` sampled paraphrases per question (one batched ``generate`` per round)."""
    prompt_ids = [ds.encode_prompt(tokenizer, [ds.paraphrase_prompt(q)]) for q in questions]
    input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    stop_ids = stop_token_ids(tokenizer, model.generation_config).tolist()  # only the first line is kept
    paraphrases: list[list[str]] = [[] for _ in questions]
    for round_ in range(num_paraphrases):
        utils.set_seed(seed + round_)
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature,
                top_p=top_p, top_k=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
            )
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        for row, text in zip(paraphrases, texts):
            row.append(utils.extract_answer(text))
    return paraphrases


def count_problems(question: str, paraphrases: Sequence[str]) -> tuple[int, int]:
    """``(empty, duplicate)``: duplicates repeat the question or an earlier paraphrase (case-insensitive)."""
    seen = {question.strip().lower()}
    empty = duplicate = 0
    for p in paraphrases:
        key = p.strip().lower()
        if not key:
            empty += 1
        elif key in seen:
            duplicate += 1
        seen.add(key)
    return empty, duplicate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(parser)
    parser.add_argument("--num-paraphrases", type=int, default=constants.NUM_PARAPHRASES,
                        help="paraphrases per question (default: %(default)s)")
    parser.add_argument("--fewshot-file", help="WebQA train file; only decides which rows are questions "
                        "(without it, 5 rows of --data-file are few-shot examples and get no paraphrases)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per batch (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset != "webqa":
        raise SystemExit("paraphrase.py is for --dataset webqa only. "
                         "MyriadLAMA already has paraphrases (its manual and automatic templates).")
    constants.configure_cache(args.cache_dir)
    start = time.time()
    output = Path(args.output or ds.paraphrase_path(args.model, args.cache_dir))
    results = utils.ResumableResults(output, args.overwrite)
    questions = ds.load_questions(args.dataset, args.data_file, args.fewshot_file, args.cache_dir, args.seed).questions
    if args.max_samples is not None:
        questions = questions.head(args.max_samples)
    todo = questions[~questions["uuid"].isin(results.done)].to_dict("records")
    print(f"Paraphrasing {len(todo)} questions ({len(questions) - len(todo)} already done) -> {output}")

    model, tokenizer = utils.load_model_and_tokenizer(args.model, args.device, cache_dir=args.cache_dir)
    for batch in tqdm(list(ds.batched(todo, args.batch_size)), desc="paraphrase", unit="batch"):
        generated = generate_paraphrases(model, tokenizer, [r["question"] for r in batch], args.num_paraphrases, args.seed)
        results.add([{"uuid": r["uuid"], "question": r["question"], "paraphrases": p, "model": args.model}
                     for r, p in zip(batch, generated)])
    df = results.finish()
    empty = duplicate = 0
    for question, paraphrases in zip(df["question"], df["paraphrases"]):
        e, d = count_problems(question, list(paraphrases))
        empty, duplicate = empty + e, duplicate + d
    if empty or duplicate:
        print(f"WARN: {empty} empty and {duplicate} duplicate paraphrases (kept) in {len(df)} questions.")
    utils.print_summary(df, start, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
