"""Accuracy report: one table over every result feather of a dataset and model.

Run from the project root:

    python analysis/report_accuracy.py --dataset webqa --model smollm2_135m_it

It prints the table and writes ``accuracy_report.csv``, ``accuracy_report.md`` and
``accuracy_report.png`` (accuracy against the number of paraphrases per method) into
the results folder, or into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

import constants  # noqa: E402
from analysis.results import (  # noqa: E402
    ResultError, add_results_args, parse_results_args, read_columns, report_title, require, result_files,
    series_label, single_value,
    text_table, write_table,
)

BASE_COLUMNS = ("uuid", "correct", "method", "num_paraphrases")
FLEX_COLUMNS = ("fusion", "positions")
STEM = "accuracy_report"
METHOD_ORDER = {m: i for i, m in enumerate(constants.METHODS)}


def per_prompt_stats(df: pd.DataFrame) -> dict:
    """Per-index accuracy, their mean, oracle (any index right) and all-right rates of a per_prompt file."""
    correct = df["correct"].astype(bool)
    by_index = correct.groupby(df["paraphrase_index"].astype(int)).mean().sort_index()
    by_uuid = correct.groupby(df["uuid"])
    stats = {f"acc_p{i}": float(acc) for i, acc in by_index.items()}
    stats.update(index_mean=float(by_index.mean()), oracle=float(by_uuid.any().mean()),
                 all_right=float(by_uuid.all().mean()))
    return stats


def summarize_file(path: Path) -> dict:
    """One table row for one result file."""
    df = read_columns(path, BASE_COLUMNS, optional=FLEX_COLUMNS + ("paraphrase_index",))
    method = str(single_value(df, "method", path))
    fusion = positions = ""
    if method.startswith("flex"):
        require(df, FLEX_COLUMNS, path, "FlexAttention")
        fusion, positions = str(single_value(df, "fusion", path)), str(single_value(df, "positions", path))
    if method == "per_prompt":  # one row per paraphrase (num_paraphrases is 1): count the indices
        require(df, ("paraphrase_index",), path, "per_prompt")
        n = int(df["paraphrase_index"].nunique())
    else:
        n = int(single_value(df, "num_paraphrases", path))
    row = {
        "file": path.stem, "method": method, "series": series_label(method, positions), "num_paraphrases": n,
        "fusion": fusion, "positions": positions, "accuracy": float(df["correct"].astype(bool).mean()),
        "rows": len(df), "questions": df["uuid"].nunique(),
    }
    if method == "per_prompt":
        row.update(per_prompt_stats(df))
    return row


def _sort_key(row: pd.Series) -> tuple:
    return (METHOD_ORDER.get(row["method"], len(METHOD_ORDER)), row["series"], row["num_paraphrases"])


def accuracy_table(folder: Path) -> pd.DataFrame:
    """Table of every finished result file in ``folder``, per_prompt first, then by method and size."""
    rows = pd.DataFrame([summarize_file(p) for p in result_files(folder)])
    rows = rows.loc[sorted(rows.index, key=lambda i: _sort_key(rows.loc[i]))].reset_index(drop=True)
    index_columns = sorted((c for c in rows.columns if c.startswith("acc_p")), key=lambda c: int(c[5:]))
    fixed = ["file", "method", "num_paraphrases", "fusion", "positions", "accuracy", "rows", "questions"]
    extra = [c for c in ("index_mean", "oracle", "all_right") if c in rows.columns]
    return rows[fixed + extra + index_columns + ["series"]]


def plot_accuracy(table: pd.DataFrame, path: Path, title: str) -> Path:
    """PNG of accuracy against the number of paraphrases, one line per method.

    per_prompt is drawn as horizontal lines (mean over paraphrase indices and oracle)
    of the per_prompt file with the most paraphrases.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ensembles = table[table["method"] != "per_prompt"]
    markers = "osD^v<>px*h"
    for k, (series, group) in enumerate(ensembles.groupby("series", sort=False)):
        group = group.sort_values("num_paraphrases")
        # hollow markers, smaller for later series: equal points stay visible inside each other
        ax.plot(group["num_paraphrases"], group["accuracy"], marker=markers[k % len(markers)],
                markersize=max(4, 16 - 2 * k), markerfacecolor="none", markeredgewidth=1.8, label=series)
    per_prompt = table[table["method"] == "per_prompt"]
    if len(per_prompt):
        best = per_prompt.sort_values("num_paraphrases").iloc[-1]
        n = int(best["num_paraphrases"])
        ax.axhline(best["index_mean"], color="black", linestyle="--", label=f"per_prompt mean (n={n})")
        ax.axhline(best["oracle"], color="gray", linestyle=":", label=f"per_prompt oracle (n={n})")
    sizes = sorted(table["num_paraphrases"].unique())
    ax.set_xticks(sizes)
    ax.set_xlim(min(sizes) - 0.5, max(sizes) + 0.5)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("number of paraphrases")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_args(parser, "CSV, Markdown and PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, folder, out_dir = parse_results_args(build_parser(), argv)
    try:
        table = accuracy_table(folder)
    except ResultError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    shown = table.drop(columns=["series"]).dropna(axis=1, how="all")
    title = report_title(args.dataset, args.model, folder)
    print(f"Accuracy: {title} ({folder})")
    print(text_table(shown))
    written = write_table(shown, out_dir, STEM, f"Accuracy: {title}")
    written.append(plot_accuracy(table, out_dir / f"{STEM}.png", title))
    print("Wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
