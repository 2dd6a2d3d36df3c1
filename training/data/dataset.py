"""The canonical in-memory dataset every loader produces, and the prepared (split) form every job consumes.

`RawDataset` is what a loader returns: interactions in the source's own ids plus an item catalog of attribute
maps. `PreparedDataset` is what `training.split.prepare` returns: contiguous ids (0 = padding), one chronological
sequence per user, and leave-one-out views. Both are plain data; no torch here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

AttrValue = str | list[str]


@dataclass
class LoadReport:
    """What a loader saw: rows read, rows skipped and why (never silent), per file."""

    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # "<file>: <reason>" -> count

    def skip(self, file: str | Path, reason: str, n: int = 1) -> None:
        if n:
            key = f"{Path(file).name}: {reason}"
            self.skipped[key] = self.skipped.get(key, 0) + n

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows_read}"]
        out += [f"skipped {n} rows ({why})" for why, n in sorted(self.skipped.items())]
        return out


@dataclass
class RawDataset:
    """Interactions + item catalog, ids as in the source.

    interactions: DataFrame with columns
        user_id (str), item_id (str), ts (float64: a timestamp, or a position when the source has only order);
        its row order is the source's order and is the stable tie-break for equal `ts`.
    items: item_id -> {attribute name -> str or list[str]}; items without attributes may be absent.
    """

    name: str
    interactions: pd.DataFrame
    items: dict[str, dict[str, AttrValue]]
    report: LoadReport = field(default_factory=LoadReport)
    instruction: str = "The item has the following attributes: "

    def __post_init__(self) -> None:
        missing = {"user_id", "item_id", "ts"} - set(self.interactions.columns)
        if missing:
            raise ValueError(f"interactions lack columns {sorted(missing)}")


@dataclass
class PreparedDataset:
    """A dataset after k-core, chronological ordering and re-indexing.

    Internal item ids run 1..n_items (0 is padding); `item_ids[i]` is the external id of internal id i
    (`item_ids[0] == "<pad>"`). `sequences[u]` is user u's full chronological sequence (int64 array of
    internal ids, length >= 3 after a 5-core). Leave-one-out: train = seq[:-2], valid target = seq[-2],
    test target = seq[-1]; the test input is seq[:-1].
    """

    name: str
    item_ids: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]
    attributes: list[dict[str, AttrValue]]  # by internal item id; attributes[0] == {}
    instruction: str = "The item has the following attributes: "
    config: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def train_sequences(self) -> list[np.ndarray]:
        return [s[:-2] for s in self.sequences]

    def split(self, stage: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, targets) for stage 'valid' (input seq[:-2], target seq[-2]) or 'test' (seq[:-1], seq[-1])."""
        if stage == "valid":
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences], dtype=np.int64)
        if stage == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences], dtype=np.int64)
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def item_popularity(self) -> np.ndarray:
        """Training-set interaction count per internal id, shape (n_items + 1,); index 0 is 0."""
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        for s in self.train_sequences():
            np.add.at(counts, s, 1)
        counts[0] = 0
        return counts

    # ---- on-disk cache: npz + json, no pickles -------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write atomically into `directory` (created); returns it."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        flat = np.concatenate(self.sequences) if self.sequences else np.zeros(0, dtype=np.int64)
        with open(tmp / "sequences.npz", "wb") as f:
            np.savez(f, lengths=lengths, flat=flat)
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "name": self.name,
            "item_ids": self.item_ids,
            "user_ids": self.user_ids,
            "attributes": self.attributes,
            "instruction": self.instruction,
            "config": self.config,
            "stats": self.stats,
        }
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        if directory.exists():
            _rmtree(directory)
        os.replace(tmp, directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PreparedDataset:
        directory = Path(directory)
        with np.load(directory / "sequences.npz") as z:
            lengths, flat = z["lengths"], z["flat"]
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        seqs = [flat[offsets[i] : offsets[i + 1]].astype(np.int64) for i in range(len(lengths))]
        return cls(sequences=seqs, **meta)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def attributes_of(items: Mapping[str, dict[str, AttrValue]], item_id: str) -> dict[str, AttrValue]:
    return dict(items.get(item_id, {}))
