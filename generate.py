"""Per-prompt answers and logit ensembles over paraphrases (CLI).

``per_prompt`` answers each paraphrase on its own. The ensembles decode the N
paraphrase prompts of a question in lock-step; at each step the N next-token
logits are combined into one choice, and that token is appended to all N streams:

- ``avg``: mean of the logits
- ``max``: max over paraphrases of the probabilities
- ``weighted_avg``: confidence-weighted mean of the logits
- ``weighted_max``: logits of the most confident paraphrase

One prefill per batch, then incremental decoding with a KV cache. Each question
stops at its own newline or EOS.

Example:
    python generate.py --dataset webqa --model qwen2.5_3b_it --method avg --num-ensemble 5
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

METHOD_HELP = "per_prompt: each paraphrase alone; avg/max/weighted_avg/weighted_max: logit ensembles"


# --- decoding ------------------------------------------------------------------


def stop_token_ids(tokenizer, generation_config=None):
    """Ids that end an answer: EOS ids and every token whose text contains a newline."""
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = {i for i, text in enumerate(pieces) if "\n" in text}
    eos = [tokenizer.eos_token_id]
    if generation_config is not None and generation_config.eos_token_id is not None:
        extra = generation_config.eos_token_id
        eos += extra if isinstance(extra, list) else [extra]
    ids.update(e for e in eos if e is not None)
    return torch.tensor(sorted(ids), dtype=torch.long)


def combine_logits(logits, method: str, weights=None):
    """Combine per-paraphrase next-token logits ``[B, N, V]`` into scores ``[B, V]``.

    ``weights`` ``[B, N]`` are the confidences for the weighted methods.
    """
    if method == "per_prompt":
        if logits.shape[1] != 1:
            raise ValueError(f"per_prompt decodes one paraphrase per stream, got {logits.shape[1]}.")
        return logits[:, 0]
    if method == "avg":
        return logits.mean(dim=1)
    if method == "max":
        return logits.softmax(dim=-1).max(dim=1).values
    if method not in ("weighted_avg", "weighted_max"):
        raise ValueError(f"Unknown method {method!r}. Choose one of {constants.METHODS}.")
    if weights is None:
        raise ValueError(f"{method} needs confidences (weights). Run confidence.py first.")
    weights = weights.to(logits.device, logits.dtype)
    if (weights.sum(dim=1) <= 0).any():
        raise ValueError(f"{method}: all confidences of a question are 0, so the weights are undefined. "
                         "Use --method avg or max for such data, or recompute confidence.py with more samples.")
    if method == "weighted_avg":
        return (weights.unsqueeze(-1) * logits).sum(dim=1) / weights.sum(dim=1, keepdim=True)
    best = weights.argmax(dim=1)
    return logits[range(logits.shape[0]), best]


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int):
    """``(input_ids, attention_mask)`` with left padding."""
    length = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), length), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, length - len(p):] = 1
    return ids, mask


def ensemble_generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], group_size: int, method: str,
                      weights=None, max_new_tokens: int = constants.MAX_NEW_TOKENS, stop_ids=None,
                      ignore_stops: bool = False) -> list[list[int]]:
    """Greedy decoding of ``len(prompt_ids) // group_size`` questions, ``group_size`` prompts each.

    Consecutive prompts form one question; the question's next token comes from
    ``combine_logits`` over its prompts and is appended to each of them. Returns the
    generated ids per question, the stop token included. ``ignore_stops`` decodes
    ``max_new_tokens`` tokens always (for benchmarks).
    """
    from transformers import DynamicCache

    if len(prompt_ids) % group_size:
        raise ValueError(f"{len(prompt_ids)} prompts do not split into groups of {group_size}.")
    device = model.device
    n_questions = len(prompt_ids) // group_size
    stop_ids = (stop_token_ids(tokenizer, model.generation_config) if stop_ids is None else stop_ids).to(device)
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    generated = torch.empty((n_questions, 0), dtype=torch.long, device=device)
    finished = torch.zeros(n_questions, dtype=torch.bool, device=device)
    step_ids = input_ids
    with torch.inference_mode():
        for step in range(max_new_tokens):
            past = cache.get_seq_length()
            out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(past, past + step_ids.shape[1], device=device))
            logits = out.logits[:, -1].float().view(n_questions, group_size, -1)
            token = combine_logits(logits, method, weights).argmax(dim=-1)
            token = torch.where(finished, tokenizer.pad_token_id, token)
            generated = torch.cat([generated, token[:, None]], dim=1)
            if not ignore_stops:
                finished |= torch.isin(token, stop_ids)
                if finished.all():
                    break
            step_ids = token.repeat_interleave(group_size)[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            position_ids = position_ids[:, -1:] + 1
    return [trim_generation(row, stop_ids, ignore_stops) for row in generated.tolist()]


def trim_generation(ids: list[int], stop_ids, ignore_stops: bool = False) -> list[int]:
    """Cut the ids after the first stop token (kept)."""
    if ignore_stops:
        return ids
    stops = set(stop_ids.tolist())
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


# --- result rows -----------------------------------------------------------------


def result_row(uuid: str, answers: Sequence[str], paraphrases: Sequence[str], prompts: Sequence[str],
               generation: str, method: str, model: str, **extra) -> dict:
    """One result row with the prediction and its score (columns: constants.RESULT_COLUMNS + extra)."""
    prediction = utils.extract_answer(generation)
    predict_lemma, answer_lemmas, correct = utils.score_prediction(prediction, answers)
    return {
        "uuid": str(uuid), "answers": list(answers), "paraphrases": list(paraphrases), "prompts": list(prompts),
        "prediction": prediction, "generation": generation, "predict_lemma": predict_lemma,
        "answer_lemmas": answer_lemmas, "correct": bool(correct), "method": method, "model": model, **extra,
    }


def parse_indexs(text: str | None) -> list[int] | None:
    """``"0,2,4"`` -> ``[0, 2, 4]``."""
    if not text:
        return None
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError as err:
        raise SystemExit(f"--indexs must be a comma list of integers, like 0,2,4 (got {text!r}).") from err


def load_confidences(path: str | Path, uuids: Sequence[str], indexs: Sequence[int], model: str, dataset: str) -> dict:
    """``uuid -> [confidence of each selected paraphrase]`` from a confidence.py file."""
    command = f"python confidence.py --dataset {dataset} --model {model} --output {path}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"Confidence file {path} does not exist. Create it with:\n  {command}")
    table = ds.validate_columns(ds.read_table(path), ("uuid", "confidences"), str(path))
    conf = {str(u): list(c) for u, c in zip(table["uuid"], table["confidences"])}
    missing = [u for u in uuids if u not in conf]
    if missing:
        raise ValueError(f"{path} has no confidences for {len(missing)} questions (first: {missing[0]}). Run:\n  {command}")
    too_few = min((len(conf[u]) for u in uuids), default=len(indexs))
    if max(indexs) >= too_few:
        raise ValueError(f"{path} has confidences for {too_few} paraphrases, but index {max(indexs)} was asked. "
                         f"Run:\n  {command} --num-paraphrases {max(indexs) + 1} --overwrite")
    return {u: [conf[u][i] for i in indexs] for u in uuids}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(parser)
    utils.add_generation_args(parser)
    parser.add_argument("--method", choices=constants.METHODS, default="avg", help=METHOD_HELP)
    parser.add_argument("--num-ensemble", type=int, default=constants.NUM_PARAPHRASES,
                        help="use the first N paraphrases (default: %(default)s)")
    parser.add_argument("--indexs", help="comma list of paraphrase indices, like 0,2,4 (overrides --num-ensemble)")
    parser.add_argument("--confidence-file", help="confidence.py output for weighted methods (default: in the cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    constants.configure_cache(args.cache_dir)
    start = time.time()
    indexs = parse_indexs(args.indexs) or list(range(args.num_ensemble))
    n = len(indexs)
    output = Path(args.output or utils.default_output("results", args.dataset, args.model, f"{args.method}_n{n}", args.cache_dir))
    results = utils.ResumableResults(output, args.overwrite)
    qs = ds.load_paraphrase_dataset(args.dataset, args.model, args.data_file, args.fewshot_file, args.paraphrase_file,
                                    args.cache_dir, args.max_samples, args.seed)
    todo = qs.questions[~qs.questions["uuid"].isin(results.done)]
    weights = None
    if args.method.startswith("weighted"):
        path = args.confidence_file or utils.default_output("results", args.dataset, args.model, "confidence", args.cache_dir)
        weights = load_confidences(path, list(todo["uuid"]), indexs, args.model, args.dataset)

    utils.set_seed(args.seed)
    model, tokenizer = utils.load_model_and_tokenizer(args.model, args.device, cache_dir=args.cache_dir)
    stops = stop_token_ids(tokenizer, model.generation_config)
    prefix = ds.prompt_prefix(args.dataset, qs.few_shot)
    per_prompt = args.method == "per_prompt"
    for batch in tqdm(list(ds.batched(todo.to_dict("records"), args.batch_size)), desc=args.method, unit="batch"):
        paras = [ds.select_paraphrases(row["paraphrases"], indexs, n) for row in batch]
        pieces = [[(prefix, ds.question_segment(p), ds.ANSWER_CUE) for p in ps] for ps in paras]
        prompt_ids = [ds.encode_prompt(tokenizer, pc) for q in pieces for pc in q]
        batch_weights = None
        if weights is not None:
            batch_weights = torch.tensor([weights[row["uuid"]] for row in batch], dtype=torch.float32)
        outputs = ensemble_generate(model, tokenizer, prompt_ids, 1 if per_prompt else n, args.method,
                                    batch_weights, args.max_new_tokens, stops)
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        rows = []
        for q, (row, ps, pcs) in enumerate(zip(batch, paras, pieces)):
            prompts = ["".join(pc) for pc in pcs]
            if per_prompt:
                rows += [result_row(row["uuid"], row["answers"], [p], [prompt], texts[q * n + i], args.method,
                                    args.model, num_paraphrases=1, paraphrase_index=indexs[i])
                         for i, (p, prompt) in enumerate(zip(ps, prompts))]
            else:
                rows.append(result_row(row["uuid"], row["answers"], ps, prompts, texts[q], args.method, args.model,
                                       num_paraphrases=n, paraphrase_index=-1))
        results.add(rows)
    utils.print_summary(results.finish(), start, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
