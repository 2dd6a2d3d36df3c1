"""Offline evaluation: leave-one-out ranking metrics, sampled and full protocols, long-tail slices, seeds.

The protocol is fixed (DESIGN.md, "Evaluation protocol"); the choices it leaves open are made here:

- Ranks count TIES AGAINST THE TARGET: rank = #(other candidates scoring >= the target), 0-based, and a NaN on
  either side counts against the target too. A constant (or NaN) model therefore scores 0, never a perfect 1.
  H@k = [rank < k]; N@k = 1 / log2(rank + 2) if rank < k else 0 (one relevant item, so IDCG = 1).
- sampled: the target among `n_negatives` items drawn uniformly without replacement from the items the user
  never interacted with (whole sequence, train+valid+test). Drawn ONCE per (seed, stage) and reused on every
  call; the valid and test draws are independent (`default_rng((seed, stage))`) so early stopping on valid does
  not tune to the test negatives. The protocol's name is f"sampled{n_negatives}" ("sampled100" by default).
- full: the target against every item except padding and the items in the user's input history ("filter
  seen items"); the target itself is never filtered, even when the user consumed it before.
- Both protocols read the same score matrix, `model.score(user, model.item_table())`, so they agree exactly.
- Item slices use TRAINING-set counts (`PreparedDataset.item_popularity`), items ordered by (count, id):
  tail = the round(tail_share * n_items) least popular items (exactly the paper's Pareto 80 %; equal counts on
  the boundary are split by id); groups = `n_groups` equal-size slices of that order (np.array_split), group 1
  the least popular. Equal-size groups keep every group's metric equally well estimated, unlike the paper's
  count bins (1-4, ..., 40+) whose sizes depend on the dataset. A user falls in a slice by the TARGET item.
- Users are "short" when their training sequence (seq[:-2]) is no longer than `short_user_max_len`, by default
  the median training length, so short/long is a stage-independent, roughly even split.
- Across seeds: mean and sample std (ddof=1; 0.0 for one seed); `paired_ttest` is scipy's two-sided ttest_rel.

Example:
    ev = Evaluator(data, seed=42)
    res = ev.evaluate(model, "test")          # res["sampled100"]["tail"]["N@10"], res["full"]["overall"]["H@10"]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from models.srs.base import pad_left
from training.data.dataset import PreparedDataset

STAGES = ("valid", "test")


@dataclass(frozen=True)
class EvalConfig:
    n_negatives: int = 100
    k: int = 10
    tail_share: float = 0.8  # Pareto split, as in the paper's Table 1
    n_groups: int = 5  # the paper's Figure 5 uses 5 popularity groups
    short_user_max_len: int | None = None  # None: the median training-sequence length
    batch_size: int = 512
    max_len: int = 200  # most recent items fed to the model; the full-ranking filter uses the whole history

    def __post_init__(self) -> None:
        if self.n_negatives < 1 or self.k < 1 or self.n_groups < 1 or self.batch_size < 1 or self.max_len < 1:
            raise ValueError("n_negatives, k, n_groups, batch_size and max_len must be >= 1")
        if not 0.0 < self.tail_share < 1.0:
            raise ValueError("tail_share must be in (0, 1)")
        if self.short_user_max_len is not None and self.short_user_max_len < 0:
            raise ValueError("short_user_max_len must be >= 0")

    @property
    def sampled_name(self) -> str:
        return f"sampled{self.n_negatives}"


# ---- pure metrics ---------------------------------------------------------------------------------------------
def rank_of_target(
    scores: torch.Tensor, target_col: torch.Tensor | int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of the target column in each row of `scores` (B, C), ties counted against the target.

    rank = #(columns c != target with scores[c] >= scores[target], or either one NaN). `mask` (B, C) bool, if
    given, drops the columns where it is False from the count. Returns a LongTensor (B,).
    """
    if isinstance(target_col, int):
        target_col = torch.full((scores.shape[0],), target_col, dtype=torch.long, device=scores.device)
    col = target_col.view(-1, 1).to(scores.device)
    target = scores.gather(1, col)  # (B, 1)
    beats = (scores < target).logical_not_()  # True for >= and for NaN on either side
    if mask is not None:
        beats &= mask
    beats.scatter_(1, col, False)  # the target does not beat itself
    return beats.sum(1, dtype=torch.int32).long()  # int32 accumulation: ~3x faster than bool -> int64 on CPU


def hit_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where rank < k else 0.0 (float64)."""
    return (ranks < k).to(torch.float64)


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """1 / log2(rank + 2) where rank < k else 0.0 (float64); one relevant item, so IDCG = 1."""
    r = ranks.to(torch.float64)
    return torch.where(ranks < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))


# ---- item and user slices -------------------------------------------------------------------------------------
def _popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Internal ids 1..n, least popular first; equal counts in id order."""
    return np.argsort(np.asarray(popularity)[1:], kind="stable") + 1


def tail_items(popularity: np.ndarray, share: float = 0.8) -> np.ndarray:
    """Bool (n_items + 1,): True for the round(share * n_items) least popular items; padding is False."""
    order = _popularity_order(popularity)
    out = np.zeros(len(popularity), dtype=bool)
    out[order[: int(round(share * len(order)))]] = True
    return out


