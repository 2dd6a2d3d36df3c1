"""Shared pieces of the loaders: the format error, file opening, JSON-lines reading, value cleaning, and the
one place that turns parsed columns into a `RawDataset` interactions frame (so missing ids are counted the same
way everywhere).
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from training.data.dataset import AttrValue, LoadReport

GZIP_MAGIC = b"\x1f\x8b"
_NOTHING = object()


class DataFormatError(ValueError):
    """A source file is malformed. `file`, `line` (1-based) and `field` say where, when known."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.file = Path(file).name if file is not None else None
        self.line = line
        self.field = field
        where = self.file or ""
        if line is not None:
            where += f" line {line}"
        if field is not None:
            message = f"field '{field}' {message}"
        super().__init__(f"{where}: {message}" if where else message)


class UnknownFormatError(DataFormatError):
    """No supported format matches the files at a path."""


def open_text(path: str | Path, encoding: str = "utf-8") -> TextIO:
    """Open a text file, transparently gunzipping it when it starts with the gzip magic bytes (not by name)."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == GZIP_MAGIC:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors="strict")
    return open(path, encoding=encoding)


def read_lines(path: str | Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) of a text file (gzip or plain); decoding and gzip damage become
    DataFormatError (the line number is approximate there: text is decoded in chunks)."""
    lineno = 0
    try:
        with open_text(path, encoding) as f:
            for lineno, line in enumerate(f, start=1):
                yield lineno, line
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"is not {encoding} text near line {lineno + 1} ({err.reason})", file=path
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataFormatError(f"is a damaged gzip file near line {lineno + 1} ({err})", file=path) from None


def iter_records(
    path: str | Path, allow_python_literals: bool = False
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file (gzip or plain).

    `allow_python_literals`: the 2014 Amazon metadata dumps are Python reprs (single quotes), not JSON, so fall
    back to `ast.literal_eval`, which evaluates literals only, never code.
    """
    # Once a file proves to be Python reprs, try literal_eval first: json.loads would fail on every line.
    parsers = [json.loads, ast.literal_eval] if allow_python_literals else [json.loads]
    for lineno, line in read_lines(path):
        line = line.strip()
        if not line:
            continue
        obj, errors = _NOTHING, []
        for parse in parsers:
            try:
                obj = parse(line)
                break
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                errors.append(err)
        if obj is _NOTHING:
            what = "neither JSON nor a Python literal" if allow_python_literals else "not valid JSON"
            raise DataFormatError(f"{what} ({errors[0]})", file=path, line=lineno)
        if errors and parsers[0] is json.loads:
            parsers.reverse()
        if not isinstance(obj, dict):
            raise DataFormatError(f"expected an object, got {type(obj).__name__}", file=path, line=lineno)
        yield lineno, obj


def clean_value(value: Any) -> AttrValue | None:
    """Normalise one attribute value to str or list[str]; None for empty/missing values (so they are left out).

    Numbers become their text; nested lists (Amazon 2014 `categories` is a list of lists) are flattened with
    duplicates removed in first-seen order; dicts become compact JSON text.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = " ".join(value.split())
        return value or None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:  # NaN
            return None
        return str(value)
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for v in _flatten(value):
            c = clean_value(v)
            if isinstance(c, str) and c not in out:
                out.append(c)
        return out or None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else None
    return clean_value(str(value))


def _flatten(values: Sequence[Any]) -> Iterator[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


def clean_attrs(raw: dict[str, Any], skip: Sequence[str] = ()) -> dict[str, AttrValue]:
    """Clean every attribute of a record, dropping the `skip` keys and empty values; keeps key order."""
    out: dict[str, AttrValue] = {}
    for k, v in raw.items():
        if k in skip:
            continue
        c = clean_value(v)
        if c is not None:
            out[str(k)] = c
    return out


def parse_numbers(
    values: Sequence[str] | np.ndarray, lines: np.ndarray, file: str | Path, field: str
) -> np.ndarray:
    """Parse text to float64, raising a DataFormatError at the first value that is not a number."""
    arr = pd.Series(np.asarray(values, dtype=object))
    out = pd.to_numeric(arr, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(f"is not a number: {arr.iloc[i]!r}", file=file, line=int(lines[i]), field=field)
    return out


def make_interactions(
    users: Sequence[Any],
    items: Sequence[Any],
    ts: Sequence[Any] | np.ndarray,
    lines: Sequence[int] | np.ndarray,
    file: str | Path,
    report: LoadReport,
    ts_field: str = "timestamp",
    ts_is_numeric_text: bool = True,
) -> pd.DataFrame:
    """Build the canonical interactions frame (user_id, item_id as str; ts float64; source order kept).

    Rows whose user or item id is missing/empty are counted in `report` under the file and reason and left out;
    rows with an empty timestamp likewise. A timestamp that is present but not a number raises DataFormatError
    naming the line. `ts` may already be numeric (`ts_is_numeric_text=False`), then only NaN counts as missing.
    """
    n = len(users)
    report.rows_read += n
    u = pd.Series(np.asarray(users, dtype=object)).fillna("").astype(str).str.strip()
    it = pd.Series(np.asarray(items, dtype=object)).fillna("").astype(str).str.strip()
    lines = np.asarray(lines, dtype=np.int64)
    no_u, no_i = (u == "").to_numpy(), (it == "").to_numpy()
    report.skip(file, "missing user_id and item_id", int((no_u & no_i).sum()))
    report.skip(file, "missing user_id", int((no_u & ~no_i).sum()))
    report.skip(file, "missing item_id", int((~no_u & no_i).sum()))
    keep = ~(no_u | no_i)
    if ts_is_numeric_text:
        t = pd.Series(np.asarray(ts, dtype=object)).fillna("").astype(str).str.strip()
        no_t = (t == "").to_numpy() & keep
        report.skip(file, f"missing {ts_field}", int(no_t.sum()))
        keep &= ~no_t
        ts_arr = parse_numbers(t.to_numpy()[keep], lines[keep], file, ts_field)
    else:
        ts_all = np.asarray(ts, dtype=np.float64)
        no_t = np.isnan(ts_all) & keep
        report.skip(file, f"missing {ts_field}", int(no_t.sum()))
        keep &= ~no_t
        ts_arr = ts_all[keep]
    return pd.DataFrame(
        {
            "user_id": u.to_numpy()[keep].astype(object),
            "item_id": it.to_numpy()[keep].astype(object),
            "ts": ts_arr.astype(np.float64),
        }
    )


_INSTRUCTIONS = [
    (re.compile(r"^(ml|movielens|movie|netflix)"), "The movie has the following attributes: "),
    (re.compile(r"(yelp|poi|foursquare|gowalla)"), "The point of interest has the following attributes: "),
]


def instruction_for(name: str) -> str:
    """Domain instruction (the paper's `I`) guessed from a dataset name.

    'ml-100k' -> movie, 'yelp' -> point of interest, 'amazon-beauty' / 'Beauty' -> 'The beauty item ...';
    anything else -> 'The item has the following attributes: '.
    """
    low = name.lower().strip()
    for pattern, text in _INSTRUCTIONS:
        if pattern.search(low):
            return text
    domain = re.sub(r"^(amazon|reviews|meta)[-_ ]*", "", low)
    domain = re.sub(r"[-_ ]*(\d+(core)?|5-core)$", "", domain)  # "beauty_5" -> "beauty"
    domain = re.sub(r"^all[-_ ]+", "", domain).replace("_", " ").replace("-", " ").strip()
    if domain and domain not in {"amazon", "data", "dataset", "items"}:
        return f"The {domain} item has the following attributes: "
    return "The item has the following attributes: "
