"""Evaluation protocol: hand-computed ranks and metrics, negatives, slices, oracle / constant models, t-test."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from training.data.dataset import PreparedDataset
from training.evaluate import (
    EvalConfig,
    Evaluator,
    aggregate,
    hit_at_k,
    ndcg_at_k,
    paired_ttest,
    popularity_groups,
    rank_of_target,
    sample_negatives,
    tail_items,
)


def make_data(sequences: list[list[int]], n_items: int) -> PreparedDataset:
    return PreparedDataset(
        name="toy",
        item_ids=["<pad>"] + [f"i{i}" for i in range(1, n_items + 1)],
        user_ids=[f"u{u}" for u in range(len(sequences))],
        sequences=[np.asarray(s, dtype=np.int64) for s in sequences],
        attributes=[{} for _ in range(n_items + 1)],
    )


N_ITEMS = 200


@pytest.fixture(scope="module")
def chain_data() -> PreparedDataset:
    """30 users, each a run of consecutive ids a, a+1, ...: the next item is always last + 1."""
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(30):
        length = int(rng.integers(3, 21))
        start = int(rng.integers(1, N_ITEMS - length + 2))
        seqs.append(list(range(start, start + length)))
    return make_data(seqs, N_ITEMS)


class TableModel(nn.Module):
    """Inner-product scorer over a frozen identity table (buffers only, no parameters)."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        table = torch.eye(n_items + 1)
        table[0] = 0
        self.register_buffer("table", table)

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return user @ items.T

    def item_table(self) -> torch.Tensor:
        return self.table


class OracleModel(TableModel):
    """User state = one-hot of last + 1, the true next item of a chain; optionally scores the history higher."""

    def __init__(self, n_items: int, history_weight: float = 0.0) -> None:
        super().__init__(n_items)
        self.history_weight = history_weight

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        user = self.table[(seq[:, -1] + 1).clamp(max=self.table.shape[0] - 1)].clone()
        if self.history_weight:
            # the history's one-hots, weighted above the target: ranks it last unless the history is filtered
            user += self.history_weight * self.table[seq].sum(1)
        return user


class ConstantModel(TableModel):
    """Every item scores the same; it also has a parameter and checks it runs in eval mode without grad."""

    def __init__(self, n_items: int) -> None:
        super().__init__(n_items)
        self.bias = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        self.calls += 1
        return torch.zeros(seq.shape[0], self.table.shape[1]) + 0 * self.bias


class RandomModel(nn.Module):
    """A real (random) embedding model: user = mean of history vectors; non-trivial ranks."""

    def __init__(self, n_items: int, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.dropout = nn.Dropout(0.5)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.emb(seq).sum(1) / (seq > 0).sum(1, keepdim=True).clamp(min=1))

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return user @ items.T

    def item_table(self) -> torch.Tensor:
        return self.emb.weight


# ---- pure metrics -------------------------------------------------------------------------------------------------
def test_rank_counts_ties_against_the_target() -> None:
    scores = torch.tensor(
        [
            [1.0, 1.0, 1.0, 0.5],  # target ties with 2 others -> rank 2
            [0.9, 0.1, 0.2, 0.3],  # strict best -> 0
            [0.1, 0.2, 0.3, 0.4],  # worst -> 3
            [0.5, 0.5, 0.5, 0.5],  # constant -> 3 (C - 1)
        ]
    )
    assert rank_of_target(scores, 0).tolist() == [2, 0, 3, 3]
    assert rank_of_target(scores, torch.tensor([3, 1, 3, 2])).tolist() == [3, 3, 0, 3]


def test_rank_nan_counts_against_the_target_and_mask_drops_columns() -> None:
    nan = float("nan")
    scores = torch.tensor([[nan, 0.1, 0.2], [0.5, nan, 0.1], [0.5, 0.9, 0.1]])
    assert rank_of_target(scores, 0).tolist() == [2, 1, 1]
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    assert rank_of_target(scores, 0, mask).tolist() == [2, 1, 0]
    # the target counts as kept even when its own mask entry is False
    assert rank_of_target(scores[2:], 0, torch.tensor([[False, True, True]])).tolist() == [1]


