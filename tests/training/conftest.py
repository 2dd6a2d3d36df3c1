"""Helpers for the data tests: write small hand-made source files into tmp_path."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

# The real Amazon Beauty set lives beside the repo (../shared/data); tests using it skip when it is absent.
BEAUTY_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-beauty"


def write_text(path: Path, text: str, gz: bool = False, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` (parents created), gzip-compressed when gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_jsonl(path: Path, records: Iterable[dict | str], gz: bool = False) -> Path:
    """One record per line; str records are written verbatim (for Python-literal or broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    return write_text(path, "\n".join(lines) + "\n", gz=gz)


@pytest.fixture
def text_file() -> Callable[..., Path]:
    """write_text as a fixture (with --import-mode=importlib tests cannot import conftest)."""
    return write_text


@pytest.fixture
def jsonl_file() -> Callable[..., Path]:
    """write_jsonl as a fixture."""
    return write_jsonl


@pytest.fixture
def beauty_dir() -> Path:
    """The real amazon-beauty directory; skips the test when it is absent."""
    if not (BEAUTY_DIR / "interactions.csv").is_file():
        pytest.skip(f"{BEAUTY_DIR} not present")
    return BEAUTY_DIR


@pytest.fixture
def canonical_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: canonical dataset dir from csv text and item records."""

    def make(csv_text: str, items: Iterable[dict | str] = (), name: str = "toy") -> Path:
        d = tmp_path / name
        write_text(d / "interactions.csv", csv_text)
        write_jsonl(d / "items.jsonl", items)
        return d

    return make
