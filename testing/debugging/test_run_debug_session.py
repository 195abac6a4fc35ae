"""Tests of run_debug_session.py: the interactive mode driven through real standard input (scripted keys).

The sessions use the tiny random model (fast); the keys, prompts and the order of the
breakpoints do not depend on the model. Each session is one subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testing.debugging import debug_helpers as dh
from testing.debugging import run_debug_session as rds

SCRIPT = Path(rds.__file__).resolve()
FAST = ["--model", "tiny_llama", "--max-new-tokens", "3", "--device", "cpu"]


def session(keys: str | None, *args: str, folder: Path) -> subprocess.CompletedProcess:
    """Run the script with ``keys`` on its standard input (None: no stdin at all)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *FAST, "--output-dir", str(folder), *args],
                          input=keys if keys is not None else "", capture_output=True, text=True, timeout=170,
                          cwd=dh.ROOT, env=env)


def prompts(out: str) -> list[int]:
    """Breakpoint numbers of the key prompts, in order."""
    return [int(n) for n in re.findall(r"^\[breakpoint (\d)/5 ", out, flags=re.M)]


def headers(out: str) -> list[int]:
    return [int(n) for n in re.findall(r"^BREAKPOINT (\d)/5", out, flags=re.M)]


def test_five_continues_pass_all_breakpoints_in_order(tmp_path):
    """The acceptance command: printf 'c\\nc\\nc\\nc\\nc\\n' | ... --interactive"""
    run = session("c\nc\nc\nc\nc\n", "--interactive", folder=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert prompts(out) == [1, 2, 3, 4, 5]
    assert out.count("\n> c\n") == 5 and "end of input" not in out
    assert headers(out) == [1, 2, 3, 4, 3, 4, 3, 4, 5], "steps 1 and 2 are printed without stopping"
    for number in range(1, 6):
        assert f"{number}/5" in out
    assert "IDE breakpoint, one of:\n  flex_attention_generate.py:" in out
    summary = json.loads((tmp_path / dh.SUMMARY_FILE).read_text())
    assert summary["stops"] == [1, 2, 3, 4, 5] and summary["mode"] == "interactive"
    assert (tmp_path / "mask_q0.png").is_file() and (tmp_path / dh.REPORT_FILE).is_file()
    assert "No problems found." in out


def test_keys_details_mask_pdb_unknown_and_quit(tmp_path):
    """x (unknown), d, m before the mask exists, p + pdb commands, c, m, then q quits with exit 0"""
    engine_locals = 'p sorted(k for k in locals() if k in ("packs", "prefix"))'
    keys = f"x\nd\nm\np\np sorted(state)\nup\nup\nup\nup\n{engine_locals}\nc\nc\nm\nq\n"
    run = session(keys, "--interactive", folder=tmp_path)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert prompts(out) == [1] * 5 + [2] * 2
    assert "Unknown key 'x'" in out
    details = out.split("> d\n")[1].split("> m\n")[0]
    assert "PackedPrompt:" in details and "rows not shown" not in details, "d shows every token and the visibility"
    assert "The mask is not built yet" in out
    assert "['index', 'packed', 'question', 'tokenizer']" in out, "pdb sees the event state"
    assert "Type `up` 4 times to reach flex_generate" in out
    assert "['packs', 'prefix']" in out, "after 4 x up, pdb is in flex_generate"
    assert f"Mask picture: {tmp_path / 'mask_q0.png'} (open it" in out
    assert "Quit at breakpoint 2/5 (before FlexAttention)" in out
    assert headers(out) == [1, 2] and not (tmp_path / dh.SUMMARY_FILE).exists()


def test_skip_goes_to_the_end(tmp_path):
    run = session("s\n", "--interactive", folder=tmp_path)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert prompts(out) == [1] and "Skipping to the end" in out
    assert headers(out) == [1, 5], "after s only the final output is shown"
    assert json.loads((tmp_path / dh.SUMMARY_FILE).read_text())["breakpoints_shown"] == [1, 5]


def test_selected_breakpoints_and_end_of_input(tmp_path):
    """--breakpoints 1,3: only those stop; at the end of input the run continues without stopping"""
    run = session("c\n", "--interactive", "--breakpoints", "1,3", folder=tmp_path)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert prompts(out) == [1, 3]
    assert "(end of input: continuing to the end without stopping)" in out
    assert headers(out) == [1, 3, 3, 3]


def test_automated_prints_every_breakpoint(tmp_path):
    run = session(None, folder=tmp_path)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert prompts(out) == [] and headers(out) == [1, 2, 3, 4, 3, 4, 3, 4, 5]
    assert "Breakpoints shown, in order: 1 2 3 4 3 4 3 4 5" in out
    assert "Reference logits vs engine logits" in out and "(OK" in out


def test_explain_names_the_engine_lines():
    run = subprocess.run([sys.executable, str(SCRIPT), "--explain"], capture_output=True, text=True, timeout=60,
                         cwd=dh.ROOT)
    assert run.returncode == 0, run.stderr
    for name, loc in dh.find_event_lines().items():
        assert f"flex_attention_generate.py:{loc.guard_line}  (`if on_event:` in flex_generate()" in run.stdout, name


def test_watched_variables_exist_at_the_ide_line():
    """Each variable named for a breakpoint is assigned in flex_generate before its `if on_event:` line"""
    locations = dh.find_event_lines()
    for bp in rds.BREAKPOINTS:
        names = rds.assigned_names("flex_generate", before_line=locations[bp.event].guard_line)
        missing = [v for v in bp.variables if v not in names]
        assert not missing, f"breakpoint {bp.number}: flex_generate has no {missing} at that line"


@pytest.mark.parametrize("text", ["0", "6", "a", ""])
def test_bad_breakpoints_flag(text):
    if text == "":
        assert rds.parse_breakpoints(text) == {1, 2, 3, 4, 5}
        return
    with pytest.raises(SystemExit, match="from 1 to 5"):
        rds.parse_breakpoints(text)