def test_hit_and_ndcg_closed_form() -> None:
    ranks = torch.tensor([0, 1, 2, 9, 10, 57])
    assert hit_at_k(ranks, 10).tolist() == [1, 1, 1, 1, 0, 0]
    expected = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0.0, 0.0]
    assert ndcg_at_k(ranks, 10).tolist() == pytest.approx(expected, abs=1e-12)
    assert ndcg_at_k(ranks, 10)[1].item() == pytest.approx(0.6309297535714575)


def test_perfect_and_constant_scorers() -> None:
    perfect = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.0, 1.0, 5.0, -1.0]])
    r = rank_of_target(perfect, torch.tensor([0, 2]))
    assert hit_at_k(r, 1).tolist() == [1, 1] and ndcg_at_k(r, 1).tolist() == [1, 1]
    constant = torch.zeros(5, 101)
    r = rank_of_target(constant, 0)
    assert r.tolist() == [100] * 5 and hit_at_k(r, 10).sum() == 0 and ndcg_at_k(r, 10).sum() == 0


# ---- slices -------------------------------------------------------------------------------------------------------
POP = np.array([0, 5, 1, 3, 3, 10, 0, 2, 8, 4, 7])  # index 0 = padding; 10 items


def test_tail_is_the_80_percent_least_popular() -> None:
    # order by (count, id): 6(0) 2(1) 7(2) 3(3) 4(3) 9(4) 1(5) 10(7) | 8(8) 5(10)
    tail = tail_items(POP, 0.8)
    assert sorted(np.flatnonzero(tail).tolist()) == [1, 2, 3, 4, 6, 7, 9, 10]
    assert not tail[0]


def test_popularity_groups_are_equal_size_least_popular_first() -> None:
    groups = popularity_groups(POP, 5)
    expected = {1: [2, 6], 2: [3, 7], 3: [4, 9], 4: [1, 10], 5: [5, 8]}
    assert {g: sorted(np.flatnonzero(groups == g).tolist()) for g in range(1, 6)} == expected
    assert groups[0] == 0
    assert np.bincount(popularity_groups(np.arange(13), 5)[1:]).tolist() == [0, 3, 3, 2, 2, 2]


def test_evaluator_slices_follow_training_counts_and_median_length() -> None:
    # training parts (seq[:-2]): item 1 x3, item 2 x1, item 3 x1, items 4.. unseen in training
    seqs = [[1, 2, 50, 51], [1, 3, 52, 53, 54], [1, 60, 61], [4, 5, 6, 7, 8, 9, 70, 71]]
    ev = Evaluator(make_data(seqs, 120), seed=1)
    assert ev.popularity[1] == 3 and ev.popularity[50] == 0 and ev.popularity[70] == 0
    assert ev.tail[50] and not ev.tail[1]
    # training lengths 2, 3, 1, 6 -> median 2.5 -> short = length <= 2
    assert ev.short_user_max_len == 2 and ev.short_user.tolist() == [True, False, True, False]
    ev2 = Evaluator(make_data(seqs, 120), seed=1, cfg=EvalConfig(short_user_max_len=5))
    assert ev2.short_user.tolist() == [True, True, True, False]
    assert ev.group_count_ranges()[-1][1] == 3  # the most popular group tops out at item 1's count


# ---- negatives ----------------------------------------------------------------------------------------------------
def test_negatives_exclude_history_unique_reused_and_seeded(chain_data: PreparedDataset) -> None:
    ev = Evaluator(chain_data, seed=42)
    neg = ev.negatives("test")
    assert neg.shape == (chain_data.n_users, 100) and neg.dtype == np.int64
    assert neg.min() >= 1 and neg.max() <= N_ITEMS
    for row, seq in zip(neg, chain_data.sequences):
        assert len(np.unique(row)) == 100
        assert not np.isin(row, seq).any()
    assert ev.negatives("test") is neg and not neg.flags.writeable
    assert np.array_equal(Evaluator(chain_data, seed=42).negatives("test"), neg)
    assert not np.array_equal(Evaluator(chain_data, seed=43).negatives("test"), neg)
    assert not np.array_equal(ev.negatives("valid"), neg)
    with pytest.raises(ValueError):
        ev.negatives("train")


