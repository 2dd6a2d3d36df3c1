"""`load_dataset`: one entry point that detects a source's format from the files present and dispatches."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from training.data.amazon import load_amazon
from training.data.atomic import load_atomic
from training.data.canonical import INTERACTIONS, load_canonical
from training.data.common import UnknownFormatError
from training.data.dataset import RawDataset
from training.data.movielens import load_movielens, movielens_layout
from training.data.yelp import REVIEW_FILES, find_yelp_file, load_yelp

Loader = Callable[..., RawDataset]
LOADERS: dict[str, Loader] = {
    "canonical": load_canonical,
    "recbole": load_atomic,
    "movielens": load_movielens,
    "yelp": load_yelp,
    "amazon": load_amazon,
}
# What detection looks for, in the order it looks (also the text of the error when nothing matches).
LOOKED_FOR = {
    "canonical": f"{INTERACTIONS} (+ items.jsonl)",
    "recbole": "<name>.inter (+ <name>.item)",
    "movielens": "u.data + u.item (ml-100k), ratings.dat + movies.dat (ml-1m), ratings.csv + movies.csv",
    "yelp": " or ".join(REVIEW_FILES) + " (+ business.json)",
    "amazon": "reviews_<Cat>.json[.gz] or <Cat>.json[.gz] + meta_<Cat>.json[.gz]",
}
FORMAT_ALIASES = {"atomic": "recbole", "amazon2014": "amazon", "amazon2018": "amazon", "ml": "movielens"}
_AMAZON_JSON = re.compile(r"\.json(\.gz)?$")


def detect_format(path: str | Path) -> str:
    """The format name (a key of LOADERS) of a directory, or of a file given directly (.inter, reviews file).

    Raises FileNotFoundError when the path does not exist and UnknownFormatError listing what was looked for.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if path.is_file():
        if path.suffix == ".inter":
            return "recbole"
        if path.name == INTERACTIONS:
            return "canonical"
        if _AMAZON_JSON.search(path.name) and not path.name.startswith("meta_"):
            return "amazon"
        raise UnknownFormatError(
            f"cannot tell the format of file {path.name}; pass its directory or fmt= one of {list(LOADERS)}",
            file=path,
        )
    names = {p.name for p in path.iterdir() if p.is_file()}
    if INTERACTIONS in names:
        return "canonical"
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if movielens_layout(path) is not None:
        return "movielens"
    if find_yelp_file(path, REVIEW_FILES) is not None:
        return "yelp"
    if any(n.startswith(("meta_", "reviews_")) and _AMAZON_JSON.search(n) for n in names):
        return "amazon"
    looked = "; ".join(f"{fmt}: {what}" for fmt, what in LOOKED_FOR.items())
    raise UnknownFormatError(f"no supported dataset format found. Looked for {looked}", file=path)


def load_dataset(
    path: str | Path, fmt: str | None = None, name: str | None = None, instruction: str | None = None
) -> RawDataset:
    """Load any supported source into a RawDataset.

    path: a dataset directory (or an `.inter` / `interactions.csv` / Amazon reviews file).
    fmt: one of LOADERS (or an alias: atomic, amazon2014, amazon2018, ml); detected when None.
    name / instruction: override the dataset name (default: from the directory) and the domain instruction.
    """
    path = Path(path)
    if fmt is None:
        fmt = detect_format(path)
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in LOADERS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(LOADERS) + sorted(FORMAT_ALIASES)}")
    if not path.exists():
        raise FileNotFoundError(f"dataset path does not exist: {path}")
    if path.is_file() and fmt in ("canonical", "movielens", "yelp"):
        path = path.parent  # these loaders take the directory
    return LOADERS[fmt](path, name=name, instruction=instruction)


def resolved_format(path: str | Path, fmt: str | None = None) -> str:
    """The canonical format name `load_dataset` would use (for cache keys)."""
    fmt = detect_format(path) if fmt is None else fmt
    return FORMAT_ALIASES.get(fmt, fmt)
