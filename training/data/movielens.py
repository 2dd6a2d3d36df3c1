"""MovieLens raw downloads from GroupLens.

ml-100k: `u.data` (user, item, rating, ts; tab-separated) + `u.item` (pipe-separated, latin-1: id | title |
release date | video date | url | 19 genre flags, names from `u.genre` when present).
ml-1m / ml-10m: `ratings.dat` (user::item::rating::ts) + `movies.dat` (id::title::genres "A|B").
ml-20m and later: `ratings.csv` (userId,movieId,rating,timestamp) + `movies.csv` (movieId,title,genres).
Titles "Toy Story (1995)" become title "Toy Story" + year "1995"; genres become a list.
Attributes: title, year, genres (the same names the RecBole ml-100k loader produces).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd

from training.data.common import DataFormatError, make_interactions
from training.data.dataset import AttrValue, LoadReport, RawDataset

INSTRUCTION = "The movie has the following attributes: "
ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
NO_GENRE = {"(no genres listed)"}


def movielens_layout(directory: Path) -> str | None:
    """'100k', 'dat' or 'csv' by the ratings file present; None if none is."""
    if (directory / "u.data").is_file():
        return "100k"
    if (directory / "ratings.dat").is_file():
        return "dat"
    if (directory / "ratings.csv").is_file() and (directory / "movies.csv").is_file():
        return "csv"
    return None


def load_movielens(
    directory: str | Path, name: str | None = None, instruction: str | None = None
) -> RawDataset:
    """Load a MovieLens directory (any of the three layouts in the module docstring)."""
    directory = Path(directory)
    layout = movielens_layout(directory)
    report = LoadReport()
    if layout == "100k":
        rows = _read_split(directory / "u.data", "\t", 4, "latin-1", header=False)
        items = _read_100k_items(directory, report)
    elif layout == "dat":
        rows = _read_split(directory / "ratings.dat", "::", 4, "latin-1", header=False)
        items = _read_movies(_read_split(directory / "movies.dat", "::", 3, "latin-1", False), report)
    elif layout == "csv":
        rows = _read_csv(directory / "ratings.csv", ["userId", "movieId", "rating", "timestamp"])
        items = _read_movies(_read_csv(directory / "movies.csv", ["movieId", "title", "genres"]), report)
    else:
        raise DataFormatError("no MovieLens ratings file (u.data, ratings.dat, ratings.csv)", file=directory)
    path, fields, lines = rows
    inter = make_interactions(fields[0], fields[1], fields[3], lines, path, report, "timestamp")
    return RawDataset(name or directory.resolve().name, inter, items, report, instruction or INSTRUCTION)


Rows = tuple[Path, list[np.ndarray], np.ndarray]  # (file, one array of str per column, 1-based line numbers)


def _read_split(path: Path, sep: str, n_fields: int, encoding: str, header: bool) -> Rows:
    """Split a delimited file by hand (`::` is not a CSV dialect pandas' C engine reads); checks field counts."""
    if not path.is_file():
        raise DataFormatError("file not found", file=path)
    cols: list[list[str]] = [[] for _ in range(n_fields)]
    lines: list[int] = []
    with open(path, encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if (header and lineno == 1) or not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) < n_fields:
                raise DataFormatError(
                    f"has {len(parts)} fields separated by {sep!r}, expected {n_fields}",
                    file=path,
                    line=lineno,
                )
            if len(parts) > n_fields:  # a separator inside the last field (titles/genres) belongs to it
                parts = parts[: n_fields - 1] + [sep.join(parts[n_fields - 1 :])]
            for c, p in zip(cols, parts):
                c.append(p)
            lines.append(lineno)
    return path, [np.asarray(c, dtype=object) for c in cols], np.asarray(lines, dtype=np.int64)


def _read_csv(path: Path, columns: list[str]) -> Rows:
    if not path.is_file():
        raise DataFormatError("file not found", file=path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_MINIMAL)
    except pd.errors.ParserError as err:
        raise DataFormatError(f"cannot be parsed as CSV ({str(err).strip()})", file=path) from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataFormatError(f"header lacks column(s) {missing}", file=path, line=1)
    lines = np.arange(len(df), dtype=np.int64) + 2
    return path, [df[c].to_numpy() for c in columns], lines


def split_title(title: str) -> tuple[str, str | None]:
    """'Toy Story (1995)' -> ('Toy Story', '1995'); a title without a trailing year is kept whole."""
    m = TITLE_YEAR.match(title.strip())
    return (m.group(1), m.group(2)) if m else (title.strip(), None)


def _movie_attrs(title: str, year: str | None, genres: list[str]) -> dict[str, AttrValue]:
    t, y = split_title(title)
    attrs: dict[str, AttrValue] = {}
    if t:
        attrs["title"] = t
    yr = year or y
    if yr:
        attrs["year"] = yr
    genres = [g for g in genres if g and g not in NO_GENRE]
    if genres:
        attrs["genres"] = genres
    return attrs


def _read_movies(rows: Rows, report: LoadReport) -> dict[str, dict[str, AttrValue]]:
    path, (ids, titles, genres), _lines = rows
    items: dict[str, dict[str, AttrValue]] = {}
    for item_id, title, g in zip(ids, titles, genres):
        item_id = item_id.strip()
        if not item_id:
            report.skip(path, "missing movie id")
            continue
        items[item_id] = _movie_attrs(title, None, g.split("|"))
    return items


def _read_100k_items(directory: Path, report: LoadReport) -> dict[str, dict[str, AttrValue]]:
    genre_names = list(ML100K_GENRES)
    genre_file = directory / "u.genre"
    if genre_file.is_file():  # "name|index" lines
        pairs = [ln.split("|") for ln in genre_file.read_text(encoding="latin-1").splitlines() if "|" in ln]
        genre_names = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    path, cols, lines = _read_split(directory / "u.item", "|", 5 + len(genre_names), "latin-1", False)
    items: dict[str, dict[str, AttrValue]] = {}
    for row, item_id in enumerate(cols[0]):
        item_id = item_id.strip()
        if not item_id:
            report.skip(path, "missing movie id")
            continue
        flags = [cols[5 + g][row].strip() for g in range(len(genre_names))]
        bad = next((f for f in flags if f not in ("0", "1")), None)
        if bad is not None:
            raise DataFormatError(
                f"is not a 0/1 genre flag: {bad!r}", file=path, line=int(lines[row]), field="genre"
            )
        release = cols[2][row].strip()  # "01-Jan-1995"
        year = release[-4:] if re.fullmatch(r".*\d{4}", release) else None
        genres = [n for n, f in zip(genre_names, flags) if f == "1"]
        items[item_id] = _movie_attrs(cols[1][row], year, genres)
    return items
