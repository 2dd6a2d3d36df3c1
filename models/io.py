"""Small durable-file helpers: sha256 and atomic writes (tmp file in the same dir, fsync, os.replace, fsync dir).

Used by the bundle format and by anything else that must never leave a half-written file behind (data caches,
results.json, the service's catalog overlay). A reader sees either the old file or the new one, never a mix,
and after the call returns the new content survives a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_CHUNK = 1 << 20  # 1 MiB reads: large enough to saturate a disk, small enough to never matter for memory

TABLE_KEY = "weight"  # the tensor name inside every table file (as in nn.Embedding.weight)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file already written (and closed) by someone else to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable. A no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: directories cannot be opened, and rename durability is the OS's business
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path_for(path: str | os.PathLike) -> Path:
    """A unique hidden sibling of `path` (same dir, so os.replace onto `path` is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp sibling of `path` for writing; on a clean exit fsync it and os.replace it onto `path`.

    On an exception the temp file is removed and `path` is untouched. Use for streamed writes too large to hold
    in memory (e.g. an items.jsonl of millions of lines):

        with atomic_open(p, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\\n")
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"atomic_open needs mode 'w', 'wt' or 'wb', got {mode!r}")
    p = Path(path)
    tmp = tmp_path_for(p)
    f = open(tmp, mode, encoding=encoding)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, p)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically and durably."""
    atomic_write_bytes(path, text.encode(encoding))
