"""Raw interactions -> PreparedDataset: iterative k-core, chronological order, contiguous ids, stats, disk cache.

Order is by (user, ts, original row): equal timestamps keep the source order, so results are identical on every
run and every machine. Leave-one-out views come from `PreparedDataset.split` (valid = seq[-2], test = seq[-1]).

    >>> from training.split import prepare, format_stats
    >>> ds = prepare("ml-100k")              # fetched on first use, cached under data/cache
    >>> print(format_stats(ds.stats))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.data.dataset import PreparedDataset, RawDataset
from training.data.fetch import data_root, resolve_source
from training.data.load import load_dataset, resolved_format

PREP_VERSION = 1  # bump when the preparation logic changes: it invalidates every cached dataset
PAD = "<pad>"
TAIL_SHARE = 0.8  # the evaluation protocol's tail: the 80 % least popular items by training count
PERCENTILES = (25, 50, 75, 90, 99)


@dataclass(frozen=True)
class SplitConfig:
    """How to filter and order a raw dataset.

    user_core / item_core: iterative k-core thresholds (interactions per user / per item, repeats counted).
    user_core >= 3 because leave-one-out needs one training, one validation and one test interaction.
    max_users: keep only the first N users in source order after the k-core, then re-apply the k-core (so the
    result is still a k-core, possibly with fewer than N users); None keeps all. For quick runs.
    """

    user_core: int = 5
    item_core: int = 5
    max_users: int | None = None

    def __post_init__(self) -> None:
        if self.user_core < 3:
            raise ValueError(
                f"user_core must be >= 3 (leave-one-out needs 3 interactions), got {self.user_core}"
            )
        if self.item_core < 1:
            raise ValueError(f"item_core must be >= 1, got {self.item_core}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users must be None or >= 1, got {self.max_users}")


def kcore_mask(
    users: np.ndarray, items: np.ndarray, user_core: int, item_core: int
) -> tuple[np.ndarray, int]:
    """Rows kept by the iterative k-core, and the number of passes.

    users, items: int codes, shape (N,). Removing users can push items under the threshold and vice versa, so
    passes repeat until nothing changes (the result is the unique maximal k-core).
    """
    keep = np.ones(len(users), dtype=bool)
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    passes = 0
    while True:
        passes += 1
        ucount = np.bincount(users[keep], minlength=n_users)
        icount = np.bincount(items[keep], minlength=n_items)
        drop = keep & ((ucount[users] < user_core) | (icount[items] < item_core))
        if not drop.any():
            return keep, passes
        keep &= ~drop


def chronological_order(users: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Permutation sorting rows by (user code, ts, original row); the row index makes ties stable."""
    rows = np.arange(len(users))
    return np.lexsort((rows, ts, users))  # last key is the primary one


def tail_mask(popularity: np.ndarray, share: float = TAIL_SHARE) -> np.ndarray:
    """Boolean mask (n_items + 1,) of the round(share * n_items) least popular items; padding is never tail.

    popularity: training counts by internal id, index 0 ignored. Items are ordered by (count, id), so ties on
    the boundary are split by id and the tail is deterministic (the same rule as training.evaluate.tail_items).
    """
    counts = popularity[1:]
    n_tail = int(round(share * len(counts)))
    order = np.argsort(counts, kind="stable")
    mask = np.zeros(len(popularity), dtype=bool)
    mask[order[:n_tail] + 1] = True
    return mask


def build(raw: RawDataset, cfg: SplitConfig = SplitConfig()) -> PreparedDataset:
    """Filter, order and re-index a RawDataset (users 0..U-1 in source order; items 1..n, 0 = padding)."""
    inter = raw.interactions
    ucodes, _ = pd.factorize(inter["user_id"], sort=False)  # first appearance in source order
    icodes, _ = pd.factorize(inter["item_id"], sort=False)
    keep, passes = kcore_mask(ucodes, icodes, cfg.user_core, cfg.item_core)
    after_kcore = _counts(ucodes[keep], icodes[keep])
    if cfg.max_users is not None:
        first_users = np.unique(ucodes[keep])[: cfg.max_users]  # codes follow source order
        keep &= np.isin(ucodes, first_users)
        sub, more = kcore_mask(ucodes[keep], icodes[keep], cfg.user_core, cfg.item_core)
        keep[np.flatnonzero(keep)[~sub]] = False
        passes += more

    rows = np.flatnonzero(keep)
    order = rows[chronological_order(ucodes[rows], inter["ts"].to_numpy(dtype=np.float64)[rows])]
    ext_users = inter["user_id"].to_numpy(dtype=object)[order]
    ext_items = inter["item_id"].to_numpy(dtype=object)[order]
    item_codes, item_ids = pd.factorize(ext_items, sort=False)  # first appearance in the sorted data
    user_codes, user_ids = pd.factorize(ext_users, sort=False)
    flat = item_codes.astype(np.int64) + 1  # 0 is padding
    bounds = np.flatnonzero(np.diff(user_codes)) + 1
    sequences = np.split(flat, bounds) if len(flat) else []

    item_list = [PAD] + [str(i) for i in item_ids]
    ds = PreparedDataset(
        name=raw.name,
        item_ids=item_list,
        user_ids=[str(u) for u in user_ids],
        sequences=sequences,
        attributes=[{}] + [dict(raw.items.get(i, {})) for i in item_list[1:]],
        instruction=raw.instruction,
        config={"split": asdict(cfg), "prep_version": PREP_VERSION},
    )
    raw_counts = _counts(ucodes, icodes)
    ds.stats = compute_stats(ds)
    ds.stats.update(
        raw=raw_counts,
        kcore={
            "user_core": cfg.user_core,
            "item_core": cfg.item_core,
            "passes": passes,
            "removed": {k: raw_counts[k] - after_kcore[k] for k in raw_counts},
        },
        max_users=cfg.max_users,
        load_report=raw.report.lines(),
        name=raw.name,
    )
    return ds


