"""Readable views of the FlexAttention pipeline, for debugging.

Every ``inspect_*`` function prints its text and also returns it (``echo=False`` only
returns it), so tests can check what a user sees. The functions take plain tensors,
lists and strings; they do not need the engine.

The debugging scripts observe ``flex_attention_generate.flex_generate`` only through its
breakpoint events (``on_event(name, **state)``); ``EventLog`` records them and times the
engine without the time spent in the debugging code.

Main parts:
- ``inspect_step``: a banner with the shape, dtype and first values of each tensor.
- ``inspect_tokenization`` / ``inspect_concatenation``: tokens, pieces, positions, segments, spans.
- ``inspect_attention_mask``: the mask as a character grid with segment labels, its
  sparsity, the BlockMask summary, and a PNG picture with the segment borders.
- ``reference_attention`` + ``inspect_generation_step``: top-k tokens, the chosen token,
  and the share of attention mass per segment from a dense eager reference forward.
- ``save_debug_info``: ``summary.json``, tensors (``.pt``), mask pictures and ``report.md``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 78
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
TENSOR_DIR = "tensors"
DEFAULT_DEBUG_DIR = ROOT / "outputs" / "debug"

# A range of token indices with a label: (label, start, end), end excluded.
Range = tuple[str, int, int]


def _emit(text: str, echo: bool) -> str:
    if echo:
        print(text, flush=True)
    return text


def banner(title: str, char: str = "=") -> str:
    """Three-line banner around ``title``."""
    line = char * WIDTH
    return f"{line}\n{title}\n{line}"


# --- values ------------------------------------------------------------------------


def _short_list(values: list, max_values: int) -> str:
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else repr(v) for v in values[:max_values])
    return f"[{shown}{', ...' if len(values) > max_values else ''}]"


def describe_value(value: Any, max_values: int = 8) -> str:
    """One line: a tensor's shape, dtype, device and first values; else the type and a short repr."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)[:max_values].cpu()
        first = flat.tolist() if flat.dtype != torch.bool else [int(v) for v in flat.tolist()]
        more = value.numel() > max_values
        text = f"Tensor shape={tuple(value.shape)} dtype={value.dtype} device={value.device} first="
        return text + _short_list(first + (["..."] if more else []), max_values + 1).replace("'...'", "...")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} len={len(value)} {_short_list(list(value), max_values)}"
    if isinstance(value, dict):
        return f"dict keys={list(value)[:max_values]}"
    if isinstance(value, str):
        return f"str len={len(value)} {value[:60]!r}{'...' if len(value) > 60 else ''}"
    text = repr(value).splitlines()[0] if repr(value) else ""
    return f"{type(value).__name__} {text[:70]}"


def inspect_step(step_name: str, echo: bool = True, **kwargs: Any) -> str:
    """Banner with ``step_name`` and one line per keyword argument (see ``describe_value``)."""
    width = max([len(k) for k in kwargs] + [4])
    lines = [banner(f"STEP: {step_name}")]
    lines += [f"  {name:<{width}}  {describe_value(value)}" for name, value in kwargs.items()]
    return _emit("\n".join(lines), echo)


# --- tokens and spans ----------------------------------------------------------------


def _as_list(values) -> list:
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).cpu().tolist()
    return list(values)


def token_pieces(tokenizer, ids: Iterable[int]) -> list[str]:
    """The text of each token decoded alone (``repr`` shows spaces and newlines)."""
    return [tokenizer.decode([int(i)]) for i in ids]


def as_ranges(spans: Iterable) -> list[Range]:
    """Spans (objects with ``name, start, end`` or tuples ``(name, start, end)``) -> ranges."""
    out = []
    for s in spans:
        out.append((s.name, int(s.start), int(s.end)) if hasattr(s, "start") else (str(s[0]), int(s[1]), int(s[2])))
    return out


def ranges_from_segment_ids(segment_ids, segment_names: Sequence[str] | None = None) -> list[Range]:
    """Consecutive runs of equal segment ids -> ranges labelled with the segment name (or ``seg N``)."""
    ids = _as_list(segment_ids)
    out: list[Range] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            seg = ids[start]
            label = segment_names[seg] if segment_names is not None and seg < len(segment_names) else f"seg {seg}"
            out.append((label, start, i))
            start = i
    return out


def span_problems(spans: Iterable, length: int) -> list[str]:
    """Why ``spans`` do not tile ``[0, length)`` exactly (empty list = they do)."""
    ranges = sorted(as_ranges(spans), key=lambda r: (r[1], r[2]))
    problems = []
    at = 0
    for name, start, end in ranges:
        if end <= start:
            problems.append(f"span {name!r} is empty or reversed: [{start}, {end})")
        if start > at:
            problems.append(f"gap: tokens [{at}, {start}) belong to no span (before {name!r})")
        elif start < at:
            problems.append(f"overlap: span {name!r} starts at {start}, but the previous span ends at {at}")
        at = max(at, end)
    if at != length:
        problems.append(f"the spans end at {at}, but the sequence has {length} tokens")
    return problems


