"""Tests of analysis/report_accuracy.py and analysis/report_diversity.py.

The tests write small result feathers with known answers and compare every number
of the reports with values worked out by hand below.

Four questions u0..u3 and three paraphrases (per_prompt, 1 = right):

    uuid  p0 p1 p2   predictions (p0 | p1 | p2)
    u0     1  1  1   "Paris"    | "paris."  | "Paris"
    u1     1  0  0   "Lyon"     | "Nice"    | "Nice"
    u2     0  1  0   "the cats" | "the cat" | "dogs"     (p0, p1: same lemmas)
    u3     0  0  0   ""         | "x"       | "y"
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import report_accuracy, report_diversity
from analysis.results import markdown_table

ROOT = Path(__file__).resolve().parents[1]
UUIDS = ["u0", "u1", "u2", "u3"]
CORRECT = {"u0": [1, 1, 1], "u1": [1, 0, 0], "u2": [0, 1, 0], "u3": [0, 0, 0]}
PREDICTIONS = {"u0": ["Paris", "paris.", "Paris"], "u1": ["Lyon", "Nice", "Nice"],
               "u2": ["the cats", "the cat", "dogs"], "u3": ["", "x", "y"]}
LEMMAS = {"u0": [["paris"]] * 3, "u1": [["lyon"], ["nice"], ["nice"]],
          "u2": [["the", "cat"], ["the", "cat"], ["dog"]], "u3": [[], ["x"], ["y"]]}


def per_prompt_frame() -> pd.DataFrame:
    rows = []
    for u in UUIDS:
        for i in range(3):
            rows.append({"uuid": u, "answers": ["gold"], "prediction": PREDICTIONS[u][i], "predict_lemma": LEMMAS[u][i],
                         "correct": bool(CORRECT[u][i]), "method": "per_prompt", "model": "m",
                         "num_paraphrases": 1, "paraphrase_index": i})  # as generate.py writes it
    return pd.DataFrame(rows)


def ensemble_frame(method: str, correct: list[int], n: int, **extra) -> pd.DataFrame:
    return pd.DataFrame({
        "uuid": UUIDS, "answers": [["gold"]] * 4, "prediction": ["p"] * 4, "predict_lemma": [["p"]] * 4,
        "correct": [bool(c) for c in correct], "method": method, "model": "m", "num_paraphrases": n,
        "paraphrase_index": -1, **extra,
    })


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder with per_prompt, avg/max, FlexAttention, confidence and an unfinished file."""
    folder = tmp_path / "results"
    folder.mkdir()
    per_prompt_frame().to_feather(folder / "per_prompt_n3.feather")
    ensemble_frame("avg", [1, 0, 1, 1], 3).to_feather(folder / "avg_n3.feather")
    ensemble_frame("avg", [1, 1, 0, 0], 2).to_feather(folder / "avg_n2.feather")
    ensemble_frame("max", [1, 0, 0, 0], 3).to_feather(folder / "max_n3.feather")
    ensemble_frame("flex_attention", [1, 1, 1, 0], 3, fusion="attention", positions="shared").to_feather(
        folder / "flex_attention_shared_n3.feather")
    ensemble_frame("flex_logits_avg", [0, 0, 1, 0], 3, fusion="logits", positions="shared").to_feather(
        folder / "flex_logits_shared_n3_avg.feather")
    pd.DataFrame({"uuid": UUIDS, "confidences": [[1.0, 0.5, 0.2]] * 4}).to_feather(folder / "confidence.feather")
    ensemble_frame("avg", [0, 0, 0, 0], 5).to_feather(folder / "avg_n5.partial.feather")
    return folder


# --- accuracy report ---------------------------------------------------------


