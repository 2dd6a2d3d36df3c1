"""training/srs.py: batch construction, negatives, the end-to-end job for every backbone, checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.srs import FrozenTableEncoder, pad_left
from tests.tiny_llm import walk_dataset
from training.data.dataset import PreparedDataset
from training.srs import (
    SRSTrainConfig,
    TrainBatches,
    cloze_batch,
    load_checkpoint,
    main,
    sample_negatives,
    save_checkpoint,
    seen_keys,
)

# The evaluator's sampled protocol needs >= 100 unseen items per user, hence a catalog of 150.
N_ITEMS = 150
TINY = SRSTrainConfig(
    max_epochs=2, batch_size=16, hidden=16, n_layers=1, n_heads=2, dropout=0.1, max_len=12, device="cpu"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def data() -> PreparedDataset:
    """60 users walking the catalog in steps of one: item i is always followed by item i + 1."""
    return walk_dataset(N_ITEMS, lengths=(5, 20), wrap=True)


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="backbone"):
        SRSTrainConfig(backbone="caser")
    with pytest.raises(ValueError, match="patience"):
        SRSTrainConfig(patience=0)
    with pytest.raises(ValueError, match="divisible"):
        SRSTrainConfig(hidden=10, n_heads=3)
    with pytest.raises(ValueError, match="mask_prob"):
        SRSTrainConfig(mask_prob=1.0)
    with pytest.raises(ValueError, match="val_protocol"):
        SRSTrainConfig(val_protocol="sampled")


def test_negatives_avoid_everything_the_user_saw() -> None:
    seqs = [np.array([1, 2, 3, 4]), np.array([5]), np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])]
    keys = seen_keys(seqs, 10)
    users = np.array([0, 1, 2, 0])
    neg = sample_negatives(keys, users, 10, (4, 50), np.random.default_rng(0))
    assert neg.min() >= 1 and neg.max() <= 10
    for row, u in zip(neg, users):
        assert not set(row.tolist()) & set(seqs[u].tolist())
    assert set(neg[2].tolist()) == {10}  # the only item user 2 never saw


def test_next_item_batches(data: PreparedDataset) -> None:
    cfg = replace(TINY, batch_size=7)
    batches = TrainBatches(data, "next", cfg, np.random.default_rng(0))
    seen_rows = 0
    for batch in batches:
        seq, pos, neg = batch["seq"], batch["pos"], batch["neg"]
        assert seq.shape == pos.shape == neg.shape and seq.shape[1] <= cfg.max_len
        assert ((seq > 0).sum(1).max() == seq.shape[1]).item()  # padded only to the batch's longest row
        real = seq[:, :-1] > 0
        assert torch.equal(pos[:, :-1][real], seq[:, 1:][real])  # pos is the next input item
        assert torch.equal(pos > 0, seq > 0) and torch.equal(neg > 0, pos > 0)
        assert not ((neg == pos) & (pos > 0)).any()
        assert torch.equal(batch["tgt"], torch.nonzero((pos > 0).reshape(-1)).squeeze(1))  # target positions
        seen_rows += len(seq)
    assert seen_rows == batches.size == data.n_users and len(batches) == -(-data.n_users // 7)
    # The last training item is a target, the validation item never appears.
    last = TrainBatches(data, "next", replace(TINY, batch_size=1000), np.random.default_rng(0))
    batch = next(iter(last))  # one batch holds everyone
    assert sorted(batch["pos"][:, -1].tolist()) == sorted(int(s[-3]) for s in data.sequences)


def test_cloze_batches_mask_at_least_one_and_the_last_view() -> None:
    seqs = [np.array([3, 4, 5, 6]), np.array([7]), np.arange(1, 30)]
    last_only = np.array([False, False, True])
    for seed in range(20):
        b = cloze_batch(seqs, last_only, 40, 0.2, 10, np.random.default_rng(seed))
        tok, lab = b["seq"], b["labels"]
        assert tok.shape == lab.shape == (3, 10)
        masked = tok == 41
        assert torch.equal(masked, lab > 0) and masked.any(1).all()
        orig = pad_left(seqs, 10)
        assert torch.equal(lab[masked], orig[masked]) and torch.equal(tok[~masked], orig[~masked])
        assert masked[2].nonzero().flatten().tolist() == [9]
        assert torch.equal(b["tgt"], masked.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize(
    ("backbone", "loss"), [("sasrec", "bce"), ("gru4rec", "bce"), ("bert4rec", "bce"), ("sasrec", "ce")]
)
def test_main_runs_end_to_end_and_the_checkpoint_round_trips(backbone, loss, data, tmp_path) -> None:
    cfg = replace(TINY, backbone=backbone, loss=loss)
    res = main(cfg, data)
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and h["val_N@10"] is not None for h in res.history)
    assert res.best_epoch in (1, 2) and res.best_val == max(h["val_N@10"] for h in res.history)
    assert res.seconds_per_epoch > 0 and not res.model.training
    for protocol in ("sampled100", "full"):
        assert 0.0 <= res.test[protocol]["overall"]["N@10"] <= res.test[protocol]["overall"]["H@10"] <= 1.0

    path = save_checkpoint(res.model, cfg, tmp_path / backbone, data=data)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text())["dataset"]["n_items"] == N_ITEMS
    model, cfg2 = load_checkpoint(path)
    assert cfg2 == cfg and not model.training and model.config.loss == loss
    seq = pad_left(data.split("test")[0][:8], cfg.max_len)
    with torch.no_grad():
        torch.testing.assert_close(
            model.score_all(model(seq)), res.model.score_all(res.model(seq)), rtol=0, atol=0
        )


def test_main_is_deterministic_under_a_seed(data) -> None:
    a = main(replace(TINY, max_epochs=1), data)
    b = main(replace(TINY, max_epochs=1), data)
    assert a.history[0]["loss"] == b.history[0]["loss"] and a.best_val == b.best_val


def test_trained_sasrec_learns_the_walk_and_keeps_the_best_epoch(data) -> None:
    res = main(replace(TINY, max_epochs=30, patience=5, dropout=0.0, lr=5e-3), data)
    assert res.best_val > 0.5, res.best_val  # successor pattern; random full-ranking N@10 is ~0.03
    assert res.history[res.best_epoch - 1]["val_N@10"] == res.best_val
    assert len(res.history) <= max(res.best_epoch + 5, 30)


def test_frozen_table_training_and_checkpoint(data, tmp_path) -> None:
    table = torch.randn(N_ITEMS + 1, TINY.hidden)
    res = main(TINY, data, item_encoder=FrozenTableEncoder(table))
    torch.testing.assert_close(res.model.item_table()[1:], table[1:])  # the table was not trained
    model, _ = load_checkpoint(save_checkpoint(res.model, TINY, tmp_path / "frozen"))
    assert isinstance(model.item_encoder, FrozenTableEncoder)
    torch.testing.assert_close(model.item_table(), res.model.item_table())