def inspect_tokenization(input_ids, tokenizer=None, position_ids=None, segment_ids=None, attention_mask=None,
                         segment_names: Sequence[str] | None = None, spans: Iterable | None = None,
                         max_rows: int | None = 40, title: str = "Tokenization", echo: bool = True) -> str:
    """Table of tokens: index, id, text piece, segment, position (, attention mask); then the text per segment.

    ``max_rows`` shows the first and last rows of long sequences (``None`` = all).
    """
    ids = [int(i) for i in _as_list(input_ids)]
    pieces = token_pieces(tokenizer, ids) if tokenizer is not None else [""] * len(ids)
    columns = {"segment": _as_list(segment_ids), "position": _as_list(position_ids), "attn_mask": _as_list(attention_mask)}
    columns = {k: v for k, v in columns.items() if v}
    for name, values in columns.items():
        if len(values) != len(ids):
            raise ValueError(f"{name} has {len(values)} values but input_ids has {len(ids)}.")
    head = f"{'index':>5}  {'token_id':>8}  " + "".join(f"{k:>9}  " for k in columns) + "text"
    rows = []
    for i, (t, p) in enumerate(zip(ids, pieces)):
        seg = columns.get("segment")
        label = ""
        if seg is not None and segment_names is not None and seg[i] < len(segment_names):
            label = f" ({segment_names[seg[i]]})"
        rows.append(f"{i:>5}  {t:>8}  " + "".join(f"{int(v[i]):>9}  " for v in columns.values()) + repr(p) + label)
    if max_rows is not None and len(rows) > max_rows:
        half = max_rows // 2
        rows = rows[:half] + [f"  ... {len(rows) - 2 * half} rows not shown ..."] + rows[-half:]
    lines = [banner(title), f"{len(ids)} tokens", head, *rows]
    ranges = as_ranges(spans) if spans is not None else (
        ranges_from_segment_ids(segment_ids, segment_names) if segment_ids is not None else [])
    if ranges and tokenizer is not None:
        lines.append("Text of each segment (decoded from its own tokens):")
        lines += [f"  {name:<14} [{start:>4}, {end:>4})  {tokenizer.decode(ids[start:end])!r}" for name, start, end in ranges]
    return _emit("\n".join(lines), echo)


def inspect_concatenation(input_ids, spans: Iterable, tokenizer=None, echo: bool = True) -> str:
    """How the pieces are joined: each span, its first and last tokens, the borders, and the tiling check."""
    ids = [int(i) for i in _as_list(input_ids)]
    ranges = as_ranges(spans)

    def tok(i: int) -> str:
        return f"{ids[i]}={tokenizer.decode([ids[i]])!r}" if tokenizer is not None else str(ids[i])

    lines = [banner("Concatenation: prefix + paraphrases + answer cue"),
             f"{'span':<14} {'tokens':>12} {'len':>4}  first token ... last token"]
    for name, start, end in ranges:
        if end > start:
            lines.append(f"{name:<14} [{start:>4}, {end:>4}) {end - start:>4}  {tok(start)} ... {tok(end - 1)}")
        else:
            lines.append(f"{name:<14} [{start:>4}, {end:>4}) {end - start:>4}  (empty)")
    lines.append("Borders (last token of a span | first token of the next span):")
    for (a, _, a_end), (b, b_start, _) in zip(ranges, ranges[1:]):
        if 0 < a_end <= len(ids) and b_start < len(ids):
            lines.append(f"  {a} | {b}: {tok(a_end - 1)} | {tok(b_start)}")
    problems = span_problems(ranges, len(ids))
    if problems:
        lines += ["PROBLEM: the spans do not tile the sequence:"] + [f"  - {p}" for p in problems]
    else:
        lines.append(f"OK: the {len(ranges)} spans tile [0, {len(ids)}) with no gap and no overlap.")
    return _emit("\n".join(lines), echo)


# --- attention mask ------------------------------------------------------------------


def _square(mask) -> torch.Tensor:
    """[L, L] bool from [L, L], [1, L, L] or [B, H, L, L] (first batch and head)."""
    mask = torch.as_tensor(mask).detach().cpu()
    while mask.dim() > 2:
        mask = mask[0]
    return mask.bool()


