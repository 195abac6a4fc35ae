"""End to end: scripts/run_experiment.sh runs the real CLIs offline (tiny_llama, fixtures).

About 60 s on 2 CPU cores: 10 python processes (paraphrase, confidence, per_prompt,
avg, max, weighted_avg, weighted_max, both FlexAttention fusions, report).
The acceptance command with smollm2_135m_it and 4 questions takes much longer:
    bash scripts/run_experiment.sh webqa smollm2_135m_it --max-samples 4
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
CLIS = ("paraphrase.py", "confidence.py", "generate.py", "flex_attention_generate.py")


@pytest.mark.skipif(not all((ROOT / c).exists() for c in CLIS), reason="the CLIs are not all written yet")
def test_experiment_real_chain_tiny_llama(tmp_path: Path) -> None:
    """The real chain, offline, with tiny_llama on 2 fixture questions.

    A random model's samples at temperature 1 never repeat its greedy answer, so all
    confidences would be 0 and the weighted methods refuse them; at temperature
    0.001 sampling is greedy and every confidence is 1.
    """
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SELF_ENSEMBLE_CACHE", None)
    shutil.copytree(utils.ensure_embedded_model("tiny_llama"), cache / "models" / "tiny_llama")  # no rebuild
    args = ["scripts/run_experiment.sh", "webqa", "tiny_llama", "--max-samples", "2", "--sizes", "2", "--cache-dir",
            str(cache), "--device", "cpu", "--confidence-samples", "2", "--confidence-temperature", "0.001"]
    proc = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = utils.default_output("results", "webqa", "tiny_llama", "x", str(cache)).parent
    table = pd.read_csv(results / "accuracy_report.csv").set_index("file")
    assert set(table.index) == {"per_prompt_n2", "avg_n2", "max_n2", "weighted_avg_n2", "weighted_max_n2",
                                "flex_attention_shared_n2", "flex_logits_shared_n2_avg"}
    assert table.loc["per_prompt_n2", "rows"] == 4 and (table.drop(index="per_prompt_n2")["rows"] == 2).all()
    for name in table.index:  # the table holds the accuracy of each file
        assert table.loc[name, "accuracy"] == pytest.approx(pd.read_feather(results / f"{name}.feather")["correct"].mean())
    assert (results / "accuracy_report.png").stat().st_size > 10_000
    assert "per_prompt_n2" in proc.stdout and "flex_logits_shared_n2_avg" in proc.stdout
    # The logits fusion of FlexAttention is the avg logit ensemble in one pack: same answers.
    avg = pd.read_feather(results / "avg_n2.feather").set_index("uuid")["prediction"]
    flex = pd.read_feather(results / "flex_logits_shared_n2_avg.feather").set_index("uuid")["prediction"]
    assert flex.loc[avg.index].tolist() == avg.tolist()

    # A second run skips every step and only writes the report again.
    proc = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("skip: ") for line in proc.stdout.splitlines()) == 9
    assert [line for line in proc.stdout.splitlines() if line.startswith("+ ")] == [
        f"+ python analysis/report_accuracy.py --dataset webqa --model tiny_llama --cache-dir {cache}"]