def test_negatives_are_uniform_over_unseen_items() -> None:
    # 2000 identical users, 10 seen of 120 items: each of the 110 others is drawn 2000 * 100 / 110 times on average
    seqs = [np.arange(1, 11)] * 2000
    neg = sample_negatives(seqs, 120, 100, np.random.default_rng(7))
    counts = np.bincount(neg.ravel(), minlength=121)
    assert counts[:11].sum() == 0
    p = 100 / 110
    mean, sd = 2000 * p, math.sqrt(2000 * p * (1 - p))
    assert np.abs(counts[11:] - mean).max() < 5 * sd


def test_negatives_refuse_users_without_enough_unseen_items() -> None:
    with pytest.raises(ValueError, match="n_negatives"):
        sample_negatives([np.arange(1, 30)], 120, 100, np.random.default_rng(0))
    exact = sample_negatives([np.arange(1, 21)], 120, 100, np.random.default_rng(0))
    assert sorted(exact[0].tolist()) == list(range(21, 121))


def test_negatives_are_fast_at_beauty_scale() -> None:
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 12102, size=int(n)) for n in rng.integers(5, 15, 22363)]
    start = time.perf_counter()
    neg = sample_negatives(seqs, 12101, 100, np.random.default_rng(1))
    assert time.perf_counter() - start < 3.0  # ~0.4 s on a laptop core; generous for CI
    assert neg.shape == (22363, 100)


# ---- evaluate() on hand-built models ------------------------------------------------------------------------------
def test_oracle_model_is_perfect(chain_data: PreparedDataset) -> None:
    ev = Evaluator(chain_data, seed=42)
    for stage in ("valid", "test"):
        res = ev.evaluate(OracleModel(N_ITEMS), stage)
        assert set(res) == {"sampled100", "full"}
        for summary in res.values():
            assert summary["overall"] == {"H@10": 1.0, "N@10": 1.0}
            assert summary["n_users"] == chain_data.n_users
            for name, value in summary.items():
                if name.startswith(("group", "tail", "head", "short", "long")):
                    assert value is None or value == {"H@10": 1.0, "N@10": 1.0}


def test_constant_model_scores_zero_and_mode_is_restored(chain_data: PreparedDataset) -> None:
    ev = Evaluator(chain_data, seed=42, cfg=EvalConfig(batch_size=7))
    model = ConstantModel(N_ITEMS).train()
    res = ev.evaluate(model, "test", return_per_user=True)
    assert model.training and model.calls == math.ceil(chain_data.n_users / 7)
    for summary in res.values():
        assert summary["overall"] == {"H@10": 0.0, "N@10": 0.0}
    assert (res["sampled100"]["per_user"]["rank"] == 100).all()
    # full: every unfiltered non-target item ties with the target
    unseen = [N_ITEMS - len(np.unique(s[:-1])) for s in chain_data.sequences]
    assert res["full"]["per_user"]["rank"].tolist() == [n - 1 for n in unseen]


def test_full_ranking_filters_history_but_never_the_target(chain_data: PreparedDataset) -> None:
    ev = Evaluator(chain_data, seed=42)
    res = ev.evaluate(OracleModel(N_ITEMS, history_weight=2.0), "test", return_per_user=True)
    assert res["full"]["overall"] == {"H@10": 1.0, "N@10": 1.0}
    assert res["sampled100"]["overall"] == {"H@10": 1.0, "N@10": 1.0}
    # repeat consumption: the target 5 is also in the history [3, 4, 5, 4]; it stays rankable (rank 0)
    data = make_data([[3, 4, 5, 4, 5]], 120)

    class Repeat(TableModel):
        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            return self.table[torch.full((seq.shape[0],), 5)] + 2 * self.table[4]

    res = Evaluator(data, seed=0).evaluate(Repeat(120), "test", protocols=["full"], return_per_user=True)
    assert res["full"]["per_user"]["rank"].tolist() == [0]


