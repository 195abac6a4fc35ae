"""Check that this environment can run self-ensemble: packages, FlexAttention, model, devices.

    python testing/environment/test_environment.py [--model smollm2_135m_it] [--device auto]
    pytest testing/environment/test_environment.py      # the same checks as tests

Every FlexAttention result is compared with scaled_dot_product_attention on a dense
mask built by hand. The last check runs flex_attention_generate.py on one question.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import constants  # noqa: E402
from testing import report  # noqa: E402
from testing.check_pins import read_pins  # noqa: E402

PACKAGES = ("torch", "transformers", "datasets", "huggingface_hub", "pandas", "numpy", "spacy", "tqdm", "pyarrow")
MUST_MATCH = ("torch", "transformers")  # other differences from requirements.txt are listed, not warned
RANDOM_MODELS = ("tiny_llama", "tiny_qwen2")  # random weights: no answer to check
BLOCK = 128  # create_block_mask works in blocks of 128 (DESIGN.md section 4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=constants.DEFAULT_OFFLINE_MODEL,
                        help="model for the loading, tokenizer and end-to-end checks (default: %(default)s)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--cache-dir", help="cache root (default: $SELF_ENSEMBLE_CACHE, the cluster folder, or ~/.cache/self-ensemble)")
    return parser


def pins() -> dict[str, str]:
    """``{distribution: version}`` from requirements.txt."""
    return read_pins(ROOT / "requirements.txt")


def pick_device(opts: argparse.Namespace):
    import torch

    if opts.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given, but CUDA is not available. Use --device cpu.")
    return torch.device(opts.device)


# --- fixtures (pytest); main() gives the same names to report.run ---------------------


@pytest.fixture(scope="module")
def opts() -> argparse.Namespace:
    return build_parser().parse_args([])


@pytest.fixture(scope="module")
def device(opts):
    return pick_device(opts)


@pytest.fixture(scope="module")
def loaded(opts, load_model):
    return load_model(opts.model)


# --- packages -----------------------------------------------------------------------


def test_imports() -> None:
    """Imports and versions"""
    failed = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # every broken package is listed, then the check fails
            failed.append(f"{name}: {type(err).__name__}: {err}")
            continue
        report.note(f"{name:<16} {getattr(module, '__version__', '?')}")
    assert not failed, "cannot import:\n" + "\n".join(failed) + "\nInstall the pins: pip install -r requirements.txt"


def test_pinned_versions() -> None:
    """torch and transformers match the pinned versions"""
    for dist, pinned in pins().items():
        try:
            installed = importlib.metadata.version(dist).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            installed = "nothing"
        if installed == pinned:
            continue
        message = f"{dist} {installed} is installed; the project is tested with {dist}=={pinned}"
        if dist in MUST_MATCH:
            report.warn(f"{message}. Install the pins: pip install -r requirements.txt")
        else:
            report.note(message)


# --- FlexAttention ---------------------------------------------------------------------


def qkv(q_len: int, kv_len: int, device, heads: tuple[int, int] = (4, 4), seed: int = 0):
    """Random float32 ``(q, k, v)``, shape ``[2, heads, len, 16]``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], q_len, 16, generator=gen)
    k, v = (torch.randn(2, heads[1], kv_len, 16, generator=gen) for _ in range(2))
    return q.to(device), k.to(device), v.to(device)


