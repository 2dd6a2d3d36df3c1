"""Yelp Open Dataset: `review.json` + `business.json` (or the `yelp_academic_dataset_*.json` names).

Reviews: `user_id`, `business_id`, `date` ("YYYY-MM-DD HH:MM:SS", older dumps "YYYY-MM-DD"; read as UTC).
Businesses: name, city, state, categories ("A, B" string -> list; older dumps already a list), stars.
Only businesses that occur in the reviews are kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.data.common import DataFormatError, clean_value, iter_records, make_interactions
from training.data.dataset import AttrValue, LoadReport, RawDataset

INSTRUCTION = "The point of interest has the following attributes: "
REVIEW_FILES = ("review.json", "yelp_academic_dataset_review.json")
BUSINESS_FILES = ("business.json", "yelp_academic_dataset_business.json")
ATTRIBUTES = ("name", "city", "state", "categories", "stars")
DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def find_yelp_file(directory: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` present in `directory` (plain or .gz)."""
    for n in names:
        for cand in (directory / n, directory / f"{n}.gz"):
            if cand.is_file():
                return cand
    return None


def load_yelp(directory: str | Path, name: str | None = None, instruction: str | None = None) -> RawDataset:
    """Load a Yelp dump directory; the business file is optional (items then have no attributes)."""
    directory = Path(directory)
    reviews = find_yelp_file(directory, REVIEW_FILES)
    if reviews is None:
        raise DataFormatError(f"no Yelp review file (looked for {list(REVIEW_FILES)})", file=directory)
    report = LoadReport()
    interactions = read_reviews(reviews, report)
    business = find_yelp_file(directory, BUSINESS_FILES)
    wanted = set(interactions["item_id"])
    items = read_businesses(business, report, wanted) if business is not None else {}
    name = name or directory.resolve().name
    return RawDataset(name, interactions, items, report, instruction or INSTRUCTION)


def read_reviews(path: Path, report: LoadReport) -> pd.DataFrame:
    """review.json -> canonical interactions frame, ts in unix seconds."""
    users: list[object] = []
    items: list[object] = []
    dates: list[object] = []
    lines: list[int] = []
    for lineno, rec in iter_records(path):
        users.append(rec.get("user_id"))
        items.append(rec.get("business_id"))
        dates.append(rec.get("date"))
        lines.append(lineno)
    ts = parse_dates(dates, np.asarray(lines, dtype=np.int64), path)
    return make_interactions(users, items, ts, lines, path, report, "date", ts_is_numeric_text=False)


def parse_dates(dates: list[object], lines: np.ndarray, path: Path) -> np.ndarray:
    """Date strings -> float64 unix seconds; missing -> NaN (counted later); unparsable -> DataFormatError."""
    text = pd.Series(dates, dtype=object).fillna("").astype(str).str.strip()
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
    for fmt in DATE_FORMATS:  # vectorised per format: a Python loop over millions of dates is too slow
        todo = parsed.isna() & (text != "")
        if not todo.any():
            break
        parsed[todo] = pd.to_datetime(text[todo], format=fmt, errors="coerce")
    bad = np.flatnonzero((parsed.isna() & (text != "")).to_numpy())
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(
            f"is not a date like 'YYYY-MM-DD HH:MM:SS': {text.iloc[i]!r}",
            file=path,
            line=int(lines[i]),
            field="date",
        )
    seconds = parsed.to_numpy().astype("datetime64[ns]").astype(np.int64) / 1e9
    return np.where(parsed.isna().to_numpy(), np.nan, seconds)


def read_businesses(path: Path, report: LoadReport, wanted: set[str]) -> dict[str, dict[str, AttrValue]]:
    """business.json -> business_id -> attributes, for the ids in `wanted`."""
    out: dict[str, dict[str, AttrValue]] = {}
    for _lineno, rec in iter_records(path):
        bid = str(rec.get("business_id") or "").strip()
        if not bid:
            report.skip(path, "missing business_id")
            continue
        if bid not in wanted or bid in out:
            continue
        attrs: dict[str, AttrValue] = {}
        for key in ATTRIBUTES:
            raw = rec.get(key)
            if key == "categories" and isinstance(raw, str):
                raw = [c for c in (p.strip() for p in raw.split(",")) if c]
            value = clean_value(raw)
            if value:
                attrs[key] = value
        out[bid] = attrs
    return out