def test_evaluate_matches_brute_force_and_is_batch_invariant(chain_data: PreparedDataset) -> None:
    torch.manual_seed(0)
    model = RandomModel(N_ITEMS)
    big = Evaluator(chain_data, seed=3).evaluate(model, "valid", return_per_user=True)
    small = Evaluator(chain_data, seed=3, cfg=EvalConfig(batch_size=4)).evaluate(
        model, "valid", return_per_user=True
    )
    for p in ("sampled100", "full"):
        assert np.array_equal(big[p]["per_user"]["rank"], small[p]["per_user"]["rank"])
    ev = Evaluator(chain_data, seed=3)
    inputs, targets = chain_data.split("valid")
    table = model.emb.weight.detach()
    eps = 1e-5  # float32 sums in another order: a near-tie may go either way

    def between(rank: int, s: np.ndarray, t: float) -> bool:
        return (s > t + eps).sum() <= rank <= (s >= t - eps).sum()

    for u, (seq, t) in enumerate(zip(inputs, targets)):
        s = (table.double() @ table[torch.as_tensor(seq)].double().mean(0)).numpy()  # (n_items + 1,)
        negs = ev.negatives("valid")[u]
        assert between(big["sampled100"]["per_user"]["rank"][u], s[negs], s[t])
        others = np.setdiff1d(np.arange(1, N_ITEMS + 1), np.append(seq, t))
        assert between(big["full"]["per_user"]["rank"][u], s[others], s[t])
    assert 0 < big["full"]["overall"]["H@10"] < 1  # a non-trivial case
    # slice means are the per-user means over the slice
    per = big["full"]["per_user"]["N@10"]
    tail = ev.tail[targets]
    if tail.any():
        assert big["full"]["tail"]["N@10"] == pytest.approx(per[tail].mean())
    assert big["full"]["sizes"]["tail"] + big["full"]["sizes"]["head"] == chain_data.n_users


def test_empty_slices_are_none_and_protocols_selectable() -> None:
    # one user: its target is a single slice, so most groups are empty
    data = make_data([[1, 2, 3, 4, 5]], 150)
    res = Evaluator(data, seed=0).evaluate(OracleModel(150), "test", protocols=("full",))
    assert set(res) == {"full"}
    empty = [name for name, v in res["full"].items() if v is None]
    assert "head" in empty or "tail" in empty
    assert sum(res["full"]["sizes"][f"group{g}"] for g in range(1, 6)) == 1
    ev = Evaluator(data, seed=0, cfg=EvalConfig(n_negatives=5))
    assert set(ev.evaluate(OracleModel(150), "test")) == {"sampled5", "full"}
    with pytest.raises(ValueError, match="unknown protocols"):
        ev.evaluate(OracleModel(150), "test", protocols=("sampled100",))


# ---- seeds and tests ----------------------------------------------------------------------------------------------
def test_aggregate_uses_sample_std() -> None:
    mean, std = aggregate([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert aggregate([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        aggregate([])


def test_paired_ttest_matches_closed_form_and_scipy() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 3.0, 3.0]
    t, p = paired_ttest(a, b)  # d = 0 1 1 1 2: mean 1, sd sqrt(0.5) -> t = sqrt(10)
    assert t == pytest.approx(math.sqrt(10))
    assert p == pytest.approx(2 * stats.t.sf(math.sqrt(10), df=4))
    ref = stats.ttest_rel(a, b)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue))
    assert paired_ttest(b, a)[0] == pytest.approx(-math.sqrt(10))
    assert paired_ttest(np.ones(4), np.ones(4)) == (0.0, 1.0)
    with pytest.raises(ValueError):
        paired_ttest([1.0, 2.0], [1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_on_cuda_matches_cpu(chain_data: PreparedDataset) -> None:
    torch.manual_seed(0)
    model = RandomModel(N_ITEMS)
    ev = Evaluator(chain_data, seed=5)
    cpu = ev.evaluate(model, "test", return_per_user=True)
    gpu = ev.evaluate(model.cuda(), "test", return_per_user=True)
    for p in cpu:  # GPU sums in another order: a near-tie may flip, nothing more
        a, b = cpu[p]["per_user"]["rank"], gpu[p]["per_user"]["rank"]
        assert (a == b).mean() >= 0.9 and np.abs(a - b).max() <= 2
    assert ev.evaluate(OracleModel(N_ITEMS).cuda(), "test")["full"]["overall"] == {"H@10": 1.0, "N@10": 1.0}