def sdpa(q, k, v, dense):
    """Reference: scaled_dot_product_attention with a dense boolean mask (True = attend)."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense.to(q.device))


def padded(values, length: int):
    """``values`` padded with -1 to a multiple of 128 that is at least ``length``."""
    import torch

    out = torch.full((-(-length // BLOCK) * BLOCK,), -1, dtype=torch.long, device=values.device)
    out[: len(values)] = values
    return out


def segment_reference(lengths: list[int]):
    """Hand-built dense mask: causal inside each segment, nothing across segments."""
    import torch

    total = sum(lengths)
    dense = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        dense[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return dense


def max_error(out, ref) -> float:
    return float((out - ref).abs().max())


TOL = 1e-4  # float32: measured errors are about 1e-6


def test_flex_causal(device) -> None:
    """flex_attention, causal, length 200 (not a multiple of 128), plain and GQA"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length = 200
    block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, length, length, device=str(device))
    dense = torch.ones(length, length, dtype=torch.bool).tril()
    q, k, v = qkv(length, length, device)
    error = max_error(flex_attention(q, k, v, block_mask=block_mask), sdpa(q, k, v, dense))
    q, k, v = qkv(length, length, device, heads=(4, 2))  # 4 query heads share 2 key/value heads
    gqa = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    gqa_error = max_error(gqa, sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), dense))
    report.note(f"max |flex - sdpa| = {error:.1e}, GQA {gqa_error:.1e}")
    assert error < TOL and gqa_error < TOL, f"flex_attention differs from SDPA: {error:.1e}, GQA {gqa_error:.1e}"


def test_flex_segments(device) -> None:
    """create_mask and flex_attention with a causal segment mask (lookup padded to 128)"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

    lengths = [37, 64, 99]  # 200 tokens in three segments
    total = sum(lengths)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    segment = padded(ids, total)  # create_block_mask asks for indices up to 255

    def mask_mod(b, h, q, kv):
        return (segment[q] == segment[kv]) & (q >= kv)

    dense = segment_reference(lengths)
    made = create_mask(mask_mod, 1, 1, total, total, device=str(device))[0, 0].cpu()
    assert torch.equal(made, dense), f"create_mask differs from the hand-built mask at {int((made != dense).sum())} places"
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=str(device))
    q, k, v = qkv(total, total, device, seed=1)
    error = max_error(flex_attention(q, k, v, block_mask=block_mask), sdpa(q, k, v, dense))
    report.note(f"create_mask == hand-built mask; max |flex - sdpa| = {error:.1e}")
    assert error < TOL, f"flex_attention with a segment mask differs from SDPA by {error:.1e}"


def test_flex_decode_offset(device) -> None:
    """Decoding: 8 queries at positions 192..199 against 200 keys, offset mask_mod"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths, offset, q_len = [120, 80], 192, 8
    total = sum(lengths)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    segment = padded(ids, offset + BLOCK)  # padded query indices reach offset + 127

    def mask_mod(b, h, q, kv):
        return (segment[q + offset] == segment[kv]) & (q + offset >= kv)

    block_mask = create_block_mask(mask_mod, None, None, q_len, total, device=str(device))
    dense = segment_reference(lengths)[offset : offset + q_len]
    q, k, v = qkv(q_len, total, device, seed=2)
    error = max_error(flex_attention(q, k, v, block_mask=block_mask), sdpa(q, k, v, dense))
    report.note(f"max |flex - sdpa| = {error:.1e}")
    assert error < TOL, f"flex_attention with a query offset differs from SDPA by {error:.1e}"


def test_flex_compiled(device) -> None:
    """torch.compile(flex_attention) on CUDA matches eager"""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device.type != "cuda":
        report.skip("needs CUDA: torch 2.5.1 cannot compile flex_attention on CPU (the project runs it eagerly there)")
    length = 256
    block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, length, length, device=str(device))
    q, k, v = qkv(length, length, device, seed=3)
    start = time.perf_counter()
    compiled = torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    torch.cuda.synchronize()
    error = max_error(compiled, flex_attention(q, k, v, block_mask=block_mask))
    report.note(f"compiled in {time.perf_counter() - start:.1f} s; max |compiled - eager| = {error:.1e}")
    assert error < 1e-3, f"compiled flex_attention differs from eager by {error:.1e}"


# --- model and tokenizer -------------------------------------------------------------------