def _codes(n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return [letters[i] if i < 26 else f"{letters[i // 26 - 1]}{letters[i % 26]}" for i in range(n)]


def _cells(ranges: Sequence[Range], length: int, max_cells: int, min_cells: int = 3) -> list[list[tuple[int, int]]]:
    """Cells per range: one per token when short, else each range split proportionally (at least ``min_cells``)."""
    out = []
    for _, start, end in ranges:
        n = end - start
        count = n if length <= max_cells else min(n, max(min_cells, round(n * max_cells / length)))
        edges = [start + round(j * n / count) for j in range(count + 1)] if count else [start]
        out.append([(a, b) for a, b in zip(edges, edges[1:]) if b > a])
    return out


def mask_stats(mask) -> dict:
    """Visible pairs, total pairs, sparsity (hidden share of all pairs) and hidden share of the causal pairs."""
    m = _square(mask)
    n_q, n_kv = m.shape
    visible = int(m.sum())
    causal = torch.ones(n_q, n_kv, dtype=torch.bool).tril(n_kv - n_q)
    causal_visible = int((m & causal).sum())
    return {
        "shape": [n_q, n_kv], "visible": visible, "total": n_q * n_kv,
        "sparsity": 1 - visible / (n_q * n_kv), "causal_pairs": int(causal.sum()),
        "hidden_causal_share": 1 - causal_visible / max(int(causal.sum()), 1),
        "visible_above_diagonal": visible - causal_visible,
    }


def mask_grid(mask, ranges: Sequence[Range], max_cells: int = 64, max_rows: int = 24) -> str:
    """The square mask as characters: ``#`` all visible, ``+`` partly visible, ``.`` hidden.

    Rows are queries, columns keys, both grouped by ``ranges`` (letters in the header, ``|``
    and ``-`` between groups). Long ranges are downsampled (about ``max_cells`` columns and
    ``max_rows`` rows in all; each range keeps at least 3 cells).
    """
    m = _square(mask)
    row_ranges = list(ranges)
    length = m.shape[1]
    codes = _codes(len(ranges))
    col_cells = _cells(ranges, length, max_cells)
    row_cells = _cells(row_ranges, length, max_rows)
    label_width = max(len(n) for n, _, _ in row_ranges) + 2
    header = " " * label_width + "|".join(c[: len(cells)].ljust(len(cells)) for c, cells in zip(codes, col_cells))
    rule = " " * label_width + "+".join("-" * len(cells) for cells in col_cells)
    lines = [header, rule]
    for (name, _, _), cells in zip(row_ranges, row_cells):
        for j, (a, b) in enumerate(cells):
            chunks = []
            for group in col_cells:
                chars = ""
                for c, d in group:
                    block = m[a:b, c:d]
                    share = float(block.float().mean()) if block.numel() else 0.0
                    chars += "#" if share == 1.0 else "." if share == 0.0 else "+"
                chunks.append(chars)
            label = name if j == 0 else ""
            lines.append(f"{label:<{label_width}}" + "|".join(chunks))
        lines.append(rule)
    legend = ", ".join(f"{c}={n}" for c, (n, _, _) in zip(codes, ranges))
    lines.append(f"columns (keys): {legend}")
    lines.append("rows = queries. # = all visible, + = partly visible (causal edge), . = hidden")
    if length > max_rows:
        lines.append(f"(downsampled: {length} tokens in about {max_cells} columns and {max_rows} rows; "
                     "a cell is a group of tokens)")
    return "\n".join(lines)


def block_mask_summary(block_mask) -> str:
    """Shape, block size, block counts and block sparsity of a FlexAttention ``BlockMask``."""
    if block_mask is None:
        return "BlockMask: none"
    partial = int(block_mask.kv_num_blocks.sum())
    full = int(block_mask.full_kv_num_blocks.sum()) if block_mask.full_kv_num_blocks is not None else 0
    b, h, q_len, kv_len = block_mask.shape
    bq, bkv = block_mask.BLOCK_SIZE
    total = b * h * math.ceil(q_len / bq) * math.ceil(kv_len / bkv)
    return (f"BlockMask: shape={tuple(block_mask.shape)} (lengths padded to the block size), "
            f"BLOCK_SIZE={tuple(block_mask.BLOCK_SIZE)}, blocks: {full} full + {partial} partial "
            f"of {total}, block sparsity {block_mask.sparsity():.1f}% (blocks skipped). "
            "Inside partial blocks the mask_mod decides each pair.")


def save_mask_png(mask, ranges: Sequence[Range], path: str | Path, title: str = "Attention mask") -> Path:
    """PNG of the mask: visible pairs coloured by the key's range, hidden pairs white, borders and labels.

    When the first range (the prefix) is long, a second panel zooms on the rest.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    m = _square(mask).numpy()
    n_q, n_kv = m.shape
    key_range = np.zeros(n_kv, dtype=int)
    for i, (_, start, end) in enumerate(ranges):
        key_range[start:end] = i
    image = np.where(m, key_range[None, :] + 1, 0)
    colours = plt.get_cmap("tab10" if len(ranges) <= 10 else "tab20")
    palette = ["#ffffff"] + [colours(i % colours.N) for i in range(len(ranges))]
    cmap = ListedColormap(palette)
    first = ranges[0] if ranges else ("", 0, 0)
    zoom = n_q == n_kv and len(ranges) > 2 and (first[2] - first[1]) > n_kv / 3
    panels = [(0, n_kv, "whole sequence")]
    if zoom:
        panels.append((first[2], n_kv, f"zoom: after the {first[0]} (its columns not shown)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 7.5), squeeze=False)
    for ax, (lo, hi, label) in zip(axes[0], panels):
        ax.imshow(image[lo:hi, lo:hi] if n_q == n_kv else image, cmap=cmap, vmin=0, vmax=len(palette) - 1,
                  interpolation="nearest", extent=(lo - 0.5, hi - 0.5, hi - 0.5, lo - 0.5) if n_q == n_kv else None)
        inside = [(n, max(s, lo), min(e, hi)) for n, s, e in ranges if e > lo and s < hi]
        for _, start, _ in inside[1:]:
            ax.axvline(start - 0.5, color="black", linewidth=0.8)
            if n_q == n_kv:
                ax.axhline(start - 0.5, color="black", linewidth=0.8)
        ticks = [(s + e - 1) / 2 for _, s, e in inside]
        names = [n for n, _, _ in inside]
        ax.set_xticks(ticks, names, rotation=90, fontsize=8)
        if n_q == n_kv:
            ax.set_yticks(ticks, names, fontsize=8)
        ax.set_xlabel("keys (attended to)")
        ax.set_ylabel("queries (attending)")
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"{title}\ncolour = visible (by key segment), white = hidden", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def inspect_attention_mask(mask, ranges: Sequence[Range], block_mask=None, png_path: str | Path | None = None,
                           max_cells: int = 64, max_rows: int = 24,
                           title: str = "Attention mask (rows = queries, columns = keys)",
                           echo: bool = True) -> str:
    """Character grid with segment labels, sparsity, the BlockMask summary, and the PNG path (when written)."""
    m = _square(mask)
    ranges = list(ranges)
    stats = mask_stats(m)
    lines = [banner(title), mask_grid(m, ranges, max_cells, max_rows)]
    lines.append(f"Visible pairs: {stats['visible']} of {stats['total']} (sparsity {stats['sparsity']:.1%}). "
                 f"Hidden among causal pairs: {stats['hidden_causal_share']:.1%}. "
                 f"Visible above the diagonal (must be 0): {stats['visible_above_diagonal']}.")
    if block_mask is not None:
        lines.append(block_mask_summary(block_mask))
    if png_path is not None:
        lines.append(f"Picture: {save_mask_png(m, ranges, png_path, title.split(' (')[0])}")
    return _emit("\n".join(lines), echo)


# --- attention shares (dense eager reference) -------------------------------------------


def key_labels(packed, length: int) -> list[str]:
    """Label of every key index: the span name for the prompt, ``generated`` (or ``generated i`` per stream) after it."""
    labels = [""] * length
    for name, start, end in as_ranges(packed.spans):
        labels[start:end] = [name] * (end - start)
    k = packed.num_streams
    for i in range(len(packed), length):
        labels[i] = "generated" if k == 1 else f"generated {(i - len(packed)) % k}"
    return labels


def attention_shares(weights: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    """Sum of the attention weights ``[L]`` of one query per label (labels in first-seen order)."""
    out: dict[str, float] = {}
    values = weights.detach().float().cpu().tolist()
    for label, w in zip(labels, values):
        out[label] = out.get(label, 0.0) + w
    return out


@dataclass
class AttentionReference:
    """Result of the dense eager reference forward for one decode step of one question."""

    step: int
    query_index: list[int]  # key index of each stream's current token
    labels: list[str]  # label of every key index
    weights: torch.Tensor  # [k, L] attention of each current token, mean over the chosen layers and heads
    layer_weights: torch.Tensor  # [layers, k, L] the same, per layer (mean over heads)
    logits: torch.Tensor  # [k, V] float, from the reference forward
    mask: torch.Tensor  # [L, L] bool dense mask used
    layers: str  # "all" or the layer index

    @property
    def shares(self) -> list[dict[str, float]]:
        """Share of attention mass per label, one dict per stream."""
        return [attention_shares(w, self.labels) for w in self.weights]

    def layer_shares(self, stream: int = 0) -> list[dict[str, float]]:
        """Share per label in each layer, for one stream."""
        return [attention_shares(w[stream], self.labels) for w in self.layer_weights]


def reference_attention(model, packed, generated: Sequence[int], step: int, layer: int | None = None,
                        query_index: Sequence[int] | None = None) -> AttentionReference:
    """Re-run one question at decode step ``step`` without FlexAttention and read its attention.

    The sequence is the pack plus the tokens chosen before ``step`` (each appended once per
    stream). Segment and position ids come from the engine's own ``build_tables`` and the
    dense mask from its ``mask_mod`` (``dense_mask``). The forward uses ``eager`` attention
    with the float additive version of that mask and ``output_attentions=True``.
    ``query_index`` (default: the rows whose logits choose the token of ``step``) picks the rows.
    """
    import flex_attention_generate as fag

    device = model.device
    k = packed.num_streams
    tables = fag.build_tables([packed], 0, step + 1, device)
    chosen = [int(t) for t in list(generated)[:step]]
    if len(chosen) < step:
        raise ValueError(f"Step {step} needs the {step} tokens chosen before it, got {len(chosen)}.")
    ids = torch.cat([packed.input_ids.to(device),
                     torch.tensor([t for t in chosen for _ in range(k)], dtype=torch.long, device=device)])[None]
    length = ids.shape[1]
    dense = fag.dense_mask(tables.mask_mod(), 1, length, length, device)
    if query_index is None:
        query_index = list(packed.read_index) if step == 0 else [len(packed) + (step - 1) * k + i for i in range(k)]
    rows = torch.tensor(list(query_index), device=device)
    with fag.attention_implementation(model, "eager"), torch.inference_mode():
        out = model(input_ids=ids, attention_mask=fag.additive_mask(dense, model.dtype),
                    position_ids=tables.position_ids[:, :length], use_cache=False, output_attentions=True,
                    logits_to_keep=rows)
    if not out.attentions:
        raise RuntimeError("The model returned no attention weights with output_attentions=True under eager attention.")
    per_layer = torch.stack([a[0, :, rows].float().mean(dim=0) for a in out.attentions]).cpu()  # [layers, k, L]
    weights = per_layer.mean(dim=0) if layer is None else per_layer[layer]
    return AttentionReference(step, list(query_index), key_labels(packed, length), weights, per_layer,
                              out.logits[0].float().cpu(), dense[0, 0].cpu(), "all" if layer is None else str(layer))


def format_layer_shares(reference: AttentionReference, stream: int = 0) -> str:
    """Table: attention share per segment in every layer (one stream)."""
    rows = reference.layer_shares(stream)
    names = list(rows[0])
    width = max(12, *(len(n) + 1 for n in names))
    lines = [f"Attention share per layer (stream {stream}, mean over heads):",
             "layer " + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{i:>5} " + "".join(f"{r.get(n, 0.0):>{width}.3f}" for n in names) for i, r in enumerate(rows)]
    return "\n".join(lines)


def inspect_generation_step(tokenizer, step: int, token_id: int, topk_ids, topk_probs, logits=None,
                            stream_names: Sequence[str] | None = None, reference: AttentionReference | None = None,
                            engine_logits=None, tolerance: float = 1e-3, top_k: int = 5, question: int | None = None,
                            echo: bool = True) -> str:
    """Top-k tokens with probabilities, the chosen token, per-stream top-k (logits fusion) and attention shares.

    ``topk_ids``/``topk_probs`` are what the engine chose from. ``logits`` ``[k, V]`` are the
    stream logits (k > 1 for logits fusion). ``reference`` adds the attention shares per
    segment; ``engine_logits`` compared with ``reference.logits`` shows that the reference
    applies the same mask as the engine (``tolerance``: see ``logits_tolerance``).
    """
    where = f"question {question}, " if question is not None else ""
    lines = [banner(f"Generation step {step} ({where}chosen token {token_id} = {tokenizer.decode([token_id])!r})", "-")]
    ids, probs = _as_list(topk_ids)[:top_k], _as_list(topk_probs)[:top_k]
    lines.append("Top-k of the combined scores (what argmax is taken over):")
    for rank, (t, p) in enumerate(zip(ids, probs), 1):
        mark = "  <- chosen" if int(t) == int(token_id) else ""
        lines.append(f"  {rank}. {int(t):>7} {tokenizer.decode([int(t)])!r:<18} p={p:.4f}{mark}")
    if logits is not None and torch.as_tensor(logits).dim() == 2 and torch.as_tensor(logits).shape[0] > 1:
        lg = torch.as_tensor(logits).float()
        lines.append("Per stream (softmax of each stream's own logits):")
        for i, row in enumerate(lg.softmax(-1)):
            top = row.topk(min(top_k, row.numel()))
            name = stream_names[i] if stream_names else f"stream {i}"
            cells = ", ".join(f"{tokenizer.decode([int(t)])!r} {float(p):.3f}" for p, t in zip(top.values, top.indices))
            lines.append(f"  {name:<13} {cells}")
    if reference is not None:
        lines.append(f"Attention of the current token per segment (eager reference, layers: {reference.layers}, "
                     "mean over heads):")
        shares = reference.shares
        names = list(shares[0])
        head = "".join(f"{('stream ' + str(i)) if len(shares) > 1 else 'share':>11}" for i in range(len(shares)))
        lines.append(f"  {'segment':<14}{head}")
        for name in names:
            lines.append(f"  {name:<14}" + "".join(f"{s.get(name, 0.0):>11.4f}" for s in shares))
        lines.append(f"  {'sum':<14}" + "".join(f"{sum(s.values()):>11.4f}" for s in shares))
        first = reference.labels[0] if reference.labels else "?"
        sink = reference.weights[:, 0]
        lines.append(f"  (key 0, the first {first} token, alone takes {', '.join(f'{float(v):.3f}' for v in sink)}; "
                     "a large value there is an 'attention sink', common in trained models)")
        if engine_logits is not None:
            diff = (torch.as_tensor(engine_logits).float().cpu() - reference.logits).abs().max().item()
            lines.append(f"  Reference logits vs engine logits: max abs diff {diff:.2e} "
                         f"({'OK: same mask and model' if diff <= tolerance else f'PROBLEM: more than {tolerance:g}'})")
    return _emit("\n".join(lines), echo)


# --- saving --------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def save_debug_info(folder: str | Path, summary: dict, tensors: dict[str, torch.Tensor] | None = None,
                    masks: Sequence[tuple[str, Any, Sequence[Range], str]] = (),
                    sections: Sequence[tuple[str, str]] = (), echo: bool = True) -> str:
    """Write a debug folder: ``summary.json``, ``tensors/<name>.pt``, mask PNGs and ``report.md``.

    ``masks``: ``(file name, mask, ranges, title)`` per picture. ``sections``: ``(title, text)``
    of the printed views; ``report.md`` holds them as code blocks after the summary.
    Returns (and prints) the list of written files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, tensor in (tensors or {}).items():
        path = folder / TENSOR_DIR / f"{name}.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else tensor, path)
        written.append(path)
    pictures = [save_mask_png(mask, ranges, folder / file, title) for file, mask, ranges, title in masks]
    written += pictures
    summary = {**summary, "files": [str(p.relative_to(folder)) for p in written] + [SUMMARY_FILE, REPORT_FILE]}
    (folder / SUMMARY_FILE).write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    report = [f"# Debug report: {summary.get('title', 'FlexAttention run')}", ""]
    report += [f"- **{k}**: {v}" for k, v in summary.items() if isinstance(v, (str, int, float, bool)) and k != "title"]
    report += ["", "Pictures:", ""] + [f"![{p.stem}]({p.name})" for p in pictures]
    for title, text in sections:
        report += ["", f"## {title}", "", "```text", text.rstrip(), "```"]
    (folder / REPORT_FILE).write_text("\n".join(report) + "\n")
    written += [folder / SUMMARY_FILE, folder / REPORT_FILE]
    lines = [f"Debug information written to {folder}:"] + [f"  {p.relative_to(folder)}" for p in written]
    return _emit("\n".join(lines), echo)


# --- events --------------------------------------------------------------------------


@dataclass
class Event:
    name: str
    state: dict
    engine_s: float  # engine time (debugging time excluded) since EventLog.start()


class EventLog:
    """``on_event`` callback that records every event, calls ``handler(name, state)``, and times the engine.

    The time spent inside the callback (printing, reference forwards, waiting for keys) is
    not counted in the engine clock, so ``timings()`` measure the engine only.
    """

    def __init__(self, handler: Callable[[str, dict], None] | None = None):
        self.events: list[Event] = []
        self.handler = handler
        self._start = time.perf_counter()
        self._callback_s = 0.0

    def start(self) -> None:
        self._start, self._callback_s = time.perf_counter(), 0.0

    def engine_time(self) -> float:
        return time.perf_counter() - self._start - self._callback_s

    def __call__(self, name: str, **state: Any) -> None:
        enter = time.perf_counter()
        self.events.append(Event(name, state, self.engine_time()))
        try:
            if self.handler is not None:
                self.handler(name, state)
        finally:
            self._callback_s += time.perf_counter() - enter

    @property
    def callback_s(self) -> float:
        return self._callback_s

    def of(self, name: str, index: int | None = None) -> list[Event]:
        """Events called ``name`` (of question ``index`` when given)."""
        return [e for e in self.events if e.name == name and (index is None or e.state.get("index") == index)]

    def order(self) -> list[str]:
        """Event names in order, repeats collapsed (tokenized, before_attention, decode_step, ...)."""
        out: list[str] = []
        for e in self.events:
            if not out or out[-1] != e.name:
                out.append(e.name)
        return out

    def generated_before(self, index: int, step: int) -> list[int]:
        """Token ids chosen for question ``index`` before ``step``."""
        return [e.state["token_id"] for e in self.of("decode_step", index) if e.state["step"] < step]

    def timings(self) -> dict:
        """Engine seconds: tokenize, mask, prefill, each decode step, total (debugging time excluded)."""
        first = {}
        for e in self.events:
            key = (e.name, e.state.get("step")) if e.name in ("decode_step", "after_step") else (e.name, None)
            first.setdefault(key, e.engine_s)
        out: dict[str, Any] = {}
        if ("tokenized", None) in first:
            out["tokenize_s"] = first[("tokenized", None)]
        if ("before_attention", None) in first and "tokenize_s" in out:
            out["mask_s"] = first[("before_attention", None)] - out["tokenize_s"]
        steps = sorted(s for (n, s) in first if n == "decode_step")
        end = first.get(("final", None))
        if steps and ("before_attention", None) in first:
            out["prefill_s"] = first[("decode_step", steps[0])] - first[("before_attention", None)]
        marks = [first[("decode_step", s)] for s in steps] + ([end] if end is not None else [])
        out["decode_steps_s"] = [b - a for a, b in zip(marks, marks[1:])]
        if end is not None:
            out["engine_total_s"] = end
        out["debug_callbacks_s"] = self._callback_s
        return out


def format_timings(timings: dict, load_s: float | None = None, total_s: float | None = None) -> str:
    """Readable timing table."""
    lines = ["Timings (engine time; time spent in the debugging code is not counted):"]
    if load_s is not None:
        lines.append(f"  {'load model + tokenizer':<28} {load_s:8.2f} s")
    names = {"tokenize_s": "tokenize (pack)", "mask_s": "mask (tables + BlockMask)", "prefill_s": "prefill forward"}
    for key, label in names.items():
        if key in timings:
            lines.append(f"  {label:<28} {timings[key]:8.2f} s")
    for i, s in enumerate(timings.get("decode_steps_s", [])):
        lines.append(f"  {'decode step ' + str(i):<28} {s:8.2f} s")
    if "engine_total_s" in timings:
        lines.append(f"  {'engine total':<28} {timings['engine_total_s']:8.2f} s")
    lines.append(f"  {'debugging code (excluded)':<28} {timings.get('debug_callbacks_s', 0.0):8.2f} s")
    if total_s is not None:
        lines.append(f"  {'script total (wall clock)':<28} {total_s:8.2f} s")
    return "\n".join(lines)


# --- where to put IDE breakpoints --------------------------------------------------------


@dataclass(frozen=True)
class EventLocation:
    """Where ``flex_attention_generate.py`` fires one event."""

    event: str
    function: str
    call_line: int  # the on_event("<event>", ...) call (runs only with a callback)
    guard_line: int  # the ``if on_event:`` line above it (runs every time)
    path: Path

    def describe(self) -> str:
        rel = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return (f"  {rel}:{self.guard_line}  (`if on_event:` in {self.function}(); stops on every run)\n"
                f"  {rel}:{self.call_line}  (the on_event(\"{self.event}\", ...) call; runs only with a callback, "
                "as in the debugging scripts)")


def find_event_lines(path: str | Path | None = None) -> dict[str, EventLocation]:
    """Locate each ``on_event("<name>", ...)`` call of the engine by reading its source (``ast``)."""
    if path is None:
        import flex_attention_generate as fag

        path = inspect.getsourcefile(fag)
    path = Path(path).resolve()
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, EventLocation] = {}
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        guards = [n for n in ast.walk(func) if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                  and n.test.id == "on_event"]
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "on_event"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                name = node.args[0].value
                guard = [g for g in guards if g.lineno <= node.lineno <= g.end_lineno]
                found.setdefault(name, EventLocation(name, func.name, node.lineno,
                                                     guard[-1].lineno if guard else node.lineno, path))
    return found


