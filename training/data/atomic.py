"""RecBole atomic files: `<name>.inter` (+ optional `<name>.item`), tab-separated with typed headers.

Header fields are `name:type`, type one of token, token_seq, float, float_seq
(e.g. `user_id:token	item_id:token	rating:float	timestamp:float`). Attribute rules for `.item`:
token_seq becomes a list split on spaces, except a field whose name contains "title" or "name", which stays one
string; the MovieLens fields get friendly names (movie_title -> title, release_year -> year, class -> genres).
Without a `timestamp` field the order of the rows is the order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.common import DataFormatError, instruction_for, make_interactions
from training.data.dataset import AttrValue, LoadReport, RawDataset

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
# RecBole's MovieLens field names -> the attribute names used in prompts (and in the paper's examples).
FRIENDLY_NAMES = {"movie_title": "title", "release_year": "year", "class": "genres", "genre": "genres"}


def load_atomic(path: str | Path, name: str | None = None, instruction: str | None = None) -> RawDataset:
    """Load RecBole atomic files. `path` is the `.inter` file or a directory holding exactly one `.inter`."""
    inter = find_inter_file(Path(path))
    name = name or inter.stem
    report = LoadReport()
    interactions = read_inter(inter, report)
    item_file = inter.with_suffix(".item")
    items = read_item(item_file, report) if item_file.is_file() else {}
    return RawDataset(name, interactions, items, report, instruction or instruction_for(name))


def find_inter_file(path: Path) -> Path:
    """The `.inter` file a path designates; a directory must hold exactly one (or one named after it)."""
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.inter"))
    named = path / f"{path.name}.inter"
    if named in candidates:
        return named
    if len(candidates) != 1:
        raise DataFormatError(
            f"expected one RecBole .inter file, found {[c.name for c in candidates]}; pass the file itself",
            file=path,
        )
    return candidates[0]


def _read_table(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read a tab-separated atomic file as text; returns (frame with bare column names, name -> type)."""
    try:
        # QUOTE_NONE: titles contain quotes that are data, not CSV quoting.
        df = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_NONE
        )
    except pd.errors.ParserError as err:
        raise DataFormatError(
            f"cannot be parsed as tab-separated values ({str(err).strip()})", file=path
        ) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"is not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    except pd.errors.EmptyDataError:
        raise DataFormatError("is empty (a typed header is required)", file=path) from None
    types: dict[str, str] = {}
    for col in df.columns:
        fname, sep, ftype = str(col).rpartition(":")
        if not sep or ftype not in FIELD_TYPES:
            raise DataFormatError(
                f"header field {col!r} is not 'name:type' with type in {list(FIELD_TYPES)}", file=path, line=1
            )
        types[fname] = ftype
    df.columns = list(types)
    return df, types


def read_inter(path: Path, report: LoadReport) -> pd.DataFrame:
    """Read a `.inter` file into the canonical interactions frame."""
    df, _types = _read_table(path)
    for col in ("user_id", "item_id"):
        if col not in df.columns:
            raise DataFormatError(f"header lacks field '{col}'; found {list(df.columns)}", file=path, line=1)
    lines = np.arange(len(df), dtype=np.int64) + 2
    if "timestamp" in df.columns:
        ts, field, numeric_text = df["timestamp"].to_numpy(), "timestamp", True
    else:
        ts, field, numeric_text = np.arange(len(df), dtype=np.float64), "position", False
    return make_interactions(
        df["user_id"].to_numpy(), df["item_id"].to_numpy(), ts, lines, path, report, field, numeric_text
    )


def read_item(path: Path, report: LoadReport) -> dict[str, dict[str, AttrValue]]:
    """Read a `.item` file: item_id -> attributes, per the type rules in the module docstring."""
    df, types = _read_table(path)
    if "item_id" not in df.columns:
        raise DataFormatError(f"header lacks field 'item_id'; found {list(df.columns)}", file=path, line=1)
    fields = [f for f in df.columns if f != "item_id"]
    columns = {f: df[f].to_numpy() for f in fields}
    items: dict[str, dict[str, AttrValue]] = {}
    for row, item_id in enumerate(df["item_id"].to_numpy()):
        item_id = item_id.strip()
        if not item_id:
            report.skip(path, "missing item_id")
            continue
        if item_id in items:
            report.skip(path, "duplicate item_id (first kept)")
            continue
        attrs: dict[str, AttrValue] = {}
        for f in fields:
            value = columns[f][row]
            tokens = value.split()
            if not tokens:
                continue
            is_seq = types[f].endswith("_seq") and not ("title" in f or "name" in f)
            attrs[FRIENDLY_NAMES.get(f, f)] = tokens if is_seq else " ".join(tokens)
        items[item_id] = attrs
    return items