def test_tokenizer_round_trip(loaded) -> None:
    """Tokenizer: encode/decode round trip of a few-shot prompt"""
    import dataset

    _, tokenizer = loaded
    few_shot = [("who wrote hamlet?", "William Shakespeare"), ("what is the capital of japan?", "Tokyo")]
    pieces = dataset.prompt_pieces("webqa", few_shot, "what is the capital of france?")
    ids = dataset.encode_prompt(tokenizer, pieces)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    report.note(f"{len(ids)} tokens, BOS {'added' if dataset.bos_ids(tokenizer) else 'not used'}")
    assert text == "".join(pieces), f"decode(encode(prompt)) changed the text:\n{text!r}"


def test_chat_template(loaded) -> None:
    """Tokenizer: chat template renders and tokenizes"""
    _, tokenizer = loaded
    if not tokenizer.chat_template:
        report.skip("the tokenizer has no chat template")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert messages[0]["content"] in text and text.startswith(plain) and len(text) > len(plain), text
    assert tokenizer.decode(ids) == text, "the chat ids do not decode to the rendered template"
    report.note(repr(text))


def test_attention_implementations_agree(loaded) -> None:
    """Model forward: eager and sdpa attention give the same logits"""
    import torch

    model, tokenizer = loaded
    ids = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt").input_ids.to(model.device)
    used = model.config._attn_implementation
    logits = {}
    try:
        for name in ("sdpa", "eager"):
            model.set_attn_implementation(name)
            with torch.no_grad():
                logits[name] = model(ids).logits.float()
    finally:
        model.set_attn_implementation(used)
    error, scale = max_error(logits["sdpa"], logits["eager"]), float(logits["eager"].abs().max())
    report.note(f"{model.config.model_type}, {model.dtype}, {ids.shape[1]} tokens: max |sdpa - eager| = {error:.1e} (logits up to {scale:.0f})")
    assert error < 1e-4 * max(scale, 1.0), f"sdpa and eager logits differ by {error:.1e}"


def test_greedy_answer(loaded, opts) -> None:
    """Model answers a simple question (capital of France -> Paris)"""
    import torch

    import dataset

    if opts.model in RANDOM_MODELS:
        report.skip(f"{opts.model} has random weights")
    model, tokenizer = loaded
    few_shot = [("who wrote hamlet?", "William Shakespeare"), ("what is the capital of japan?", "Tokyo")]
    prompt = dataset.encode_prompt(tokenizer, dataset.prompt_pieces("webqa", few_shot, "what is the capital of france?"))
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=5, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device))
    answer = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
    report.note(f"answer: {answer!r}")
    assert "Paris" in answer, f"expected Paris, got {answer!r}"


# --- tensors and devices ---------------------------------------------------------------------


