"""Per-paraphrase confidence by sampling agreement (CLI).

For each paraphrase prompt: the greedy answer (generate.ensemble_generate,
``per_prompt``) and ``--num-samples`` sampled answers (temperature ``--temperature``,
no top-k / top-p). Confidence = share of samples whose lemma sequence equals the
greedy answer's lemma sequence. An empty greedy answer has confidence 0.

The weighted methods of generate.py read this file (``--confidence-file``).

Example:
    python confidence.py --dataset webqa --model qwen2.5_3b_it --num-samples 10
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
from generate import ensemble_generate, left_pad, stop_token_ids


def confidence_score(greedy_answer: str, sampled_answers: Sequence[str]) -> float:
    """Share of ``sampled_answers`` with the same lemma sequence as ``greedy_answer`` (0.0 when it is empty)."""
    if not sampled_answers:
        raise ValueError("confidence_score needs at least one sampled answer (--num-samples >= 1).")
    greedy = utils.lemmatize(greedy_answer)
    if not greedy:
        return 0.0
    return sum(utils.lemmatize(s) == greedy for s in sampled_answers) / len(sampled_answers)


def greedy_answers(model, tokenizer, prompt_ids: Sequence[Sequence[int]], stop_ids: torch.Tensor,
                   max_new_tokens: int = constants.MAX_NEW_TOKENS) -> list[str]:
    """Greedy answer (first non-empty line) of each prompt."""
    outputs = ensemble_generate(model, tokenizer, prompt_ids, 1, "per_prompt", None, max_new_tokens, stop_ids)
    return [utils.extract_answer(tokenizer.decode(o, skip_special_tokens=True)) for o in outputs]


def sample_answers(model, tokenizer, prompt_ids: Sequence[Sequence[int]], num_samples: int, temperature: float,
                   stop_ids: torch.Tensor, max_new_tokens: int = constants.MAX_NEW_TOKENS) -> list[list[str]]:
    """``num_samples`` sampled answers (first non-empty line) per prompt; each stops at a newline or EOS."""
    input_ids, attention_mask = (t.to(model.device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature,
            top_k=0, top_p=1.0, repetition_penalty=1.0, num_return_sequences=num_samples,
            max_new_tokens=max_new_tokens, eos_token_id=stop_ids.tolist(), pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    answers = [utils.extract_answer(t) for t in texts]
    return [answers[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(parser)
    utils.add_generation_args(parser, batch_size=4)
    parser.add_argument("--num-samples", type=int, default=10, help="sampled answers per paraphrase (default: %(default)s)")
    parser.add_argument("--num-paraphrases", type=int, default=constants.NUM_PARAPHRASES,
                        help="score the first N paraphrases of each question (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.num_paraphrases < 1:
        raise SystemExit("--num-samples and --num-paraphrases must be at least 1.")
    constants.configure_cache(args.cache_dir)
    start = time.time()
    output = Path(args.output or utils.default_output("results", args.dataset, args.model, "confidence", args.cache_dir))
    results = utils.ResumableResults(output, args.overwrite)
    qs = ds.load_paraphrase_dataset(args.dataset, args.model, args.data_file, args.fewshot_file, args.paraphrase_file,
                                    args.cache_dir, args.max_samples, args.seed)
    todo = qs.questions[~qs.questions["uuid"].isin(results.done)].to_dict("records")

    utils.set_seed(args.seed)
    model, tokenizer = utils.load_model_and_tokenizer(args.model, args.device, cache_dir=args.cache_dir)
    stops = stop_token_ids(tokenizer, model.generation_config)
    prefix = ds.prompt_prefix(args.dataset, qs.few_shot)
    n = args.num_paraphrases
    for batch in tqdm(list(ds.batched(todo, args.batch_size)), desc="confidence", unit="batch"):
        paras = [ds.select_paraphrases(row["paraphrases"], None, n) for row in batch]
        prompt_ids = [ds.encode_prompt(tokenizer, (prefix, ds.question_segment(p), ds.ANSWER_CUE))
                      for ps in paras for p in ps]
        greedy = greedy_answers(model, tokenizer, prompt_ids, stops, args.max_new_tokens)
        samples = sample_answers(model, tokenizer, prompt_ids, args.num_samples, args.temperature, stops,
                                 args.max_new_tokens)
        scores = [confidence_score(g, s) for g, s in zip(greedy, samples)]
        results.add([{"uuid": row["uuid"], "paraphrases": ps, "greedy_answers": greedy[q * n:(q + 1) * n],
                      "confidences": scores[q * n:(q + 1) * n], "model": args.model}
                     for q, (row, ps) in enumerate(zip(batch, paras))])
    utils.print_summary(results.finish(), start, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