# --- shared command line and data for the debugging scripts ----------------------------------


def add_debug_args(parser: argparse.ArgumentParser, default_output: Path,
                   max_samples: int | None = None) -> argparse.ArgumentParser:
    """Flags of the debugging scripts (same names as the project's CLIs).

    ``max_samples=None`` leaves out ``--max-samples`` and ``--num-paraphrases`` (fixed sizes).
    """
    import constants
    import flex_attention_generate as fag

    parser.add_argument("--model", default=constants.DEFAULT_OFFLINE_MODEL,
                        help="registry name, hub id, local folder or embedded model (default: %(default)s)")
    parser.add_argument("--dataset", choices=sorted(constants.DATASETS), default="webqa")
    parser.add_argument("--data-file", help="local file in the hub schema (default: the fixture file of --dataset)")
    parser.add_argument("--fewshot-file", help="WebQA train file for the few-shot examples "
                        "(default: the fixture train file when the fixture questions are used)")
    parser.add_argument("--paraphrase-file", help="WebQA paraphrase file (default: the fixture paraphrases with the "
                        "fixture questions, else the cache file of --model)")
    parser.add_argument("--hub", action="store_true", help="read the questions from the hub (or its cache), not the fixtures")
    if max_samples is not None:
        parser.add_argument("--max-samples", type=int, default=max_samples, help="questions (default: %(default)s)")
        parser.add_argument("--num-paraphrases", type=int, default=constants.NUM_PARAPHRASES,
                            help="paraphrases per question (default: %(default)s)")
    parser.add_argument("--fusion", choices=fag.FUSIONS, default="attention")
    parser.add_argument("--positions", choices=fag.POSITIONS, default="shared")
    parser.add_argument("--combine", choices=fag.COMBINES, default="avg", help="logits fusion only")
    parser.add_argument("--max-new-tokens", type=int, default=constants.MAX_NEW_TOKENS)
    parser.add_argument("--layer", type=int, help="attention shares of this layer only (default: mean of all layers)")
    parser.add_argument("--output-dir", default=str(default_output), help="debug folder (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-compile", action="store_true", help="on CUDA, run flex_attention eagerly (CPU always does)")
    parser.add_argument("--cache-dir",
                        help="cache root (default: $SELF_ENSEMBLE_CACHE, the cluster folder, or ~/.cache/self-ensemble)")
    parser.add_argument("--seed", type=int, default=constants.SEED)
    return parser


