"""Diversity report: do paraphrases that disagree help the ensemble?

Run from the project root:

    python analysis/report_diversity.py --dataset webqa --model smollm2_135m_it

For every pair (i, j) of paraphrase indices of the per_prompt results:
- consistency: the two answers agree (same normalized prediction or same lemma sequence),
- OR rate: at least one of the two is right; AND rate: both are right.
For every ensemble result file and every pair among the paraphrases it combined:
- how often the ensemble is right when exactly one / neither of the pair is right.
Then, per ensemble method and size, the Pearson correlation across pairs of the
ensemble accuracy with consistency, OR and AND rate. This is informative for
ensembles of two paraphrases run per pair (``generate.py --indexs i,j``), given as
``--ensemble FILE=i,j``; an ensemble of all paraphrases has the same accuracy for
every pair, so its correlation is "n/a".

Writes ``diversity_pairs``, ``diversity_ensembles`` and ``diversity_correlation``
(.csv and .md) into the results folder, or into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.results import (  # noqa: E402
    ResultError, add_results_args, parse_results_args, read_columns, report_title, require, result_files,
    series_label, single_value,
    text_table, write_table,
)

PER_PROMPT_COLUMNS = ("uuid", "paraphrase_index", "prediction", "predict_lemma", "correct", "method")
ENSEMBLE_COLUMNS = ("uuid", "correct", "method", "num_paraphrases")
FLEX_COLUMNS = ("fusion", "positions")
NA = "n/a"


# --- per_prompt pairs --------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def lemma_tuple(value) -> tuple[str, ...]:
    return tuple() if value is None else tuple(str(x) for x in value)


def load_per_prompt(path: Path) -> dict[int, pd.DataFrame]:
    """per_prompt file -> {paraphrase index: frame indexed by uuid with norm, lemmas, correct}."""
    df = read_columns(path, PER_PROMPT_COLUMNS)
    if single_value(df, "method", path) != "per_prompt":
        raise ResultError(f"{path} is not a per_prompt result file (method {df['method'].iloc[0]!r}).")
    by_index = {}
    for index, group in df.groupby(df["paraphrase_index"].astype(int), sort=True):
        if group["uuid"].duplicated().any():
            raise ResultError(f"{path} has two rows for the same uuid and paraphrase_index {index}.")
        by_index[index] = pd.DataFrame({
            "norm": [normalize(p) for p in group["prediction"]],
            "lemmas": [lemma_tuple(v) for v in group["predict_lemma"]],
            "correct": group["correct"].astype(bool).to_numpy(),
        }, index=group["uuid"].astype(str).to_numpy())
    return by_index


def aligned(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    common = a.index.intersection(b.index, sort=False)
    return a.loc[common], b.loc[common]


def pair_stats(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Consistency, OR and AND rate of two paraphrases over the questions both answered."""
    a, b = aligned(a, b)
    if not len(a):
        raise ResultError("Two paraphrase indices have no question in common.")
    same = (a["norm"].to_numpy() == b["norm"].to_numpy()) | np.array(
        [x == y for x, y in zip(a["lemmas"], b["lemmas"])], dtype=bool)
    ca, cb = a["correct"].to_numpy(), b["correct"].to_numpy()
    return {"questions": len(a), "acc_i": ca.mean(), "acc_j": cb.mean(), "consistency": same.mean(),
            "or_rate": (ca | cb).mean(), "and_rate": (ca & cb).mean()}


def pairs_table(by_index: dict[int, pd.DataFrame]) -> pd.DataFrame:
    rows = [{"i": i, "j": j, **pair_stats(by_index[i], by_index[j])} for i, j in itertools.combinations(sorted(by_index), 2)]
    if not rows:
        raise ResultError(f"The per_prompt file has only paraphrase indices {sorted(by_index)}; pairs need two or more.")
    return pd.DataFrame(rows)


# --- ensembles ---------------------------------------------------------------


