"""Find, read and write the tables of the analysis reports.

Result feathers live in ``<cache>/results/<dataset>/<model>/<name>.feather``
(``utils.default_output``). The reports read only the documented columns.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import pyarrow.feather as feather

SKIP_NAMES = ("confidence",)  # result files that are not answers (other schema)
PARTIAL_SUFFIX = ".partial.feather"


class ResultError(Exception):
    """A result file or column is missing; the message says which one and what to do."""


def results_dir(dataset: str, model: str, cache_dir: str | None = None, override: str | None = None) -> Path:
    """``--results-dir`` when given, else the folder that ``utils.default_output`` uses."""
    if override:
        return Path(override).expanduser()
    import utils

    return utils.default_output("results", dataset, model, "x", cache_dir).parent


def add_results_args(parser, output_help: str):
    """Flags that name the result folder, shared by the reports."""
    import constants

    parser.add_argument("--dataset", choices=sorted(constants.DATASETS), default="webqa")
    parser.add_argument("--model", help="model name of the result folder (needed unless --results-dir is given)")
    parser.add_argument("--cache-dir", help="cache root (as for the other CLIs)")
    parser.add_argument("--results-dir", help="folder with the result feathers (default: <cache>/results/<dataset>/<model>)")
    parser.add_argument("--output-dir", help=f"where to write the {output_help} (default: the results folder)")
    return parser


def parse_results_args(parser, argv) -> tuple:
    """``(args, results folder, output folder)``; a missing --model is a usage error."""
    args = parser.parse_args(argv)
    if not (args.model or args.results_dir):
        parser.error("give --model (or --results-dir)")
    folder = results_dir(args.dataset, args.model, args.cache_dir, args.results_dir)
    return args, folder, Path(args.output_dir) if args.output_dir else folder


def report_title(dataset: str, model: str | None, folder: Path) -> str:
    """``dataset / model``; with only ``--results-dir``, the folder's last two names."""
    return f"{dataset} / {model}" if model else f"{folder.parent.name} / {folder.name}"


def result_files(folder: Path) -> list[Path]:
    """Finished answer files in ``folder`` (no ``*.partial.feather``, no ``confidence.feather``)."""
    if not folder.is_dir():
        raise ResultError(f"The results folder {folder} does not exist. Run scripts/run_experiment.sh first, or pass --results-dir.")
    files = []
    for path in sorted(folder.glob("*.feather")):
        if path.name.endswith(PARTIAL_SUFFIX):
            print(f"note: {path.name} is unfinished (a run was interrupted); not used")
        elif path.stem not in SKIP_NAMES:
            files.append(path)
    if not files:
        raise ResultError(f"No result feathers in {folder}. Run generate.py or scripts/run_experiment.sh first.")
    return files


def read_columns(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> pd.DataFrame:
    """Read only ``required`` (+ the ``optional`` ones that exist) from a feather file."""
    if not path.is_file():
        raise ResultError(f"Result file {path} does not exist.")
    available = set(_schema_names(path))
    missing = [c for c in required if c not in available]
    if missing:
        raise ResultError(f"{path} has no column {', '.join(missing)}; it is not a result file of generate.py "
                          f"or flex_attention_generate.py (or it is from an older version: run it again).")
    columns = list(required) + [c for c in optional if c in available and c not in required]
    return feather.read_table(path, columns=columns).to_pandas()


def require(df: pd.DataFrame, columns: Sequence[str], path: Path, kind: str) -> None:
    """Raise when a column that ``kind`` result files need is missing."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ResultError(f"{path} has no column {', '.join(missing)}; {kind} result files need it (run the script again).")


def _schema_names(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with ipc.open_file(str(path)) as reader:
            return list(reader.schema.names)
    except pa.ArrowInvalid as err:
        raise ResultError(f"{path} is not a feather file ({err}). Delete it or move it out of the results folder.") from err


def single_value(df: pd.DataFrame, column: str, path: Path):
    """The one value of ``column`` in a file (a result file holds one method / size)."""
    values = df[column].dropna().unique()
    if len(values) != 1:
        raise ResultError(f"{path} has {len(values)} different values in column {column!r} ({list(values)[:5]}); expected one.")
    value = values[0]
    return value.item() if hasattr(value, "item") else value


def series_label(method: str, positions: str | None) -> str:
    """Name of a method in tables and plots: FlexAttention rows add their position mode."""
    return f"{method}_{positions}" if positions else method


def fmt(value) -> str:
    """Numbers with 3 decimals, missing values as empty text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub Markdown table of ``df`` (no extra package needed)."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def text_table(df: pd.DataFrame) -> str:
    """Aligned plain-text table for the terminal."""
    return df.to_string(index=False, formatters={c: fmt for c in df.columns}, na_rep="")


def write_table(df: pd.DataFrame, folder: Path, stem: str, title: str) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.md``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    csv, md = folder / f"{stem}.csv", folder / f"{stem}.md"
    df.to_csv(csv, index=False, float_format="%.6g")
    md.write_text(f"# {title}\n\n{markdown_table(df)}")
    return [csv, md]