@dataclass
class DebugData:
    """Questions for a debugging run."""

    dataset: str
    prefix: str
    questions: list[dict]  # uuid, question, answers, paraphrases (the selected ones)
    source: str  # where the questions came from


def load_debug_data(dataset: str, model: str, num_paraphrases: int, max_samples: int, data_file: str | None = None,
                    fewshot_file: str | None = None, paraphrase_file: str | None = None, hub: bool = False,
                    cache_dir: str | None = None, seed: int | None = None) -> DebugData:
    """The first ``max_samples`` questions with ``num_paraphrases`` paraphrases each (fixtures by default)."""
    import constants
    import dataset as ds

    fixtures = not data_file and not hub
    if fixtures:
        data_file = str(constants.FIXTURE_FILES[dataset])
        if dataset == "webqa":
            fewshot_file = fewshot_file or str(constants.FIXTURE_WEBQA_TRAIN)
            paraphrase_file = paraphrase_file or str(constants.FIXTURE_WEBQA_PARAPHRASES)
    qs = ds.load_paraphrase_dataset(dataset, model, data_file, fewshot_file, paraphrase_file, cache_dir,
                                    max_samples, constants.SEED if seed is None else seed)
    rows = []
    for row in qs.questions.to_dict("records"):
        rows.append({"uuid": str(row["uuid"]), "question": row["question"], "answers": list(row["answers"]),
                     "paraphrases": ds.select_paraphrases(list(row["paraphrases"]), None, num_paraphrases)})
    if len(rows) < max_samples:
        raise ValueError(f"Asked for {max_samples} questions, but {data_file or 'the hub'} gives only {len(rows)}.")
    source = f"fixtures ({data_file})" if fixtures else (data_file or f"hub {constants.DATASETS[dataset]}")
    return DebugData(dataset, ds.prompt_prefix(dataset, qs.few_shot), rows, source)