@dataclass
class Ensemble:
    """An ensemble result: which paraphrase indices it combined and whether it was right per uuid."""

    name: str
    series: str
    num_paraphrases: int
    indexs: tuple[int, ...]
    correct: pd.Series  # bool, indexed by uuid


def load_ensemble(path: Path, indexs: tuple[int, ...] | None = None) -> Ensemble:
    """An ensemble file; ``indexs`` default to 0..N-1 (what generate.py uses without --indexs)."""
    df = read_columns(path, ENSEMBLE_COLUMNS, optional=FLEX_COLUMNS)
    method = str(single_value(df, "method", path))
    if method == "per_prompt":
        raise ResultError(f"{path} is a per_prompt file, not an ensemble.")
    positions = None
    if method.startswith("flex"):
        require(df, FLEX_COLUMNS, path, "FlexAttention")
        positions = str(single_value(df, "positions", path))
    n = int(single_value(df, "num_paraphrases", path))
    indexs = tuple(indexs) if indexs else tuple(range(n))
    if len(indexs) != n:
        raise ResultError(f"{path} combined {n} paraphrases, but {len(indexs)} indices were given ({indexs}).")
    if df["uuid"].duplicated().any():
        raise ResultError(f"{path} has two rows for one uuid; an ensemble file has one row per question.")
    correct = pd.Series(df["correct"].astype(bool).to_numpy(), index=df["uuid"].astype(str).to_numpy())
    return Ensemble(path.stem, series_label(method, positions), n, indexs, correct)


def ensemble_pair_stats(a: pd.DataFrame, b: pd.DataFrame, ensemble: pd.Series) -> dict:
    """Ensemble accuracy, and its accuracy when exactly one / neither of the pair is right."""
    common = a.index.intersection(b.index, sort=False).intersection(ensemble.index, sort=False)
    if not len(common):
        raise ResultError("An ensemble file and the per_prompt file have no question in common.")
    ca, cb = a.loc[common, "correct"].to_numpy(), b.loc[common, "correct"].to_numpy()
    ce = ensemble.loc[common].to_numpy()
    one, neither = ca ^ cb, ~(ca | cb)
    return {
        "questions": len(common), "ensemble_accuracy": ce.mean(),
        "exactly_one": int(one.sum()), "right_when_exactly_one": ce[one].mean() if one.any() else np.nan,
        "neither": int(neither.sum()), "right_when_neither": ce[neither].mean() if neither.any() else np.nan,
    }


def ensembles_table(by_index: dict[int, pd.DataFrame], pairs: pd.DataFrame, ensembles: list[Ensemble]) -> pd.DataFrame:
    """One row per (ensemble file, pair of the paraphrases it combined)."""
    diversity = pairs.set_index(["i", "j"])[["consistency", "or_rate", "and_rate"]]
    rows = []
    for ens in ensembles:
        for i, j in itertools.combinations(sorted(ens.indexs), 2):
            if i not in by_index or j not in by_index:
                print(f"note: {ens.name}: per_prompt has no paraphrase {max(i, j)}; pair ({i}, {j}) left out")
                continue
            rows.append({"file": ens.name, "series": ens.series, "num_paraphrases": ens.num_paraphrases, "i": i, "j": j,
                         **ensemble_pair_stats(by_index[i], by_index[j], ens.correct), **diversity.loc[(i, j)].to_dict()})
    if not rows:
        raise ResultError("No ensemble file combined two paraphrases that the per_prompt file has.")
    return pd.DataFrame(rows)


# --- correlation -------------------------------------------------------------