def _counts(users: np.ndarray, items: np.ndarray) -> dict[str, int]:
    return {
        "users": int(len(np.unique(users))),
        "items": int(len(np.unique(items))),
        "interactions": int(len(users)),
    }


def compute_stats(ds: PreparedDataset) -> dict[str, Any]:
    """Size, sparsity, sequence-length percentiles and the training-interaction share of the tail items."""
    lengths = np.array([len(s) for s in ds.sequences], dtype=np.int64)
    n_inter = int(lengths.sum())
    pop = ds.item_popularity()
    tail = tail_mask(pop)
    train_total = int(pop.sum())
    seq_len: dict[str, float] = {}
    if len(lengths):
        seq_len = {"min": int(lengths.min())}
        seq_len.update({f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES})
        seq_len.update(max=int(lengths.max()), mean=float(lengths.mean()))
    cells = ds.n_users * ds.n_items
    return {
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": n_inter,
        "sparsity": 1.0 - n_inter / cells if cells else 1.0,
        "seq_len": seq_len,
        "tail": {
            "item_share": TAIL_SHARE,
            "items": int(tail.sum()),
            "train_interaction_share": float(pop[tail].sum() / train_total) if train_total else 0.0,
        },
        "items_without_attributes": sum(1 for a in ds.attributes[1:] if not a),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Readable multi-line summary of `PreparedDataset.stats`."""
    head = f"dataset {stats.get('name', '?')}"
    if "format" in stats:
        head += f"  ({stats['format']}: {stats.get('source', '?')})"
    out = [head]
    if "raw" in stats:
        r = stats["raw"]
        out.append(
            f"  raw:        {r['users']:,} users, {r['items']:,} items, {r['interactions']:,} interactions"
        )
    out += [f"  load:       {line}" for line in stats.get("load_report", [])]
    if "kcore" in stats:
        k, rm = stats["kcore"], stats["kcore"]["removed"]
        out.append(
            f"  k-core:     user>={k['user_core']}, item>={k['item_core']}: removed {rm['interactions']:,} rows, "
            f"{rm['users']:,} users, {rm['items']:,} items (passes: {k['passes']})"
        )
    if stats.get("max_users") is not None:
        out.append(f"  max_users:  {stats['max_users']:,}")
    out.append(
        f"  final:      {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} "
        f"interactions, sparsity {100 * stats['sparsity']:.4f}%"
    )
    sl = stats.get("seq_len") or {}
    if sl:
        parts = [f"min {sl['min']}"] + [f"p{p} {sl[f'p{p}']:g}" for p in PERCENTILES]
        parts += [f"max {sl['max']}", f"mean {sl['mean']:.2f}"]
        out.append("  seq length: " + ", ".join(parts))
    t = stats["tail"]
    out.append(
        f"  tail:       the {100 * t['item_share']:.0f}% least popular items ({t['items']:,}) hold "
        f"{100 * t['train_interaction_share']:.1f}% of training interactions"
    )
    out.append(f"  items without attributes: {stats['items_without_attributes']:,}")
    return "\n".join(out)


def cache_key(source: Path, fmt: str, cfg: SplitConfig) -> str:
    """sha256 over the resolved source path, its files' sizes and mtimes, the format, config and PREP_VERSION."""
    source = source.resolve()
    root = source if source.is_dir() else source.parent
    files = sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    payload = {"source": str(source), "files": files, "format": fmt, "config": asdict(cfg), "v": PREP_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepare(
    source: str | Path,
    cfg: SplitConfig = SplitConfig(),
    cache_dir: str | Path | None = None,
    fmt: str | None = None,
    refresh: bool = False,
) -> PreparedDataset:
    """Load (or reuse from cache) the prepared form of a dataset name ("ml-100k") or path.

    cache_dir: defaults to <data root>/cache (data/cache, or $LLMEMB_DATA_DIR/cache). The cache entry is keyed
    by `cache_key`, so editing a source file, changing the config or PREP_VERSION builds a new entry.
    refresh: rebuild even when a matching entry exists.
    """
    path = resolve_source(source).resolve()
    fmt = resolved_format(path, fmt)
    key = cache_key(path, fmt, cfg)
    cache_root = Path(cache_dir) if cache_dir is not None else data_root() / "cache"
    entry = cache_root / f"{path.name}-{key[:16]}"
    if not refresh and (entry / "meta.json").is_file():
        try:
            cached = PreparedDataset.load(entry)
            if cached.config.get("cache_key") == key:
                return cached
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry is rebuilt below, never trusted
    ds = build(load_dataset(path, fmt=fmt), cfg)
    ds.config.update(source=str(path), format=fmt, cache_key=key)
    ds.stats.update(name=ds.name, source=str(path), format=fmt)
    ds.save(entry)
    return ds
