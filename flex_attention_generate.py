"""FlexAttention self-ensemble: all paraphrases of a question in ONE packed sequence (CLI).

How it works
------------
1. Packing (``pack_prompt``). The ids are built from the prompt pieces of dataset.py,
   never by decoding and re-tokenising: BOS (when the tokenizer uses one), the shared
   prefix (instruction + few-shot) once, then one segment per paraphrase
   (``Q: {paraphrase}``), then the answer cue ``\\nA:``. Every token gets a segment id
   and a position id; every piece gets a ``Segment(name, kind, start, end, segment_id)``.
2. Fusion.
   - ``attention``: a paraphrase sees the prefix and itself. One shared answer cue after
     all paraphrases sees everything, and so does every generated token (they belong
     to the cue segment). The first answer token already uses all paraphrases.
   - ``logits``: one stream per paraphrase: ``Q: {paraphrase}`` + its own ``\\nA:`` + its
     own generated tokens, all in one segment that sees the prefix and itself. Each step
     appends one token per stream in one forward call; the token comes from
     ``generate.combine_logits`` (``avg`` or ``max``). With shared positions each
     stream has exactly the ids and positions of its standalone prompt, so the result
     equals ``generate.py --method avg/max`` token for token.
3. Positions. ``shared`` (default): every paraphrase starts right after the prefix; the
   cue (attention fusion) continues after the LONGEST paraphrase; in logits fusion each
   stream continues from its own paraphrase. ``contiguous``: 0, 1, 2, ... over the pack
   (the earlier behaviour; it biases the answer toward later paraphrases). A generated
   token's position is the previous position of its segment + 1.
4. One mask source (``make_mask_mod``): ``visibility[seg[q], seg[kv]] & (kv <= q)``, with
   ``seg`` the per-token segment ids (indexed by the pack order = KV-cache index, padded
   with a pad segment to a multiple of 128) and ``visibility`` a small ``[S, S]`` bool
   table. The pad segment sees only itself, so no row is empty. The ``BlockMask``
   (``create_block_mask``) and the dense bool reference (``create_mask``) both come from
   it. Segment ids and positions of all future tokens are known in advance, so one
   ``mask_mod`` covers the whole generation; a decode step uses it with an offset
   (``q + kv_len``) and gets a mask for exactly ``q_len x kv_len``.
5. Attention. ``register_attention`` adds ``self_ensemble_flex`` to transformers'
   ``AttentionInterface``; the model is switched to it only inside ``flex_generate``.
   The BlockMask is built ONCE per forward and passed as ``attention_mask=``; it reaches
   the attention function untouched in every layer. A mask that is not a BlockMask
   raises (no silent causal fallback). CPU: eager ``flex_attention``. CUDA: compiled
   ``flex_attention`` (``self_ensemble_flex_compiled``) unless ``--no-compile``.
6. Decoding: one prefill over the (right-padded) packs of a batch of questions, then one
   forward per step over only the new tokens (1 per question for attention fusion, N for
   logits fusion) with a ``DynamicCache``, explicit ``position_ids`` and
   ``cache_position``. Each question stops at its own newline/EOS.

Breakpoint events
-----------------
``flex_generate(..., on_event=fn)`` calls ``fn(name, **state)``. With ``on_event=None``
nothing extra is computed (no dense mask, no top-k). Names and state keys:

- ``"tokenized"`` (once per question): ``index`` (question in the batch), ``question``
  (its paraphrases), ``packed`` (PackedPrompt), ``tokenizer``.
- ``"before_attention"`` (once per batch, before the prefill): ``block_mask``,
  ``mask_mod``, ``visibility`` ([S, S] bool), ``attn_implementation`` (name set on the
  model), ``dense_mask`` (a function: ``dense_mask()`` -> [B, 1, L, L] bool of the prefill),
  ``packed`` (list of PackedPrompt), ``input_ids``, ``position_ids``, ``segment_ids``
  ([B, L] prefill tensors, pads included), ``model``, ``tokenizer``.
- ``"decode_step"`` (per question and step, while the question runs): ``index``, ``step``,
  ``logits`` ([k, V] float, one row per stream; k = 1 for attention fusion),
  ``scores`` ([V], what argmax is taken over), ``topk_ids`` / ``topk_probs`` ([5]),
  ``token_id`` (int), ``token_text`` (str).
- ``"after_step"`` (per question, after each decode_step): ``index``, ``step``,
  ``generated`` (token ids so far), ``text`` (decoded so far), ``new_position_ids`` and
  ``new_segment_ids`` ([k], of the tokens just appended), ``kv_len`` (cache length after
  this step), ``finished`` (list[bool] for the batch), ``block_mask`` (the mask of this
  step's forward, or None when no forward was needed because the batch ended),
  ``mask_offset`` (its first query index).
- ``"final"`` (per question): ``index``, ``result`` (FlexResult), ``generation``,
  ``prediction``, ``token_ids``, ``timings`` (dict for the whole batch: prefill_s, decode_s, steps, batch_size).

Example:
    python flex_attention_generate.py --dataset webqa --model qwen2.5_3b_it --num-paraphrases 5 --fusion attention
"""

