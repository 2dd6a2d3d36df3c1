"""The overlay shared by several processes (``service.overlay``), file level: one writer's appends reach another
reader through ``stale`` + ``tail`` (lines and cached vectors), never half a line; a writer that has not read the
others' lines is refused; ``hold`` keeps the lock across calls."""

from __future__ import annotations

import fcntl
import threading
import time

import numpy as np
import pytest

from service.overlay import Overlay, OverlayChanged, OverlayRecord

SPACES = {"pca": 3, "item": 2}


def _records(first_row: int, first_seq: int, n: int) -> tuple[list[OverlayRecord], dict[str, np.ndarray]]:
    recs = [
        OverlayRecord(first_row + i, f"id-{first_seq + i}", {"title": f"t{i}"}, first_seq + i, "now")
        for i in range(n)
    ]
    rng = np.random.default_rng(first_seq)
    return recs, {s: rng.normal(size=(n, d)).astype(np.float32) for s, d in SPACES.items()}


def test_a_readers_tail_gets_the_other_writers_lines_and_vectors(tmp_path):
    a, b = Overlay(tmp_path, "bundle", SPACES), Overlay(tmp_path, "bundle", SPACES)
    assert a.load() == ([], {}) and b.load() == ([], {})
    assert not b.stale()
    recs, vecs = _records(11, 1, 2)
    a.append(recs, vecs)
    assert b.stale() and not a.stale()
    got, cached = b.tail()
    assert got == recs and not b.stale()
    for i, r in enumerate(recs):
        for s in SPACES:
            np.testing.assert_array_equal(cached[r.seq][s], vecs[s][i])
    assert b.tail() == ([], {})
    a.append(*_records(13, 3, 1))
    first = b.tail()
    b.rewind()  # b could not apply them (e.g. their vectors had to be recomputed and could not be): read again
    assert b.stale()
    again = b.tail()
    assert again[0] == first[0] and set(again[1]) == set(first[1]) == {3} and not b.stale()
    # b has not read a's next line: its append would hand out a taken row
    more, more_vecs = _records(14, 4, 1)
    a.append(more, more_vecs)
    with pytest.raises(OverlayChanged):
        b.append(*_records(14, 4, 1))
    got, cached = b.tail()
    assert got == more and set(cached) == {4}
    b.append(*_records(15, 5, 1))  # caught up: accepted
    assert [r.row for r in a.tail()[0]] == [15]


def test_a_torn_line_is_not_read_until_it_is_whole(tmp_path):
    a, b = Overlay(tmp_path, "bundle", SPACES), Overlay(tmp_path, "bundle", SPACES)
    a.load(), b.load()
    recs, vecs = _records(11, 1, 1)
    a.append(recs, vecs)
    line = _records(12, 2, 1)[0][0].line().encode()
    with open(a.items_path, "ab") as f:  # a writer in the middle of its append
        f.write(line[:10])
    assert b.tail()[0] == recs
    with open(a.items_path, "ab") as f:
        f.write(line[10:])
    got, cached = b.tail()
    assert [r.seq for r in got] == [
        2
    ] and 2 not in cached  # its vector was never written: the engine recomputes it


def test_tail_finds_vectors_after_the_cache_was_rewritten(tmp_path):
    a, b = Overlay(tmp_path, "bundle", SPACES), Overlay(tmp_path, "bundle", SPACES)
    a.load(), b.load()
    r1, v1 = _records(11, 1, 1)
    a.append(r1, v1)
    b.tail()
    r2, v2 = _records(12, 2, 1)
    a.append(r2, v2)
    # another process rewrote the cache (dropping nothing, but in a new file): offsets b remembers may not fit
    a.rewrite_vectors(r1 + r2, {1: {s: v1[s][0] for s in SPACES}, 2: {s: v2[s][0] for s in SPACES}})
    got, cached = b.tail()
    assert got == r2
    np.testing.assert_array_equal(cached[2]["item"], v2["item"][0])


def test_hold_keeps_other_processes_out_until_release(tmp_path):
    a = Overlay(tmp_path, "bundle", SPACES)
    a.load()
    a.hold()
    with pytest.raises(RuntimeError):
        a.hold()
    a.append(*_records(11, 1, 1))  # under the held lock, not a second one (which would deadlock)
    other_got_it = threading.Event()

    def other() -> None:  # a second open file description, as another process has
        with open(a.dir / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            other_got_it.set()

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.2)
    assert not other_got_it.is_set()
    a.release()
    t.join(5)
    assert other_got_it.is_set()