def mask_ranges(packed) -> list[Range]:
    """Ranges of a pack for mask views: its spans (prefix, paraphrases, cue)."""
    return as_ranges(packed.spans)


def question_masks(before_attention_state: dict) -> list[torch.Tensor]:
    """``[L_b, L_b]`` dense prefill mask of each question, from the ``before_attention`` event (the engine's own)."""
    dense = before_attention_state["dense_mask"]().cpu()
    return [dense[b, 0, :len(p), :len(p)] for b, p in enumerate(before_attention_state["packed"])]


def load_model(model: str, device: str, cache_dir: str | None):
    """``(model, tokenizer, stop ids, seconds)``: the model and its stop tokens, timed."""
    import generate
    import utils

    start = time.perf_counter()
    model_, tokenizer = utils.load_model_and_tokenizer(model, device, cache_dir=cache_dir)
    stops = generate.stop_token_ids(tokenizer, model_.generation_config)
    return model_, tokenizer, stops, time.perf_counter() - start


def logits_tolerance(dtype: torch.dtype) -> float:
    """How far the eager reference logits may be from the engine's (float32: 1e-3; half types: 0.25)."""
    return 1e-3 if dtype == torch.float32 else 0.25


def score(prediction: str, answers: Sequence[str]) -> bool:
    """True when the prediction contains a gold answer (utils.score_prediction, lemma match)."""
    import utils

    return bool(utils.score_prediction(prediction, answers)[2])