from __future__ import annotations

import argparse
import functools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from tqdm import tqdm

import constants
import dataset as ds
import generate
import utils

ATTN_NAME = "self_ensemble_flex"
ATTN_NAME_COMPILED = "self_ensemble_flex_compiled"
FUSIONS = ("attention", "logits")
POSITIONS = ("shared", "contiguous")
COMBINES = ("avg", "max")
BLOCK = 128  # torch 2.5.1 FlexAttention block size; lookup tensors are padded to a multiple of it
TOPK = 5
EVENTS = ("tokenized", "before_attention", "decode_step", "after_step", "final")

EventFn = Callable[..., None]


def round_up(n: int, multiple: int = BLOCK) -> int:
    return -(-n // multiple) * multiple


# --- packing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One piece of the pack: tokens ``[start, end)`` with segment id ``segment_id``."""

    name: str  # "prefix", "paraphrase 2", "cue" (attention fusion) or "cue 2" (logits fusion)
    kind: str  # "prefix" | "paraphrase" | "cue"
    start: int
    end: int
    segment_id: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class PackedPrompt:
    """The packed prompt of one question: ids, segment ids and positions per token, spans, visibility.

    ``visibility[a, b]`` is True when a token of segment ``a`` may attend to an earlier
    token of segment ``b``. The last segment id (``pad_segment``) is for padding.
    Generated tokens of stream ``i`` get segment ``stream_segments[i]`` and positions
    ``next_positions[i], next_positions[i] + 1, ...``.
    """

    input_ids: torch.Tensor  # [L] long
    segment_ids: torch.Tensor  # [L] long
    position_ids: torch.Tensor  # [L] long
    spans: tuple[Segment, ...]
    visibility: torch.Tensor  # [S, S] bool
    segment_names: tuple[str, ...]  # name of each segment id
    fusion: str
    positions: str
    read_index: tuple[int, ...]  # pack index whose logits give the first token, per stream
    next_positions: tuple[int, ...]  # position of the first generated token, per stream
    stream_segments: tuple[int, ...]  # segment id of generated tokens, per stream

    def __len__(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_streams(self) -> int:
        """Tokens appended per decode step: 1 (attention fusion) or N (logits fusion)."""
        return len(self.stream_segments)

    @property
    def pad_segment(self) -> int:
        return len(self.segment_names) - 1

    def generated_position_ids(self, step: int) -> torch.Tensor:
        """Positions of the tokens appended after the ``step``-th chosen token (step 0 = first)."""
        return torch.tensor([p + step for p in self.next_positions], dtype=torch.long)

    def generated_segment_ids(self) -> torch.Tensor:
        return torch.tensor(self.stream_segments, dtype=torch.long)

    def describe(self, tokenizer=None, tokens: bool = False) -> str:
        """Readable summary: spans with positions (and text), the visibility table, optionally every token."""
        lines = [f"PackedPrompt: fusion={self.fusion}, positions={self.positions}, {len(self)} tokens, "
                 f"{len(self.spans)} spans, {len(self.segment_names)} segments (last = pad)"]
        for s in self.spans:
            pos = self.position_ids[s.start:s.end]
            text = ""
            if tokenizer is not None:
                text = " " + repr(tokenizer.decode(self.input_ids[s.start:s.end].tolist()))
                text = text if len(text) < 70 else text[:66] + "...'"
            lines.append(f"  [{s.start:4d}, {s.end:4d}) seg {s.segment_id} {s.name:<13} "
                         f"positions {int(pos[0])}..{int(pos[-1])}{text}")
        for i, (seg, p) in enumerate(zip(self.stream_segments, self.next_positions)):
            lines.append(f"  generated stream {i}: segment {seg} ({self.segment_names[seg]}), first position {p}, "
                         f"logits read at pack index {self.read_index[i]}")
        width = max(len(n) for n in self.segment_names)
        lines.append("  visibility (row attends to column; causal inside):")
        lines.append("  " + " " * width + " " + " ".join(f"{i:>2}" for i in range(len(self.segment_names))))
        for i, name in enumerate(self.segment_names):
            row = " ".join(" x" if v else " ." for v in self.visibility[i].tolist())
            lines.append(f"  {name:>{width}} {row}   ({i})")
        if tokens:
            lines.append("  index  token_id  segment  position  text")
            for i, (t, sg, ps) in enumerate(zip(self.input_ids.tolist(), self.segment_ids.tolist(),
                                                self.position_ids.tolist())):
                text = repr(tokenizer.decode([t])) if tokenizer is not None else ""
                lines.append(f"  {i:5d}  {t:8d}  {sg:7d}  {ps:8d}  {text}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def make_visibility(num_paraphrases: int, fusion: str) -> torch.Tensor:
    """``[S, S]`` bool table. Ids: 0 prefix, 1..N paraphrases/streams, (N+1 cue), last = pad."""
    n = num_paraphrases
    size = n + 3 if fusion == "attention" else n + 2
    vis = torch.zeros(size, size, dtype=torch.bool)
    vis[0, 0] = True
    for i in range(1, n + 1):
        vis[i, 0] = vis[i, i] = True
    if fusion == "attention":
        vis[n + 1, : n + 2] = True  # the cue (and every generated token) sees everything
    vis[size - 1, size - 1] = True  # pad sees only pad: no empty rows
    return vis


def pack_prompt(tokenizer, prefix: str, paraphrases: Sequence[str], fusion: str = "attention",
                positions: str = "shared") -> PackedPrompt:
    """Pack ``prefix`` and the ``paraphrases`` of one question (token-exact, from pieces)."""
    if fusion not in FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}. Choose one of {FUSIONS}.")
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}. Choose one of {POSITIONS}.")
    if not paraphrases:
        raise ValueError("pack_prompt needs at least one paraphrase.")
    n = len(paraphrases)
    pieces: list[tuple[str, str, list[int], int]] = []  # (name, kind, ids, segment id)
    pieces.append(("prefix", "prefix", ds.bos_ids(tokenizer) + ds.encode_piece(tokenizer, prefix), 0))
    cue_ids = ds.encode_piece(tokenizer, ds.ANSWER_CUE)
    for i, p in enumerate(paraphrases):
        pieces.append((f"paraphrase {i}", "paraphrase", ds.encode_piece(tokenizer, ds.question_segment(p)), i + 1))
        if fusion == "logits":
            pieces.append((f"cue {i}", "cue", cue_ids, i + 1))
    if fusion == "attention":
        pieces.append(("cue", "cue", cue_ids, n + 1))
    if any(len(ids) == 0 for _, _, ids, _ in pieces):
        raise ValueError(f"An empty piece cannot be packed: {[name for name, _, ids, _ in pieces if not ids]}.")

    ids, segs, pos, spans = [], [], [], []
    prefix_len = len(pieces[0][2])
    seg_next: dict[int, int] = {}  # next shared position per segment
    longest = max(len(i) for name, kind, i, _ in pieces if kind == "paraphrase")
    for name, kind, piece, seg in pieces:
        start = len(ids)
        if positions == "contiguous":
            first = start
        elif kind == "prefix":
            first = 0
        elif fusion == "attention" and kind == "cue":
            first = prefix_len + longest
        else:
            first = seg_next.get(seg, prefix_len)
        ids += piece
        segs += [seg] * len(piece)
        pos += range(first, first + len(piece))
        seg_next[seg] = first + len(piece)
        spans.append(Segment(name, kind, start, len(ids), seg))

    cue_spans = [s for s in spans if s.kind == "cue"]
    if fusion == "attention":
        names = ("prefix", *[f"paraphrase {i}" for i in range(n)], "cue", "pad")
        stream_segments = (n + 1,)
    else:
        names = ("prefix", *[f"stream {i}" for i in range(n)], "pad")
        stream_segments = tuple(range(1, n + 1))
    return PackedPrompt(
        input_ids=torch.tensor(ids, dtype=torch.long),
        segment_ids=torch.tensor(segs, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        spans=tuple(spans),
        visibility=make_visibility(n, fusion),
        segment_names=names,
        fusion=fusion,
        positions=positions,
        read_index=tuple(s.end - 1 for s in cue_spans),
        next_positions=tuple(pos[s.end - 1] + 1 for s in cue_spans),
        stream_segments=stream_segments,
    )


# --- masks -----------------------------------------------------------------------


def make_mask_mod(segment_ids: torch.Tensor, visibility: torch.Tensor):
    """The one mask source: ``visibility[seg[b, q], seg[b, kv]] & (kv <= q)``.

    ``segment_ids`` is ``[B, T]`` (or ``[T]``) by pack order = KV-cache index, with ``T`` a
    multiple of 128 (torch 2.5.1 calls ``mask_mod`` with indices padded to 128).
    Causality is on the pack order, not on the position ids.
    """
    seg = segment_ids if segment_ids.dim() == 2 else segment_ids[None]
    if seg.shape[-1] % BLOCK:
        raise ValueError(f"segment_ids length {seg.shape[-1]} is not a multiple of {BLOCK}; pad it with the pad segment.")
    vis = visibility.to(seg.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return vis[seg[b, q_idx], seg[b, kv_idx]] & (kv_idx <= q_idx)

    return mask_mod


def offset_mask_mod(mask_mod, offset: int, device=None):
    """``mask_mod`` for queries that start at pack index ``offset`` (decoding with a cache)."""
    if offset == 0:
        return mask_mod
    # A tensor, not a Python int: dynamo guards on int constants, so an int would recompile
    # the eager flex_attention at every decode step (about 10x slower on CPU).
    shift = torch.tensor(offset, dtype=torch.long, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + shift, kv_idx)

    return shifted


def build_block_mask(mask_mod, batch: int, q_len: int, kv_len: int, device, offset: int = 0,
                     pad_to_blocks: bool = False):
    """BlockMask for queries ``[offset, offset + q_len)`` and keys ``[0, kv_len)``.

    ``pad_to_blocks`` (compiled path) builds it for lengths rounded up to 128 (queries
    only when ``q_len >= 128``); the attention function then pads q/k/v to match, so a
    compiled kernel sees few distinct shapes. Padded keys are after every real query,
    so causality hides them.
    """
    if pad_to_blocks:
        q_len = q_len if q_len < BLOCK else round_up(q_len)
        kv_len = round_up(kv_len)
    return create_block_mask(offset_mask_mod(mask_mod, offset, device), batch, None, q_len, kv_len, device=device)


def dense_mask(mask_mod, batch: int, q_len: int, kv_len: int, device, offset: int = 0) -> torch.Tensor:
    """``[B, 1, q_len, kv_len]`` bool mask from the same ``mask_mod`` (reference and pictures)."""
    return create_mask(offset_mask_mod(mask_mod, offset, device), batch, 1, q_len, kv_len, device=device)


# --- attention function ----------------------------------------------------------


def _check_block_mask(attention_mask) -> None:
    if not isinstance(attention_mask, BlockMask):
        raise TypeError(
            f"The self-ensemble FlexAttention got attention_mask of type {type(attention_mask).__name__}, "
            "not a BlockMask. Call the model with attention_mask=build_block_mask(...) (flex_generate does this), "
            "or switch the model back to 'sdpa' for plain generation."
        )


def flex_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager FlexAttention for transformers' AttentionInterface. Returns ``([B, L, H, D], None)``."""
    _check_block_mask(attention_mask)
    if dropout:
        raise ValueError("self_ensemble_flex is for inference only: call model.eval() (dropout must be 0).")
    out = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    print("Compiling flex_attention with torch.compile: the first call of each new shape compiles "
          "(lengths are padded to multiples of 128 to keep shapes few). Use --no-compile to turn it off.")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_forward_compiled(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                    **kwargs):
    """Compiled FlexAttention (CUDA). q/k/v are zero-padded to the BlockMask lengths."""
    _check_block_mask(attention_mask)
    if dropout:
        raise ValueError("self_ensemble_flex is for inference only: call model.eval() (dropout must be 0).")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    # torch 2.5.1 builds short queries (< 128) as one block but reports 128 rows in .shape: do not pad them.
    mask_q = q_len if q_len < BLOCK else attention_mask.shape[-2]
    mask_kv = attention_mask.shape[-1]
    if mask_q < q_len or mask_kv < kv_len:
        raise ValueError(f"BlockMask {mask_q}x{mask_kv} is smaller than the call {q_len}x{kv_len}. "
                         "Build it with build_block_mask(..., pad_to_blocks=True).")
    query = torch.nn.functional.pad(query, (0, 0, 0, mask_q - q_len))
    key = torch.nn.functional.pad(key, (0, 0, 0, mask_kv - kv_len))
    value = torch.nn.functional.pad(value, (0, 0, 0, mask_kv - kv_len))
    groups = query.shape[1] // key.shape[1]
    if groups & (groups - 1):
        # torch 2.5.1 compiled kernels need a power-of-2 number of query heads per KV head
        # (pytorch/pytorch#143117; SmolLM2 and Llama-3.2-3B have 3): repeat K/V instead.
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = _compiled_flex_attention()(query, key, value, block_mask=attention_mask, scale=scaling,
                                     enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :q_len].transpose(1, 2).contiguous(), None


def register_attention(compile: bool = False) -> str:
    """Register both attention functions with transformers (idempotent); return the name to use."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, flex_attention_forward)
    AttentionInterface.register(ATTN_NAME_COMPILED, flex_attention_forward_compiled)
    return ATTN_NAME_COMPILED if compile else ATTN_NAME


@contextmanager
def flex_attention_enabled(model, compile: bool = False):
    """Switch ``model`` to the self-ensemble FlexAttention; restore its attention afterwards."""
    if compile and model.device.type != "cuda":
        raise ValueError(f"Compiled flex_attention needs CUDA (model is on {model.device}); "
                         "torch 2.5.1 cannot compile it on CPU. Use compile=False / --no-compile.")
    name = register_attention(compile)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"Could not set attn_implementation={name!r} on {type(model).__name__} "
                           f"(it is {model.config._attn_implementation!r}). The model must use transformers' "
                           "AttentionInterface (Llama, Qwen2, Qwen3 do).")
    try:
        yield name
    finally:
        model.set_attn_implementation(previous)


# --- batch tables ----------------------------------------------------------------


@dataclass
class BatchTables:
    """Right-padded prefill ids and the segment / position of every cache index, for a batch of packs.

    Cache index ``length + step * k + i`` holds stream ``i``'s token appended after the
    ``step``-th chosen token (k tokens per step). ``segment_ids`` is padded to a multiple of 128.
    """

    input_ids: torch.Tensor  # [B, length]
    segment_ids: torch.Tensor  # [B, round_up(total)]
    position_ids: torch.Tensor  # [B, total]
    length: int  # prefill length (longest pack)
    k: int  # tokens appended per step
    visibility: torch.Tensor

    def mask_mod(self):
        return make_mask_mod(self.segment_ids, self.visibility)


def build_tables(packs: Sequence[PackedPrompt], pad_id: int, max_new_tokens: int, device) -> BatchTables:
    """Tables for decoding up to ``max_new_tokens`` tokens (pads sit in the pad segment, position 0)."""
    if not packs:
        raise ValueError("No questions to pack: the batch is empty.")
    k = packs[0].num_streams
    if any(p.num_streams != k or p.fusion != packs[0].fusion or not torch.equal(p.visibility, packs[0].visibility)
           for p in packs):
        raise ValueError("All packs of a batch need the same fusion and number of paraphrases.")
    batch, length = len(packs), max(len(p) for p in packs)
    appended = max(max_new_tokens - 1, 0)  # the last chosen token is never fed back
    total = length + appended * k
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    segment_ids = torch.full((batch, round_up(max(total, 1))), packs[0].pad_segment, dtype=torch.long)
    position_ids = torch.zeros((batch, total), dtype=torch.long)
    step_of_slot = torch.arange(appended).repeat_interleave(k)
    for b, p in enumerate(packs):
        n = len(p)
        input_ids[b, :n] = p.input_ids
        segment_ids[b, :n] = p.segment_ids
        position_ids[b, :n] = p.position_ids
        segment_ids[b, length:total] = p.generated_segment_ids().repeat(appended)
        position_ids[b, length:total] = torch.tensor(p.next_positions).repeat(appended) + step_of_slot
    return BatchTables(input_ids.to(device), segment_ids.to(device), position_ids.to(device), length, k,
                       packs[0].visibility.to(device))


# --- generation ------------------------------------------------------------------


@dataclass
class FlexResult:
    """What one question produced."""

    token_ids: list[int]  # generated ids, the stop token included (like generate.ensemble_generate)
    generation: str
    prediction: str
    prefill_tokens: int  # length of the packed prompt
    packed: PackedPrompt = field(repr=False)
    timings: dict = field(default_factory=dict)


def _combine(logits: torch.Tensor, fusion: str, combine: str) -> torch.Tensor:
    """``[B, k, V]`` stream logits -> ``[B, V]`` scores."""
    if fusion == "attention":
        return logits[:, 0]
    return generate.combine_logits(logits, combine)


def _probs(scores: torch.Tensor, fusion: str, combine: str) -> torch.Tensor:
    return scores if fusion == "logits" and combine == "max" else scores.softmax(-1)


def _validate(fusion: str, positions: str, combine: str) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"Unknown fusion {fusion!r}. Choose one of {FUSIONS}.")
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}. Choose one of {POSITIONS}.")
    if combine not in COMBINES:
        raise ValueError(f"Unknown combine {combine!r}. Choose one of {COMBINES}.")


def _finish(tokenizer, ids: list[int], pack: PackedPrompt, timings: dict) -> FlexResult:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return FlexResult(ids, text, utils.extract_answer(text), len(pack), pack, dict(timings))


def flex_generate(model, tokenizer, prefix: str, paraphrases_per_question: Sequence[Sequence[str]],
                  fusion: str = "attention", positions: str = "shared", combine: str = "avg",
                  max_new_tokens: int = constants.MAX_NEW_TOKENS, on_event: EventFn | None = None,
                  compile: bool = False, stop_ids: torch.Tensor | None = None,
                  ignore_stops: bool = False) -> list[FlexResult]:
    """Greedy self-ensemble answers for a batch of questions (one packed sequence each).

    ``prefix`` is the shared instruction + few-shot text (``dataset.prompt_prefix``);
    ``paraphrases_per_question[q]`` the paraphrases of question ``q`` (same count for all).
    ``combine`` is used by logits fusion only. ``ignore_stops`` always decodes
    ``max_new_tokens`` tokens (benchmarks). See the module docstring for ``on_event``.
    """
    from transformers import DynamicCache

    _validate(fusion, positions, combine)
    device = model.device
    stop_set = set((generate.stop_token_ids(tokenizer, model.generation_config) if stop_ids is None
                    else stop_ids).tolist())
    packs = [pack_prompt(tokenizer, prefix, ps, fusion, positions) for ps in paraphrases_per_question]
    if on_event:
        for b, (pack, ps) in enumerate(zip(packs, paraphrases_per_question)):
            on_event("tokenized", index=b, question=list(ps), packed=pack, tokenizer=tokenizer)
    tables = build_tables(packs, tokenizer.pad_token_id, max_new_tokens, device)
    batch, length, k = len(packs), tables.length, tables.k
    mask_mod = tables.mask_mod()
    read = torch.tensor([p.read_index for p in packs], device=device)  # [B, k]
    keep = torch.unique(read)  # logits only where they are read
    column = torch.searchsorted(keep, read)

    generated: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    timings = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "batch_size": batch}  # for the whole batch
    with flex_attention_enabled(model, compile) as attn_name, torch.inference_mode():
        start = time.perf_counter()
        block_mask = build_block_mask(mask_mod, batch, length, length, device, pad_to_blocks=compile)
        mask_s = time.perf_counter() - start  # the prefill time counts the mask, not the callback
        if on_event:
            on_event("before_attention", block_mask=block_mask, mask_mod=mask_mod, visibility=tables.visibility,
                     attn_implementation=attn_name,
                     dense_mask=lambda: dense_mask(mask_mod, batch, length, length, device),
                     packed=packs, input_ids=tables.input_ids, position_ids=tables.position_ids[:, :length],
                     segment_ids=tables.segment_ids[:, :length], model=model, tokenizer=tokenizer)
        start = time.perf_counter() - mask_s
        cache = DynamicCache()
        out = model(input_ids=tables.input_ids, attention_mask=block_mask, position_ids=tables.position_ids[:, :length],
                    cache_position=torch.arange(length, device=device), past_key_values=cache, use_cache=True,
                    logits_to_keep=keep)
        logits = out.logits.float().gather(1, column[..., None].expand(-1, -1, out.logits.shape[-1]))  # [B, k, V]
        timings["prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        kv_len = length
        for step in range(max_new_tokens):
            scores = _combine(logits, fusion, combine)
            tokens = scores.argmax(dim=-1)
            token_list = tokens.tolist()
            active = [b for b in range(batch) if not finished[b]]
            if on_event:
                probs = _probs(scores, fusion, combine)
                top = probs.topk(TOPK, dim=-1)
                for b in active:
                    on_event("decode_step", index=b, step=step, logits=logits[b], scores=scores[b],
                             topk_ids=top.indices[b], topk_probs=top.values[b], token_id=token_list[b],
                             token_text=tokenizer.decode([token_list[b]]))
            for b in active:
                generated[b].append(token_list[b])
                finished[b] = not ignore_stops and token_list[b] in stop_set
            timings["steps"] = step + 1
            block_mask, offset = None, kv_len
            if not all(finished) and step < max_new_tokens - 1:
                block_mask = build_block_mask(mask_mod, batch, k, kv_len + k, device, offset=kv_len,
                                              pad_to_blocks=compile)
                out = model(input_ids=tokens[:, None].expand(batch, k), attention_mask=block_mask,
                            position_ids=tables.position_ids[:, kv_len:kv_len + k],
                            cache_position=torch.arange(kv_len, kv_len + k, device=device),
                            past_key_values=cache, use_cache=True)
                logits = out.logits.float()
                kv_len += k
            if on_event:
                for b in active:
                    on_event("after_step", index=b, step=step, generated=list(generated[b]),
                             text=tokenizer.decode(generated[b]),
                             new_position_ids=tables.position_ids[b, offset:offset + k] if block_mask is not None
                             else tables.position_ids[b, :0],
                             new_segment_ids=tables.segment_ids[b, offset:offset + k] if block_mask is not None
                             else tables.segment_ids[b, :0],
                             kv_len=kv_len, finished=list(finished), block_mask=block_mask, mask_offset=offset)
            if block_mask is None:
                break
        timings["decode_s"] = time.perf_counter() - start
    results = [_finish(tokenizer, ids, pack, timings) for ids, pack in zip(generated, packs)]
    if on_event:
        for b, r in enumerate(results):
            on_event("final", index=b, result=r, generation=r.generation, prediction=r.prediction,
                     token_ids=r.token_ids, timings=r.timings)
    return results


def recompute_generate(model, tokenizer, prefix: str, paraphrases: Sequence[str], fusion: str = "attention",
                       positions: str = "shared", combine: str = "avg",
                       max_new_tokens: int = constants.MAX_NEW_TOKENS, stop_ids: torch.Tensor | None = None,
                       ignore_stops: bool = False, attn_implementation: str | None = None) -> FlexResult:
    """Reference and baseline: ONE question, no KV cache; every step runs the whole pack again.

    This is the earlier approach (full recompute each step), with the same pack and mask.
    ``attn_implementation="sdpa"`` (or ``"eager"``) runs the dense mask from ``create_mask``
    instead of the BlockMask through FlexAttention.
    """
    _validate(fusion, positions, combine)
    device = model.device
    stop_set = set((generate.stop_token_ids(tokenizer, model.generation_config) if stop_ids is None
                    else stop_ids).tolist())
    pack = pack_prompt(tokenizer, prefix, paraphrases, fusion, positions)
    tables = build_tables([pack], tokenizer.pad_token_id, max_new_tokens, device)
    mask_mod, k = tables.mask_mod(), tables.k
    read = list(pack.read_index)
    ids = tables.input_ids
    generated: list[int] = []
    start = time.perf_counter()
    with attention_implementation(model, attn_implementation), torch.inference_mode():
        for step in range(max_new_tokens):
            n = ids.shape[1]
            if attn_implementation is None:
                mask = build_block_mask(mask_mod, 1, n, n, device)
            else:
                mask = reference_mask(mask_mod, 1, n, n, device, attn_implementation, model.dtype)
            out = model(input_ids=ids, attention_mask=mask, position_ids=tables.position_ids[:, :n], use_cache=False)
            logits = out.logits[:, read].float()  # [1, k, V]
            token = int(_combine(logits, fusion, combine).argmax(dim=-1))
            generated.append(token)
            if not ignore_stops and token in stop_set:
                break
            read = list(range(n, n + k))
            ids = torch.cat([ids, torch.full((1, k), token, dtype=torch.long, device=device)], dim=1)
    return _finish(tokenizer, generated, pack, {"prefill_s": 0.0, "decode_s": time.perf_counter() - start,
                                                "steps": len(generated)})


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> float additive mask: 0 where visible, the dtype's minimum where hidden (for ``eager``)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def reference_mask(mask_mod, batch: int, q_len: int, kv_len: int, device, attn_implementation: str,
                   dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    """Dense 4-D mask for a non-flex attention: bool for ``sdpa``, additive float (0 / min) for ``eager``."""
    mask = dense_mask(mask_mod, batch, q_len, kv_len, device, offset)
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        return additive_mask(mask, dtype)
    raise ValueError(f"No dense reference mask for {attn_implementation!r}; use 'sdpa' or 'eager'.")


def packed_logits(model, tokenizer, packs: Sequence[PackedPrompt], attn_implementation: str | None = None,
                  pad_to_blocks: bool = False) -> torch.Tensor:
    """Logits ``[B, L, V]`` of one forward over the right-padded packs (no cache).

    ``attn_implementation``: None = FlexAttention with the BlockMask; ``"sdpa"`` / ``"eager"`` =
    the same model with the dense mask from ``create_mask`` (the reference path);
    ``ATTN_NAME_COMPILED`` with ``pad_to_blocks=True`` = the compiled path's padding.
    """
    device = model.device
    tables = build_tables(packs, tokenizer.pad_token_id, 1, device)
    mask_mod, batch, n = tables.mask_mod(), len(packs), tables.length
    if attn_implementation in (None, ATTN_NAME, ATTN_NAME_COMPILED):
        mask = build_block_mask(mask_mod, batch, n, n, device, pad_to_blocks=pad_to_blocks)
    else:
        mask = reference_mask(mask_mod, batch, n, n, device, attn_implementation, model.dtype)
    with attention_implementation(model, attn_implementation), torch.inference_mode():
        out = model(input_ids=tables.input_ids, attention_mask=mask, position_ids=tables.position_ids[:, :n],
                    use_cache=False)
    return out.logits.float()


@contextmanager
def attention_implementation(model, attn_implementation: str | None):
    """Run ``model`` with FlexAttention (None) or another implementation (``sdpa``/``eager`` references); restore it."""
    if attn_implementation is None:
        with flex_attention_enabled(model) as name:
            yield name
        return
    register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn_implementation)
    try:
        yield attn_implementation
    finally:
        model.set_attn_implementation(previous)


# --- CLI -------------------------------------------------------------------------


def method_name(fusion: str, combine: str) -> str:
    return "flex_attention" if fusion == "attention" else f"flex_logits_{combine}"


def output_name(fusion: str, positions: str, n: int, combine: str) -> str:
    name = f"flex_{fusion}_{positions}_n{n}"
    return name + f"_{combine}" if fusion == "logits" else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("Breakpoint events")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    utils.add_common_args(parser)
    utils.add_generation_args(parser)
    parser.add_argument("--num-paraphrases", type=int, default=constants.NUM_PARAPHRASES,
                        help="use the first N paraphrases (default: %(default)s)")
    parser.add_argument("--indexs", help="comma list of paraphrase indices, like 0,2,4 (overrides --num-paraphrases)")
    parser.add_argument("--fusion", choices=FUSIONS, default="attention",
                        help="attention: shared answer cue sees all paraphrases; logits: exact logit ensemble in one pack")
    parser.add_argument("--positions", choices=POSITIONS, default="shared",
                        help="shared: every paraphrase starts after the prefix; contiguous: 0..L-1 over the pack")
    parser.add_argument("--combine", choices=COMBINES, default="avg", help="logits fusion: avg of logits or max of probs")
    parser.add_argument("--no-compile", action="store_true", help="on CUDA, run flex_attention eagerly (CPU always does)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    constants.configure_cache(args.cache_dir)
    start = time.time()
    indexs = generate.parse_indexs(args.indexs) or list(range(args.num_paraphrases))
    n = len(indexs)
    name = output_name(args.fusion, args.positions, n, args.combine)
    output = Path(args.output or utils.default_output("results", args.dataset, args.model, name, args.cache_dir))
    results = utils.ResumableResults(output, args.overwrite)
    qs = ds.load_paraphrase_dataset(args.dataset, args.model, args.data_file, args.fewshot_file, args.paraphrase_file,
                                    args.cache_dir, args.max_samples, args.seed)
    todo = qs.questions[~qs.questions["uuid"].isin(results.done)]

    utils.set_seed(args.seed)
    model, tokenizer = utils.load_model_and_tokenizer(args.model, args.device, cache_dir=args.cache_dir)
    compile = model.device.type == "cuda" and not args.no_compile
    if model.device.type != "cuda":
        print("FlexAttention runs eagerly on CPU (torch 2.5.1 cannot compile it there).")
    stops = generate.stop_token_ids(tokenizer, model.generation_config)
    prefix = ds.prompt_prefix(args.dataset, qs.few_shot)
    method = method_name(args.fusion, args.combine)
    for batch in tqdm(list(ds.batched(todo.to_dict("records"), args.batch_size)), desc=method, unit="batch"):
        paras = [ds.select_paraphrases(row["paraphrases"], indexs, n) for row in batch]
        outs = flex_generate(model, tokenizer, prefix, paras, args.fusion, args.positions, args.combine,
                             args.max_new_tokens, compile=compile, stop_ids=stops)
        rows = [generate.result_row(row["uuid"], row["answers"], ps, [ds.build_prompt(args.dataset, qs.few_shot, p)
                                                                      for p in ps],
                                    out.generation, method, args.model, fusion=args.fusion, positions=args.positions,
                                    num_paraphrases=n, prefill_tokens=out.prefill_tokens, paraphrase_index=-1)
                for row, ps, out in zip(batch, paras, outs)]
        results.add(rows)
    utils.print_summary(results.finish(), start, output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