def test_accuracy_table_numbers(results: Path) -> None:
    table = report_accuracy.accuracy_table(results).set_index("file")
    assert list(table.index) == ["per_prompt_n3", "avg_n2", "avg_n3", "max_n3",
                                 "flex_attention_shared_n3", "flex_logits_shared_n3_avg"]
    pp = table.loc["per_prompt_n3"]
    assert pp["rows"] == 12 and pp["questions"] == 4 and pp["num_paraphrases"] == 3
    assert pp["accuracy"] == pytest.approx(5 / 12)
    assert (pp["acc_p0"], pp["acc_p1"], pp["acc_p2"]) == pytest.approx((2 / 4, 2 / 4, 1 / 4))
    assert pp["index_mean"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert pp["oracle"] == pytest.approx(3 / 4)  # u0, u1, u2
    assert pp["all_right"] == pytest.approx(1 / 4)  # u0
    assert table.loc["avg_n3", "accuracy"] == pytest.approx(0.75)
    assert table.loc["avg_n2", "accuracy"] == pytest.approx(0.5)
    assert table.loc["avg_n2", "num_paraphrases"] == 2
    assert table.loc["max_n3", "accuracy"] == pytest.approx(0.25)
    flex = table.loc["flex_attention_shared_n3"]
    assert (flex["method"], flex["fusion"], flex["positions"], flex["accuracy"]) == ("flex_attention", "attention", "shared", 0.75)
    assert table.loc["flex_logits_shared_n3_avg", "accuracy"] == pytest.approx(0.25)
    assert pd.isna(table.loc["avg_n3", "oracle"])  # per_prompt-only columns are empty for ensembles


def test_accuracy_report_writes_files(results: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert report_accuracy.main(["--results-dir", str(results), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per_prompt_n3" in printed and "flex_logits_shared_n3_avg" in printed and "0.417" in printed
    csv = pd.read_csv(out / "accuracy_report.csv")
    assert csv.set_index("file").loc["max_n3", "accuracy"] == pytest.approx(0.25)
    md = (out / "accuracy_report.md").read_text()
    assert "| per_prompt_n3 | per_prompt | 3 |" in md
    png = (out / "accuracy_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_accuracy_report_default_output_is_results_folder(results: Path) -> None:
    assert report_accuracy.main(["--results-dir", str(results)]) == 0
    assert {p.name for p in results.glob("accuracy_report.*")} == {"accuracy_report.csv", "accuracy_report.md", "accuracy_report.png"}


def test_missing_column_is_one_line(results: Path, capsys) -> None:
    per_prompt_frame().drop(columns=["paraphrase_index"]).to_feather(results / "per_prompt_n3.feather")
    assert report_accuracy.main(["--results-dir", str(results)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "per_prompt_n3.feather" in err and "paraphrase_index" in err
    ensemble_frame("avg", [1, 1, 1, 1], 3).drop(columns=["correct"]).to_feather(results / "avg_n3.feather")
    assert report_accuracy.main(["--results-dir", str(results)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "avg_n3.feather" in err and "correct" in err


def test_broken_file_is_one_line(results: Path, capsys) -> None:
    (results / "max_n3.feather").write_text("not a feather file")
    assert report_accuracy.main(["--results-dir", str(results)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_n3.feather is not a feather file" in err


def test_missing_folder_is_one_line(tmp_path: Path, capsys) -> None:
    assert report_accuracy.main(["--results-dir", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    assert report_diversity.main(["--results-dir", str(tmp_path / "empty")]) == 1
    assert "No result feathers" in capsys.readouterr().err


def test_markdown_table() -> None:
    df = pd.DataFrame({"a": ["x", "y"], "b": [0.5, float("nan")], "c": [1, 2]})
    assert markdown_table(df) == "| a | b | c |\n|---|---|---|\n| x | 0.500 | 1 |\n| y |  | 2 |\n"


# --- diversity report ------------------------------------------------------------


def test_diversity_pairs_and_ensembles(results: Path) -> None:
    by_index = report_diversity.load_per_prompt(results / "per_prompt_n3.feather")
    pairs = report_diversity.pairs_table(by_index).set_index(["i", "j"])
    # consistency: (0,1) u0 + u2 (same lemmas); (0,2) u0; (1,2) u0 + u1
    assert pairs["consistency"].to_dict() == pytest.approx({(0, 1): 0.5, (0, 2): 0.25, (1, 2): 0.5})
    assert pairs["or_rate"].to_dict() == pytest.approx({(0, 1): 0.75, (0, 2): 0.5, (1, 2): 0.5})
    assert pairs["and_rate"].to_dict() == pytest.approx({(0, 1): 0.25, (0, 2): 0.25, (1, 2): 0.25})
    assert pairs["acc_j"].to_dict() == pytest.approx({(0, 1): 0.5, (0, 2): 0.25, (1, 2): 0.25})

    ens = [report_diversity.load_ensemble(results / "avg_n3.feather")]  # right on u0, u2, u3
    table = report_diversity.ensembles_table(by_index, report_diversity.pairs_table(by_index), ens).set_index(["i", "j"])
    assert (table["ensemble_accuracy"] == 0.75).all()
    # (0,1): exactly one = u1, u2 -> ensemble right on u2; neither = u3 -> right
    # (0,2): exactly one = u1 -> wrong; neither = u2, u3 -> both right
    # (1,2): exactly one = u2 -> right; neither = u1, u3 -> right on u3
    assert table["exactly_one"].to_dict() == {(0, 1): 2, (0, 2): 1, (1, 2): 1}
    assert table["right_when_exactly_one"].to_dict() == pytest.approx({(0, 1): 0.5, (0, 2): 0.0, (1, 2): 1.0})
    assert table["neither"].to_dict() == {(0, 1): 1, (0, 2): 2, (1, 2): 2}
    assert table["right_when_neither"].to_dict() == pytest.approx({(0, 1): 1.0, (0, 2): 1.0, (1, 2): 0.5})
    corr = report_diversity.correlation_table(table.reset_index())
    assert list(corr[["r_consistency", "r_or", "r_and"]].iloc[0]) == ["n/a"] * 3
    assert "same for every pair" in corr["note"].iloc[0]


def test_diversity_correlation_of_pair_ensembles(results: Path, tmp_path: Path, capsys) -> None:
    pair_acc = {"01": [1, 1, 1, 0], "02": [1, 1, 0, 0], "12": [1, 0, 1, 0]}  # accuracy 0.75, 0.5, 0.5
    specs = []
    for name, correct in pair_acc.items():
        ensemble_frame("avg", correct, 2).to_feather(results / f"avg_pair{name}.feather")
        specs += ["--ensemble", f"avg_pair{name}={name[0]},{name[1]}"]
    out = tmp_path / "div"
    assert report_diversity.main(["--results-dir", str(results), "--output-dir", str(out), *specs]) == 0
    corr = pd.read_csv(out / "diversity_correlation.csv", keep_default_na=False)  # keep "n/a" as text
    assert len(corr) == 1 and corr.loc[0, "pairs"] == 3
    # accuracy x = (.75, .5, .5), consistency y = (.5, .25, .5): deviations in 1/12: x (2,-1,-1), y (1,-2,1)
    # r = (2*1 + (-1)(-2) + (-1)*1) / sqrt(6 * 6) = 3/6
    assert float(corr.loc[0, "r_consistency"]) == pytest.approx(0.5)
    assert float(corr.loc[0, "r_or"]) == pytest.approx(1.0)  # OR = (.75, .5, .5), same shape as accuracy
    assert corr.loc[0, "r_and"] == "n/a"  # AND is 0.25 for every pair
    assert "and_rate is the same for every pair" in corr.loc[0, "note"]
    ens = pd.read_csv(out / "diversity_ensembles.csv").set_index("file")
    # avg_pair01 on (0,1): exactly one = u1, u2 -> both right; neither = u3 -> wrong
    assert ens.loc["avg_pair01", "right_when_exactly_one"] == pytest.approx(1.0)
    assert ens.loc["avg_pair01", "right_when_neither"] == pytest.approx(0.0)
    assert (out / "diversity_pairs.md").read_text().startswith("# Paraphrase pairs")


def test_diversity_default_files_and_single_pair(results: Path, capsys) -> None:
    assert report_diversity.main(["--results-dir", str(results)]) == 0
    corr = pd.read_csv(results / "diversity_correlation.csv", keep_default_na=False).set_index(["series", "num_paraphrases"])
    # avg_n2 covers only the pair (0, 1): n < 2
    assert corr.loc[("avg", 2), "pairs"] == 1 and corr.loc[("avg", 2), "r_or"] == "n/a"
    assert corr.loc[("avg", 2), "note"].startswith("n<2")
    assert set(corr.index) == {("avg", 2), ("avg", 3), ("max", 3), ("flex_attention_shared", 3), ("flex_logits_avg_shared", 3)}
    ens = pd.read_csv(results / "diversity_ensembles.csv")
    flex = ens[(ens["file"] == "flex_attention_shared_n3") & (ens["i"] == 0) & (ens["j"] == 1)].iloc[0]
    # flex right on u0, u1, u2: exactly one of (0,1) = u1, u2 -> 1.0; neither = u3 -> 0.0
    assert (flex["right_when_exactly_one"], flex["right_when_neither"]) == (1.0, 0.0)


def test_pearson_guards() -> None:
    assert report_diversity.pearson([0.5], [0.1]) == "n/a"
    assert report_diversity.pearson([0.5, 0.5], [0.1, 0.2]) == "n/a"
    assert report_diversity.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(0.9819805060619657)


def test_normalize() -> None:
    assert report_diversity.normalize("  Paris.  ") == report_diversity.normalize("paris") == "paris"
    assert report_diversity.normalize("New-York  City!") == "new york city"


def test_cli_runs_as_script(results: Path, tmp_path: Path) -> None:
    """``python analysis/report_accuracy.py`` works from the project root (sys.path set by the script)."""
    for script in ("report_accuracy.py", "report_diversity.py"):
        proc = subprocess.run([sys.executable, f"analysis/{script}", "--results-dir", str(results),
                               "--output-dir", str(tmp_path / script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Wrote:" in proc.stdout


def test_default_results_folder_from_cache_dir(tmp_path: Path, capsys) -> None:
    """--dataset/--model/--cache-dir find the files where generate.py writes them (utils.default_output)."""
    import utils

    path = utils.default_output("results", "myriadlama", "org/model", "avg_n2", str(tmp_path))
    path.parent.mkdir(parents=True)
    ensemble_frame("avg", [1, 1, 1, 0], 2).to_feather(path)
    assert report_accuracy.main(["--dataset", "myriadlama", "--model", "org/model", "--cache-dir", str(tmp_path)]) == 0
    assert "myriadlama / org/model" in capsys.readouterr().out
    assert pd.read_csv(path.parent / "accuracy_report.csv")["accuracy"].tolist() == [0.75]
