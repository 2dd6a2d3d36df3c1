"""The catalog overlay: items registered by the service after a bundle was exported (docs/ARTIFACTS.md).

    <overlays>/<bundle_id>/items.jsonl    append-only, one line per registration, the shape of a bundle's
                                          items.jsonl plus "seq" and "registered": {"row", "id", "attributes",
                                          "seq", "registered"}; an upsert is a new line with the same row
    <overlays>/<bundle_id>/vectors.bin    append-only cache of the registered vectors, so a restart does not
                                          re-embed: a header, then per line of items.jsonl one record
                                          (int64 seq, int64 row, float32 vectors of every space, little-endian)

items.jsonl is the truth; vectors.bin is a cache keyed by ``seq``. Each append writes and fsyncs the vectors
first, then the lines, so a crash leaves at worst a vector record without its line (ignored). A torn last line or
record (a crash mid-write) is cut off when the overlay is next opened. A record missing from the cache, or a
cache written for other dimensions, is recomputed by the engine and the cache rewritten atomically.

Several processes (the HTTP processes of one ``llmemb serve --processes N``, or servers sharing an artifacts
volume) share one overlay. Appends hold an exclusive ``flock`` and refuse (``OverlayChanged``) when items.jsonl
grew since this process last read or wrote it, since the rows it would hand out could collide. A writer therefore
takes the lock for its whole registration (``hold``), reads what the others appended (``tail``), and only then
assigns rows and appends. Readers notice growth with one ``stat`` (``stale``) and read the new lines with
``tail``, under a shared lock, so they never see half of an append.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import ITEMS_FILE
from models.io import atomic_open, fsync_dir

log = logging.getLogger(__name__)

VECTORS_FILE = "vectors.bin"
_MAGIC = b"LLMEMBOV"
_FORMAT = "llmemb.overlay.vectors"
_REC_HEAD = struct.Struct("<qq")  # seq, row


class OverlayError(RuntimeError):
    """The overlay on disk is inconsistent with its bundle (the message says which line and how)."""


class OverlayChanged(OverlayError):
    """Another process appended to the overlay since this one read it (reload to pick its items up)."""


@dataclass(frozen=True)
class OverlayRecord:
    row: int
    id: str
    attributes: dict[str, Any]
    seq: int
    registered: str  # ISO-8601 UTC

    def line(self) -> str:
        obj = {
            "row": self.row,
            "id": self.id,
            "attributes": self.attributes,
            "seq": self.seq,
            "registered": self.registered,
        }
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


class Overlay:
    """The overlay dir of one bundle; ``spaces`` = ordered {space name: dim} of the vectors kept per item."""

    def __init__(self, root: str | os.PathLike, bundle_id: str, spaces: Mapping[str, int]) -> None:
        self.dir = Path(root) / bundle_id
        self.bundle_id = bundle_id
        self.spaces = dict(spaces)
        self.items_path = self.dir / ITEMS_FILE
        self.vectors_path = self.dir / VECTORS_FILE
        self._width = sum(self.spaces.values())
        self._rec = _REC_HEAD.size + 4 * self._width
        self._known_size = 0  # bytes of items.jsonl this process has read or written
        self._vectors_read = 0  # bytes of vectors.bin scanned so far (tail reads on from here)
        self._tail_from = (0, 0)  # the read marks before the last tail (rewind)
        self._held: Any = None  # the lock file while ``hold`` keeps the exclusive lock

    # --- reading --------------------------------------------------------------------------------------------

    def load(self) -> tuple[list[OverlayRecord], dict[int, dict[str, np.ndarray]]]:
        """(every line in order, {seq: {space: vector}} of the cached vectors that fit the current spaces)."""
        if not self.items_path.is_file():
            if self.vectors_path.is_file():  # a cache without its lines is meaningless
                self.vectors_path.unlink()
            return [], {}
        with self._locked(exclusive=True):
            records = self._read_lines()
            vectors = self._read_vectors()
            self._known_size = self.items_path.stat().st_size
        return records, vectors

    def stale(self) -> bool:
        """True when items.jsonl has lines this process has not read (another process appended them)."""
        try:
            return os.stat(self.items_path).st_size != self._known_size
        except FileNotFoundError:
            return self._known_size != 0

    def tail(self) -> tuple[list[OverlayRecord], dict[int, dict[str, np.ndarray]]]:
        """The lines appended since this process last read or wrote items.jsonl (whole lines only) and their
        cached vectors ({seq: {space: vector}}; a seq missing there must be recomputed). Moves the read mark on."""
        with self._locked(exclusive=False):
            try:
                with open(self.items_path, "rb") as f:
                    f.seek(self._known_size)
                    data = f.read()
            except FileNotFoundError:
                return [], {}
            data = data[: data.rfind(b"\n") + 1]  # a torn line (a writer that crashed) is not a record yet
            records = self._parse_lines(data, first=0)
            self._tail_from = (self._known_size, self._vectors_read)
            vectors = self._scan_vectors(since=self._vectors_read)
            if any(r.seq not in vectors for r in records):  # the cache was rewritten meanwhile: read it all
                vectors = self._scan_vectors(since=0)
            self._known_size += len(data)
        return records, vectors

    def rewind(self) -> None:
        """Undo the last ``tail``'s move of the read mark: its lines could not be applied and are read again."""
        self._known_size, self._vectors_read = self._tail_from

    def _read_lines(self) -> list[OverlayRecord]:
        data = self.items_path.read_bytes()
        if data and not data.endswith(b"\n"):  # torn last line from a crash mid-append: cut it off
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last line (%d bytes)", self.items_path, len(data) - keep)
            with open(self.items_path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
        return self._parse_lines(data, first=0)

    def _parse_lines(self, data: bytes, first: int) -> list[OverlayRecord]:
        out = []
        for n, raw in enumerate(data.decode("utf-8").splitlines(), start=first + 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                rec = OverlayRecord(
                    row=int(obj["row"]),
                    id=str(obj["id"]),
                    attributes=dict(obj.get("attributes") or {}),
                    seq=int(obj.get("seq", n)),
                    registered=str(obj.get("registered", "")),
                )
            except (ValueError, KeyError, TypeError) as e:
                raise OverlayError(f"{self.items_path}: line {n} is not a valid overlay record: {e}") from e
            out.append(rec)
        return out

    def _header(self) -> bytes:
        meta = {
            "format": _FORMAT,
            "version": 1,
            "bundle_id": self.bundle_id,
            "spaces": [[k, v] for k, v in self.spaces.items()],
            "dtype": "<f4",
        }
        blob = json.dumps(meta, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(blob)) + blob

    def _read_vectors(self) -> dict[int, dict[str, np.ndarray]]:
        """Every cached vector; a torn last record (a crash mid-append) is cut off (exclusive lock held)."""
        if not self.vectors_path.is_file() or self._width == 0:
            return {}
        size = self.vectors_path.stat().st_size
        head = len(self._header())
        whole = head + max(0, size - head) // self._rec * self._rec
        if size > head and whole != size:
            log.warning("%s: dropping a torn last record", self.vectors_path)
            with open(self.vectors_path, "r+b") as f:
                f.truncate(whole)
                f.flush()
                os.fsync(f.fileno())
        return self._scan_vectors(since=0)

    def _scan_vectors(self, since: int) -> dict[int, dict[str, np.ndarray]]:
        """{seq: vectors} of the whole records from byte ``since`` on (0: the whole file, header checked)."""
        self._vectors_read = since
        if not self.vectors_path.is_file() or self._width == 0:
            return {}
        header = self._header()
        with open(self.vectors_path, "rb") as f:
            if f.read(len(header)) != header:
                log.warning(
                    "%s: written for other dimensions or another format; vectors will be recomputed",
                    self.vectors_path,
                )
                return {}
            start = len(header) + max(0, since - len(header)) // self._rec * self._rec
            f.seek(start)
            body = f.read()
        whole = len(body) // self._rec * self._rec
        out: dict[int, dict[str, np.ndarray]] = {}
        for off in range(0, whole, self._rec):
            seq, _row = _REC_HEAD.unpack_from(body, off)
            flat = np.frombuffer(body, dtype="<f4", count=self._width, offset=off + _REC_HEAD.size)
            out[seq] = self._split(flat.astype(np.float32))
        self._vectors_read = start + whole
        return out

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, at = {}, 0
        for name, dim in self.spaces.items():
            out[name] = flat[at : at + dim].copy()
            at += dim
        return out

    # --- writing --------------------------------------------------------------------------------------------

    def append(self, records: list[OverlayRecord], vectors: Mapping[str, np.ndarray]) -> None:
        """Durably append ``records`` and their vectors (``vectors[space]`` is (len(records), dim))."""
        if not records:
            return
        fresh = not self.dir.is_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            fsync_dir(self.dir.parent)
        with self._locked(exclusive=True):
            size = self.items_path.stat().st_size if self.items_path.exists() else 0
            if size != self._known_size:  # rows were handed out by another writer: ours would collide
                raise OverlayChanged(
                    f"{self.items_path} was changed by another process ({size} bytes, {self._known_size} expected)"
                )
            if self._width:
                blob = b"".join(
                    self._record_bytes(r, {s: vectors[s][i] for s in self.spaces})
                    for i, r in enumerate(records)
                )
                self._append_bytes(self.vectors_path, blob, header=self._header())
            self._append_bytes(self.items_path, "".join(r.line() for r in records).encode("utf-8"))
            self._known_size = self.items_path.stat().st_size
            if self._width:
                self._vectors_read = self.vectors_path.stat().st_size

    def rewrite_vectors(
        self, records: list[OverlayRecord], vectors: Mapping[int, Mapping[str, np.ndarray]]
    ) -> None:
        """Replace the vector cache with one record per line of ``records`` (after recomputing missing ones)."""
        if not self._width:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locked(exclusive=True), atomic_open(self.vectors_path, "wb") as f:
            f.write(self._header())
            for r in records:
                f.write(self._record_bytes(r, vectors[r.seq]))
        self._vectors_read = self.vectors_path.stat().st_size

    def _record_bytes(self, rec: OverlayRecord, vecs: Mapping[str, np.ndarray]) -> bytes:
        parts = [_REC_HEAD.pack(rec.seq, rec.row)]
        for name, dim in self.spaces.items():
            v = np.asarray(vecs[name], dtype="<f4").reshape(-1)
            if v.shape[0] != dim:
                raise ValueError(f"{name} vector has {v.shape[0]} dims, expected {dim}")
            parts.append(v.tobytes())
        return b"".join(parts)

    @staticmethod
    def _append_bytes(path: Path, blob: bytes, header: bytes | None = None) -> None:
        created = not path.exists()
        with open(path, "a+b") as f:
            if header is not None:
                f.seek(0)
                head = f.read(len(header))
                if head and head != header:
                    raise OverlayError(
                        f"{path}: written for other dimensions; reopen the overlay to rebuild it"
                    )
                f.seek(0, os.SEEK_END)
                if not head:
                    f.write(header)
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(path.parent)

    def hold(self) -> None:
        """Take the exclusive lock until ``release`` (blocks while another process holds it): a registration
        holds it from reading the others' lines to appending its own. ``append``, ``tail`` and ``rewrite_vectors``
        called meanwhile in this process run under it."""
        if self._held is not None:
            raise RuntimeError(f"{self.dir}: the overlay lock is already held")
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.dir / ".lock", "a+b")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except BaseException:
            lock.close()
            raise
        self._held = lock

    def release(self) -> None:
        lock, self._held = self._held, None
        if lock is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            lock.close()

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        if self._held is not None:  # hold() has it
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