def popularity_groups(popularity: np.ndarray, n_groups: int = 5) -> np.ndarray:
    """Int (n_items + 1,): group 1..n_groups by popularity (1 = least popular, equal-size); padding is 0."""
    out = np.zeros(len(popularity), dtype=np.int64)
    for g, ids in enumerate(np.array_split(_popularity_order(popularity), n_groups), start=1):
        out[ids] = g
    return out


# ---- negatives --------------------------------------------------------------------------------------------------
def sample_negatives(
    sequences: Sequence[np.ndarray], n_items: int, n_negatives: int, rng: np.random.Generator
) -> np.ndarray:
    """(U, n_negatives) int64: per user, items uniform without replacement from 1..n_items minus its sequence.

    Vectorised rejection sampling: each row draws iid candidates and keeps the first `n_negatives` that are
    unseen and not repeats; rows that come up short are redrawn with twice the width. Whatever the width, the
    kept set is a uniform subset, because the acceptance event is symmetric in the allowed items.
    """
    n_users, stride = len(sequences), n_items + 1
    lens = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=n_users)
    flat = np.concatenate(sequences).astype(np.int64) if n_users else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < 1 or flat.max() > n_items):
        raise ValueError(f"sequences hold ids outside 1..{n_items}")
    seen = np.unique(np.repeat(np.arange(n_users), lens) * stride + flat)  # sorted (user, item) keys
    allowed = n_items - np.bincount(seen // stride, minlength=n_users)
    if n_users and allowed.min() < n_negatives:
        u = int(allowed.argmin())
        raise ValueError(
            f"user {u} leaves only {allowed[u]} unseen items, fewer than n_negatives={n_negatives}; "
            "lower EvalConfig.n_negatives"
        )
    out = np.empty((n_users, n_negatives), dtype=np.int64)
    todo = np.arange(n_users)
    # Expected draws ~ n / (share of allowed items); 1.3x plus a constant leaves few rows to redraw.
    width = int(np.ceil(1.3 * n_negatives * n_items / max(np.median(allowed) if n_users else 1, 1))) + 16
    while todo.size:
        cand = rng.integers(1, n_items + 1, size=(todo.size, width))  # (T, W)
        keys = todo[:, None] * stride + cand
        pos = np.minimum(np.searchsorted(seen, keys), max(seen.size - 1, 0))
        bad = seen[pos] == keys if seen.size else np.zeros(keys.shape, dtype=bool)
        order = np.argsort(cand, axis=1, kind="stable")  # stable: the first draw of a value sorts first
        srt = np.take_along_axis(cand, order, axis=1)
        repeat = np.zeros_like(bad)
        repeat[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = np.empty_like(bad)
        np.put_along_axis(dup, order, repeat, axis=1)
        ok = ~(bad | dup)
        accepted = np.cumsum(ok, axis=1)  # (T, W) running count of accepted draws
        done = accepted[:, -1] >= n_negatives
        take = ok[done] & (accepted[done] <= n_negatives)  # the first n_negatives accepted, in draw order
        out[todo[done]] = cand[done][take].reshape(-1, n_negatives)
        todo, width = todo[~done], width * 2
    return out


# ---- the evaluator ----------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


class Evaluator:
    """Evaluates any SRS backbone on one prepared dataset under one seed; negatives are fixed per stage."""

    def __init__(self, data: PreparedDataset, seed: int, cfg: EvalConfig = EvalConfig()) -> None:
        self.data, self.seed, self.cfg = data, seed, cfg
        self.popularity = data.item_popularity()  # (n_items + 1,) training counts
        self.tail = tail_items(self.popularity, cfg.tail_share)  # (n_items + 1,) bool
        self.group = popularity_groups(self.popularity, cfg.n_groups)  # (n_items + 1,) 1..n_groups
        train_len = np.array([max(len(s) - 2, 0) for s in data.sequences], dtype=np.int64)
        if cfg.short_user_max_len is not None:
            self.short_user_max_len = cfg.short_user_max_len
        else:
            self.short_user_max_len = int(np.floor(np.median(train_len))) if len(train_len) else 0
        self.short_user = train_len <= self.short_user_max_len  # (U,) bool
        self._negatives: dict[str, np.ndarray] = {}

    def group_count_ranges(self) -> list[tuple[int, int]]:
        """(min, max) training count of each popularity group, for labels ("1-4", ...)."""
        return [
            (int(self.popularity[m].min()), int(self.popularity[m].max())) if m.any() else (0, 0)
            for m in (self.group == g for g in range(1, self.cfg.n_groups + 1))
        ]

    def negatives(self, stage: str) -> np.ndarray:
        """(U, n_negatives) read-only int64, drawn on first use and cached: the same array on every call."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
        if stage not in self._negatives:
            rng = np.random.default_rng((self.seed, STAGES.index(stage)))
            neg = sample_negatives(self.data.sequences, self.data.n_items, self.cfg.n_negatives, rng)
            neg.setflags(write=False)
            self._negatives[stage] = neg
        return self._negatives[stage]

    def evaluate(
        self,
        model: nn.Module,
        stage: str = "test",
        protocols: Sequence[str] | None = None,
        return_per_user: bool = False,
        progress: bool = False,
    ) -> dict:
        """Ranks every user's held-out item; returns {protocol: summary} (see `summarise`).

        Runs under no_grad with the model in eval mode (each module's train/eval flag is restored after).
        `protocols` defaults to (cfg.sampled_name, "full"). With `return_per_user`, each summary also holds
        "per_user": {"H@k", "N@k", "rank"} arrays in user order, for paired tests.
        """
        sampled = self.cfg.sampled_name
        protocols = tuple(protocols) if protocols is not None else (sampled, "full")
        unknown = set(protocols) - {sampled, "full"}
        if unknown:
            raise ValueError(f"unknown protocols {sorted(unknown)}; this config knows {sampled!r} and 'full'")
        inputs, targets = self.data.split(stage)
        negatives = self.negatives(stage) if sampled in protocols else None
        device = _device_of(model)
        ranks = {p: np.empty(len(inputs), dtype=np.int64) for p in protocols}
        # Users of similar length share a batch, so left padding stays short.
        order = np.argsort(np.fromiter((len(s) for s in inputs), np.int64, len(inputs)), kind="stable")
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                table = model.item_table()  # (n_items + 1, H), computed once (it may run an adapter)
                bs = self.cfg.batch_size
                for start in tqdm(range(0, len(order), bs), desc=f"eval {stage}", disable=not progress):
                    idx = order[start : start + bs]
                    history = [inputs[i] for i in idx]
                    user = model(pad_left(history, self.cfg.max_len).to(device))  # (B, H)
                    scores = model.score(user, table)  # (B, n_items + 1); ranks compare in its own dtype
                    target = torch.as_tensor(targets[idx], device=scores.device)  # (B,)
                    if negatives is not None:
                        neg = torch.as_tensor(negatives[idx], device=scores.device)
                        cand = torch.cat([target[:, None], neg], dim=1)  # (B, 1 + n_negatives), target first
                        ranks[sampled][idx] = rank_of_target(scores.gather(1, cand), 0).cpu().numpy()
                    if "full" in protocols:
                        mask = _unseen_mask(history, target, scores.shape[1])
                        ranks["full"][idx] = rank_of_target(scores, target, mask).cpu().numpy()
        finally:
            for m, was_training in flags:
                m.training = was_training
        return {p: self.summarise(ranks[p], targets, return_per_user) for p in protocols}

    def summarise(self, ranks: np.ndarray, targets: np.ndarray, return_per_user: bool = False) -> dict:
        """Mean H@k / N@k over users, overall and per slice (None where a slice is empty).

        {"overall"|"tail"|"head"|"group1".."groupN"|"short_users"|"long_users": {"H@k", "N@k"} or None,
         "n_users": int, "sizes": {slice: users}}
        """
        k = self.cfg.k
        r = torch.from_numpy(np.asarray(ranks))
        hit, ndcg = hit_at_k(r, k).numpy(), ndcg_at_k(r, k).numpy()
        tail = self.tail[targets]
        slices = {"overall": np.ones(len(ranks), dtype=bool), "tail": tail, "head": ~tail}
        slices |= {f"group{g}": self.group[targets] == g for g in range(1, self.cfg.n_groups + 1)}
        slices |= {"short_users": self.short_user, "long_users": ~self.short_user}
        out: dict = {
            name: {f"H@{k}": float(hit[m].mean()), f"N@{k}": float(ndcg[m].mean())} if m.any() else None
            for name, m in slices.items()
        }
        out["n_users"] = len(ranks)
        out["sizes"] = {name: int(m.sum()) for name, m in slices.items()}
        if return_per_user:
            out["per_user"] = {f"H@{k}": hit, f"N@{k}": ndcg, "rank": np.asarray(ranks)}
        return out


def _unseen_mask(history: list[np.ndarray], target: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(B, n_cols) bool: False for padding and the input history, True elsewhere and always at the target."""
    b = len(history)
    mask = torch.ones(b, n_cols, dtype=torch.bool, device=target.device)
    mask[:, 0] = False
    rows = np.repeat(np.arange(b), [len(h) for h in history])
    if rows.size:
        cols = torch.from_numpy(np.concatenate(history).astype(np.int64)).to(mask.device)
        mask[torch.from_numpy(rows).to(mask.device), cols] = False
    mask[torch.arange(b, device=target.device), target] = True
    return mask


# ---- across seeds and methods -----------------------------------------------------------------------------------
def aggregate(results: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) over seeds; std is 0.0 for a single seed."""
    x = np.asarray(results, dtype=np.float64)
    if x.size == 0:
        raise ValueError("aggregate needs at least one value")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def paired_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sided paired t-test (scipy.stats.ttest_rel) on per-user or per-seed values; (t, p).

    Identical inputs give (0.0, 1.0) rather than scipy's NaN.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_ttest needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError("paired_ttest needs at least two pairs")
    if np.array_equal(x, y):
        return 0.0, 1.0
    res = stats.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)
