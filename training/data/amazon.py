"""Amazon review dumps (McAuley lab), 2014 and 2018 editions, gzipped or plain JSON lines.

Reviews (both editions): `reviewerID`, `asin`, `unixReviewTime`; other fields are ignored.
Metadata 2014 (`meta_<Cat>.json.gz`): Python-literal dicts (single quotes) with title, brand,
categories (list of lists), price (number), description (str).
Metadata 2018 (`meta_<Cat>.json.gz`): JSON with title, brand, category (list), price ("$12.99"),
description (list of str). Each record is read by the fields it has, so one loader serves both editions;
both map to the attribute names title, brand, categories, price, description.
Only metadata of items that occur in the reviews is kept (the catalogs are far larger than the review sets).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from training.data.common import (
    DataFormatError,
    clean_value,
    instruction_for,
    iter_records,
    make_interactions,
)
from training.data.dataset import AttrValue, LoadReport, RawDataset

JSON_NAME = re.compile(r"\.json(\.gz)?$")
# Attribute order in the prompt: the paper's Beauty prompt lists title, brand, categories, price, description.
ATTRIBUTES = {
    "title": ("title",),
    "brand": ("brand",),
    "categories": ("categories", "category"),
    "price": ("price",),
    "description": ("description",),
}


def find_amazon_files(path: Path) -> tuple[Path, Path | None]:
    """(reviews file, metadata file or None) for a directory, or for a reviews file given directly."""
    if path.is_file():
        reviews, directory = path, path.parent
    else:
        directory = path
        cands = sorted(
            p for p in directory.iterdir() if JSON_NAME.search(p.name) and not p.name.startswith("meta_")
        )
        preferred = [p for p in cands if p.name.startswith("reviews_")]
        cands = preferred or cands
        if len(cands) != 1:
            raise DataFormatError(
                f"expected one Amazon reviews file (*.json[.gz] not starting with 'meta_'), found "
                f"{[c.name for c in cands]}; pass the reviews file itself",
                file=directory,
            )
        reviews = cands[0]
    metas = sorted(p for p in directory.iterdir() if p.name.startswith("meta_") and JSON_NAME.search(p.name))
    category = category_of(reviews)
    matching = [m for m in metas if category_of(m) == category]
    if len(matching) == 1:
        return reviews, matching[0]
    if len(metas) == 1:
        return reviews, metas[0]
    if len(metas) > 1:
        raise DataFormatError(
            f"cannot tell which metadata file belongs to {reviews.name}: {[m.name for m in metas]}",
            file=directory,
        )
    return reviews, None


def category_of(path: Path) -> str:
    """'reviews_Beauty_5.json.gz' / 'meta_Beauty.json.gz' / 'All_Beauty.json' -> 'Beauty'-ish stem."""
    stem = JSON_NAME.sub("", path.name)
    stem = re.sub(r"^(reviews_|meta_)", "", stem)
    stem = re.sub(r"_5$", "", stem)  # the 5-core review files
    return stem


def load_amazon(
    path: str | Path,
    meta: str | Path | None = None,
    name: str | None = None,
    instruction: str | None = None,
) -> RawDataset:
    """Load an Amazon reviews file (+ metadata). `path`: a directory or the reviews file; `meta` overrides."""
    path = Path(path)
    reviews, found_meta = find_amazon_files(path)
    meta_path = Path(meta) if meta is not None else found_meta
    name = name or (path.resolve().name if path.is_dir() else f"amazon-{category_of(reviews).lower()}")
    report = LoadReport()
    interactions = read_reviews(reviews, report)
    wanted = set(interactions["item_id"])
    items = read_metadata(meta_path, report, wanted) if meta_path is not None else {}
    domain = category_of(meta_path or reviews)
    return RawDataset(name, interactions, items, report, instruction or instruction_for(domain))


def read_reviews(path: Path, report: LoadReport) -> pd.DataFrame:
    """Reviews file -> canonical interactions frame (ts = unixReviewTime, seconds)."""
    users: list[object] = []
    items: list[object] = []
    ts: list[object] = []
    lines: list[int] = []
    for lineno, rec in iter_records(path):
        users.append(rec.get("reviewerID"))
        items.append(rec.get("asin"))
        ts.append(rec.get("unixReviewTime"))
        lines.append(lineno)
    return make_interactions(users, items, ts, lines, path, report, "unixReviewTime")


def read_metadata(path: Path, report: LoadReport, wanted: set[str]) -> dict[str, dict[str, AttrValue]]:
    """Metadata file -> asin -> attributes, for the asins in `wanted`; 2014 Python literals accepted."""
    out: dict[str, dict[str, AttrValue]] = {}
    for _lineno, rec in iter_records(path, allow_python_literals=True):
        asin = str(rec.get("asin") or "").strip()
        if not asin:
            report.skip(path, "missing asin")
            continue
        if asin not in wanted:
            continue
        if asin in out:  # the 2018 dumps repeat some records
            report.skip(path, "duplicate asin (first kept)")
            continue
        attrs: dict[str, AttrValue] = {}
        for attr, keys in ATTRIBUTES.items():
            raw = next((rec[k] for k in keys if k in rec), None)
            value = clean_value(raw)
            if attr == "description" and isinstance(value, list):
                value = " ".join(value)  # 2018: paragraphs as a list -> one text
            if attr == "price" and isinstance(value, str) and not value.startswith("$"):
                value = _price_text(value)
            if value:
                attrs[attr] = value
        out[asin] = attrs
    return out


def _price_text(value: str) -> str:
    """2014 prices are numbers (12.5) -> '$12.50'; other text is kept as is."""
    try:
        return f"${float(value):.2f}"
    except ValueError:
        return value