def pearson(x, y) -> float | str:
    """Pearson r, or "n/a" with fewer than 2 values or a constant variable (r is undefined)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return NA
    return float(np.corrcoef(x, y)[0, 1])


RATES = (("consistency", "r_consistency"), ("or_rate", "r_or"), ("and_rate", "r_and"))


def why_na(group: pd.DataFrame) -> str:
    """Plain reason(s) for the "n/a" values of one correlation row."""
    if len(group) < 2:
        return f"n<2: only {len(group)} pair"
    reasons = []
    if group["ensemble_accuracy"].nunique() == 1:
        reasons.append("ensemble accuracy is the same for every pair (run 2-paraphrase ensembles per pair: --indexs i,j)")
    reasons += [f"{column} is the same for every pair" for column, _ in RATES if group[column].nunique() == 1]
    return "; ".join(reasons)


def correlation_table(ens_pairs: pd.DataFrame) -> pd.DataFrame:
    """Per ensemble method and size: Pearson r across pairs of ensemble accuracy with each diversity rate."""
    rows = []
    for (series, n), group in ens_pairs.groupby(["series", "num_paraphrases"], sort=False):
        row = {"series": series, "num_paraphrases": n, "pairs": len(group)}
        row.update({name: pearson(group["ensemble_accuracy"], group[column]) for column, name in RATES})
        row["note"] = why_na(group)
        rows.append(row)
    return pd.DataFrame(rows)


# --- command line --------------------------------------------------------------


def parse_ensemble_arg(text: str, folder: Path) -> tuple[Path, tuple[int, ...] | None]:
    """``FILE`` or ``FILE=0,2``; FILE is a path or a result name in the results folder."""
    name, _, indexs = text.partition("=")
    path = Path(name)
    if not path.suffix:
        path = folder / f"{name}.feather"
    try:
        parsed = tuple(int(i) for i in indexs.split(",")) if indexs else None
    except ValueError as err:
        raise ResultError(f"--ensemble {text}: indices must be integers like FILE=0,2") from err
    return path, parsed


def pick_per_prompt(files: list[Path]) -> Path:
    """The per_prompt file with the most paraphrases (name per_prompt_n<N>)."""
    candidates = [p for p in files if re.fullmatch(r"per_prompt_n\d+", p.stem)]
    if not candidates:
        raise ResultError(f"No per_prompt_n<N>.feather in {files[0].parent}. Run generate.py --method per_prompt, or pass --per-prompt.")
    return max(candidates, key=lambda p: int(p.stem.rsplit("_n", 1)[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results_args(parser, "CSV and Markdown files")
    parser.add_argument("--per-prompt", help="per_prompt result file (default: per_prompt_n<N> with the largest N)")
    parser.add_argument("--ensemble", action="append", metavar="FILE[=I,J,...]",
                        help="ensemble result file (path or name in the results folder) and the paraphrase indices it "
                             "combined (default 0..N-1). Repeat it. Default: every ensemble file in the results folder.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, folder, out_dir = parse_results_args(build_parser(), argv)
    try:
        files = result_files(folder) if not (args.per_prompt and args.ensemble) else []
        per_prompt = Path(args.per_prompt) if args.per_prompt else pick_per_prompt(files)
        if args.ensemble:
            specs = [parse_ensemble_arg(e, folder) for e in args.ensemble]
        else:
            specs = [(p, None) for p in files if p != per_prompt and not p.stem.startswith("per_prompt")]
        by_index = load_per_prompt(per_prompt)
        pairs = pairs_table(by_index)
        ensembles = [load_ensemble(path, indexs) for path, indexs in specs]
        ens_pairs = ensembles_table(by_index, pairs, ensembles) if ensembles else None
    except ResultError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    title = report_title(args.dataset, args.model, folder)
    print(f"Paraphrase pairs ({per_prompt.name}):")
    print(text_table(pairs))
    written = write_table(pairs, out_dir, "diversity_pairs", f"Paraphrase pairs: {title}")
    if ens_pairs is None:
        print("No ensemble result files: only the pair table was written.")
    else:
        corr = correlation_table(ens_pairs)
        print("\nEnsembles per pair:")
        print(text_table(ens_pairs))
        print("\nPearson correlation across pairs of ensemble accuracy with consistency / OR / AND:")
        print(text_table(corr))
        written += write_table(ens_pairs, out_dir, "diversity_ensembles", f"Ensembles per pair: {title}")
        written += write_table(corr, out_dir, "diversity_correlation", f"Correlation across pairs: {title}")
    print("Wrote: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