# --- demo ------------------------------------------------------------------------------------


def demo(output_dir: str | Path) -> str:
    """Every view on a small hand-made pack (no model needed); writes a debug folder."""
    lengths = {"prefix": 20, "paraphrase 0": 5, "paraphrase 1": 6, "paraphrase 2": 4, "cue": 3}
    ranges, at = [], 0
    for name, n in lengths.items():
        ranges.append((name, at, at + n))
        at += n
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths.values())])
    cue = len(lengths) - 1
    idx = torch.arange(at)
    mask = (idx[None] <= idx[:, None]) & ((seg[None] == 0) | (seg[:, None] == seg[None]) | (seg[:, None] == cue))
    ids = torch.arange(100, 100 + at)
    texts = [inspect_step("demo pack", input_ids=ids, segment_ids=seg),
             inspect_concatenation(ids, ranges),
             inspect_tokenization(ids, segment_ids=seg, segment_names=list(lengths), max_rows=10),
             inspect_attention_mask(mask, ranges)]
    return save_debug_info(output_dir, {"title": "debug_helpers demo", "tokens": at},
                           {"input_ids": ids, "segment_ids": seg, "mask": mask},
                           [("mask.png", mask, ranges, "Demo attention mask")],
                           [(f"View {i}", t) for i, t in enumerate(texts, 1)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nRun as a script, it shows every view on a small hand-made pack (no model).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(DEFAULT_DEBUG_DIR / "helpers_demo"),
                        help="debug folder of the demo (default: %(default)s)")
    demo(parser.parse_args(argv).output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
