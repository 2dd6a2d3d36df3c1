"""The canonical on-disk format: a directory with `interactions.csv` and `items.jsonl`.

interactions.csv: header with `user_id`, `item_id` and one order column: `timestamp` (a number, e.g. unix
seconds) or `position` (0..n-1 per user, when the source has only the order). Other columns are ignored.
items.jsonl: one object per line, `{"item_id": ..., "<attribute>": value, ...}`; values are strings, numbers or
lists of them. The dataset name is the directory name.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.common import (
    DataFormatError,
    clean_attrs,
    instruction_for,
    iter_records,
    make_interactions,
)
from training.data.dataset import AttrValue, LoadReport, RawDataset

INTERACTIONS = "interactions.csv"
ITEMS = "items.jsonl"
ORDER_COLUMNS = ("timestamp", "position")  # first present wins


def load_canonical(
    directory: str | Path, name: str | None = None, instruction: str | None = None
) -> RawDataset:
    """Load a canonical dataset directory. Raises DataFormatError (file, line, field) on malformed content."""
    directory = Path(directory)
    name = name or directory.resolve().name
    report = LoadReport()
    interactions = read_interactions_csv(directory / INTERACTIONS, report)
    items = read_items_jsonl(directory / ITEMS, report)
    return RawDataset(
        name=name,
        interactions=interactions,
        items=items,
        report=report,
        instruction=instruction or instruction_for(name),
    )


def read_interactions_csv(path: Path, report: LoadReport) -> pd.DataFrame:
    """Read interactions.csv into the canonical frame; line numbers in errors count the header as line 1."""
    if not path.is_file():
        raise DataFormatError("file not found", file=path)
    try:
        # dtype=str and no NA parsing: ids like "NA" or "0001" must survive verbatim.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_MINIMAL)
    except pd.errors.ParserError as err:
        raise DataFormatError(f"cannot be parsed as CSV ({str(err).strip()})", file=path) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"is not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    except pd.errors.EmptyDataError:
        raise DataFormatError(
            "is empty (a header with user_id,item_id,timestamp is required)", file=path
        ) from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("user_id", "item_id") if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"header lacks column(s) {missing}; found {list(df.columns)}", file=path, line=1
        )
    order = next((c for c in ORDER_COLUMNS if c in df.columns), None)
    if order is None:
        raise DataFormatError(
            f"header needs an order column, one of {list(ORDER_COLUMNS)}; found {list(df.columns)}",
            file=path,
            line=1,
        )
    lines = np.arange(len(df), dtype=np.int64) + 2  # header is line 1
    return make_interactions(
        df["user_id"].to_numpy(), df["item_id"].to_numpy(), df[order].to_numpy(), lines, path, report, order
    )


def read_items_jsonl(path: Path, report: LoadReport) -> dict[str, dict[str, AttrValue]]:
    """Read items.jsonl: item_id -> cleaned attribute map. Missing ids and duplicates are counted, first kept."""
    if not path.is_file():
        raise DataFormatError("file not found (the item catalog is required)", file=path)
    items: dict[str, dict[str, AttrValue]] = {}
    for _lineno, rec in iter_records(path):
        item_id = rec.get("item_id")
        item_id = "" if item_id is None else str(item_id).strip()
        if not item_id:
            report.skip(path, "missing item_id")
            continue
        if item_id in items:
            report.skip(path, "duplicate item_id (first kept)")
            continue
        items[item_id] = clean_attrs(rec, skip=("item_id",))
    return items