def test_tensor_math(device) -> None:
    """Basic tensor operations match numpy (float64 reference)"""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 48)), rng.standard_normal((48, 32))
    a32, b32 = (torch.tensor(m, dtype=torch.float32, device=device) for m in (a, b))
    product = (a32 @ b32).cpu().numpy()
    assert np.abs(product - a @ b).max() < 1e-4, "matmul differs from numpy"
    x = torch.tensor(a, device=device)
    softmax = torch.softmax(x, dim=-1).cpu().numpy()
    reference = np.exp(a - a.max(-1, keepdims=True))
    assert np.allclose(softmax, reference / reference.sum(-1, keepdims=True), atol=1e-12), "softmax differs from numpy"
    halves = torch.tensor([1.0, 0.5, -2.0, 3.0], device=device).to(torch.bfloat16).float().cpu()
    assert halves.tolist() == [1.0, 0.5, -2.0, 3.0], "bfloat16 round trip changed exact values"
    report.note(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")


def test_seed_reproducible() -> None:
    """utils.set_seed makes random numbers repeat"""
    import random

    import numpy as np
    import torch

    import utils

    draws = []
    for _ in range(2):
        utils.set_seed(constants.SEED)
        draws.append((random.random(), float(np.random.rand()), torch.randn(3).tolist()))
    assert draws[0] == draws[1], f"two seeded draws differ: {draws}"


def test_cuda() -> None:
    """CUDA devices and memory"""
    import torch

    if not torch.cuda.is_available():
        report.skip(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); GPU checks skipped")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        report.note(f"cuda:{index} {props.name}, capability {props.major}.{props.minor}, "
                    f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, bf16 {torch.cuda.is_bf16_supported()}")
        x = torch.randn(256, 256)
        on_gpu = (x.to(f"cuda:{index}") @ x.to(f"cuda:{index}")).cpu()
        assert max_error(on_gpu, x @ x) < 1e-2, f"cuda:{index} matmul differs from CPU"


# --- end to end ---------------------------------------------------------------------------


def test_flex_attention_generate(opts, device, tmp_path: Path) -> None:
    """flex_attention_generate.py answers one fixture question"""
    import pandas as pd

    import dataset
    import utils

    script = ROOT / "flex_attention_generate.py"
    assert script.is_file(), f"{script.name} does not exist in {ROOT}: the end-to-end check needs it"
    output = tmp_path / "f.feather"
    command = [sys.executable, str(script), "--dataset", "webqa", "--model", opts.model, "--num-paraphrases", "3",
               "--data-file", str(constants.FIXTURE_FILES["webqa"]), "--fewshot-file", str(constants.FIXTURE_WEBQA_TRAIN),
               "--paraphrase-file", str(constants.FIXTURE_WEBQA_PARAPHRASES), "--max-samples", "1",
               "--device", device.type, "--output", str(output)] + (["--cache-dir", opts.cache_dir] if opts.cache_dir else [])
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=100)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"exit code {result.returncode}:\n{(result.stdout + result.stderr)[-2000:]}"
    df = pd.read_feather(output)
    missing = [c for c in (*constants.RESULT_COLUMNS, "fusion", "positions", "num_paraphrases", "prefill_tokens") if c not in df]
    assert not missing and len(df) == 1, f"expected 1 row with the result columns; rows {len(df)}, missing {missing}"
    row = df.iloc[0]
    first = dataset.read_table(constants.FIXTURE_FILES["webqa"]).iloc[0]
    assert row["uuid"] == dataset.webqa_uuid(first["question"]), "the row is not the first fixture question"
    assert list(row["answers"]) == list(first["answers"]), "answers differ from the fixture"
    assert row["prediction"] == utils.extract_answer(row["generation"]), "prediction is not the first line of the generation"
    assert bool(row["correct"]) == utils.score_prediction(row["prediction"], first["answers"])[2], "correct does not match scoring"
    generated = dataset.read_table(constants.FIXTURE_WEBQA_PARAPHRASES).set_index("uuid").loc[row["uuid"], "paraphrases"]
    expected = [first["question"].strip(), *list(generated)[:2]]  # the original question, then the first 2 paraphrases
    assert int(row["num_paraphrases"]) == 3 and list(row["paraphrases"]) == expected, \
        f"paraphrases {list(row['paraphrases'])} != {expected}"
    assert str(row["method"]).startswith("flex"), f"method {row['method']!r} is not a flex method"
    report.note(f"{seconds:.0f} s; {first['question']!r} -> {row['prediction']!r} (correct: {bool(row['correct'])})")


SECTIONS = {
    "Packages": [test_imports, test_pinned_versions],
    "FlexAttention": [test_flex_causal, test_flex_segments, test_flex_decode_offset, test_flex_compiled],
    "Model and tokenizer": [
        test_tokenizer_round_trip, test_chat_template, test_attention_implementations_agree, test_greedy_answer,
    ],
    "Tensors and devices": [test_tensor_math, test_seed_reproducible, test_cuda],
    "End to end": [test_flex_attention_generate],
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = constants.configure_cache(args.cache_dir)
    print(f"Environment check: model {args.model}, device {args.device}, cache {paths.root}")

    def load():
        import utils

        return utils.load_model_and_tokenizer(args.model, device=str(pick_device(args)), dtype="float32",
                                              cache_dir=args.cache_dir)

    return report.run(SECTIONS, {"opts": lambda: args, "device": lambda: pick_device(args), "loaded": load})


if __name__ == "__main__":
    sys.exit(main())
