"""SRS backbones: the contract's shapes, causality, padding invariance, exported tables, and that they learn."""

from __future__ import annotations

import math

import pytest
import torch

from models.srs import (
    BACKBONES,
    Bert4Rec,
    FrozenTableEncoder,
    IDEncoder,
    SASRec,
    SRSConfig,
    build_backbone,
    flat_targets,
    pad_left,
    target_rows,
)

N_ITEMS, HIDDEN, MAX_LEN = 30, 16, 12
NAMES = sorted(BACKBONES)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw) -> SRSConfig:
    base = {
        "n_items": N_ITEMS,
        "hidden": HIDDEN,
        "n_layers": 2,
        "n_heads": 2,
        "dropout": 0.2,
        "max_len": MAX_LEN,
    }
    return SRSConfig(**(base | kw))


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_backbone(name, config(**kw))


def batch_for(model, seq: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A training batch of the model's objective from full windows (B, L + 1): inputs + next items."""
    inp, nxt = seq[:, :-1], seq[:, 1:]
    if model.objective == "next":
        neg = torch.randint(1, N_ITEMS + 1, nxt.shape, generator=gen)
        neg = torch.where(neg == nxt, neg % N_ITEMS + 1, neg) * (nxt > 0)
        return {"seq": inp, "pos": nxt, "neg": neg}
    masked = (torch.rand(seq.shape, generator=gen) < 0.3) & (seq > 0)
    masked[:, -1] = seq[:, -1] > 0
    return {"seq": seq.masked_fill(masked, N_ITEMS + 1), "labels": seq * masked}


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_loss(name: str) -> None:
    model = make(name)
    seq = pad_left([[1, 2, 3], list(range(1, 20)), [5]], MAX_LEN + 1)  # (3, 13)
    assert model.objective in ("next", "cloze")
    assert model(seq).shape == (3, HIDDEN)
    assert model.sequence_states(seq[:, 1:]).shape == (3, MAX_LEN, HIDDEN)
    assert model.score_all(model(seq)).shape == (3, N_ITEMS + 1)
    assert model.score(model(seq), model.item_table()[:7]).shape == (3, 7)
    loss = model.loss(batch_for(model, seq, torch.Generator().manual_seed(0)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.item_encoder.embedding.weight.grad is not None


def test_build_backbone_rejects_unknown_and_mismatched_encoder() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("caser", config())
    with pytest.raises(ValueError, match="dim"):
        SASRec(config(), IDEncoder(N_ITEMS, HIDDEN * 2))


def test_sasrec_is_causal() -> None:
    model = make("sasrec").eval()
    seq = torch.randint(1, N_ITEMS + 1, (4, MAX_LEN))
    for t in (0, 5, MAX_LEN - 1):
        changed = seq.clone()
        changed[:, t] = changed[:, t] % N_ITEMS + 1
        with torch.no_grad():
            a, b = model.sequence_states(seq), model.sequence_states(changed)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)  # the past cannot see item t
        assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-4  # the present and the future can


def test_bert4rec_is_bidirectional() -> None:
    model = make("bert4rec").eval()
    seq = torch.randint(1, N_ITEMS + 1, (4, MAX_LEN))
    changed = seq.clone()
    changed[:, -1] = changed[:, -1] % N_ITEMS + 1
    with torch.no_grad():
        a, b = model.sequence_states(seq), model.sequence_states(changed)
    assert (a[:, :-1] - b[:, :-1]).abs().amax(-1).min() > 1e-4  # every earlier position sees the last item


def test_bert4rec_forward_appends_mask_and_keeps_max_len_minus_one() -> None:
    model = make("bert4rec").eval()
    long = torch.randint(1, N_ITEMS + 1, (2, 30))
    with torch.no_grad():
        expected = model.sequence_states(
            torch.cat([long[:, -(MAX_LEN - 1) :], torch.full((2, 1), model.mask_id)], dim=1)
        )[:, -1]
        torch.testing.assert_close(model(long), expected)
    assert model.item_encoder.table().shape == (N_ITEMS + 1, HIDDEN)  # [mask] lives outside the table


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_does_not_change_the_user_state(name: str) -> None:
    model = make(name).eval()
    history = [3, 9, 4, 27, 8]
    with torch.no_grad():
        states = [model(pad_left([history], MAX_LEN, length=w)) for w in (5, 6, 9, MAX_LEN)]
        states.append(
            model(pad_left([history, [i % N_ITEMS + 1 for i in range(40)]], MAX_LEN))[:1]
        )  # padded by a batch-mate
    for s in states[1:]:
        torch.testing.assert_close(s, states[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_all_padding_rows_give_no_nan(name: str) -> None:
    model = make(name)
    seq = pad_left([[], [4, 5, 6]], MAX_LEN, length=6)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(seq)).all()
        assert torch.isfinite(model(torch.zeros(3, 1, dtype=torch.long))).all()
    model.train()
    windows = pad_left([[], [4, 5, 6, 7]], MAX_LEN + 1, length=7)
    loss = model.loss(batch_for(model, windows, torch.Generator().manual_seed(1)))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_on_an_exported_frozen_table_reproduces_scores(name: str) -> None:
    model = make(name, seed=3).eval()
    table = model.item_table().detach().clone()  # what a bundle's tables/item.safetensors holds
    frozen = BACKBONES[name](config(), FrozenTableEncoder(table)).eval()
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("item_encoder.")}
    missing, unexpected = frozen.load_state_dict(rest, strict=False)
    assert missing == ["item_encoder.weight"] and not unexpected
    assert not any(p.requires_grad for p in frozen.item_encoder.parameters())
    seq = pad_left([[1, 2, 3], [7, 7, 30, 12, 5]], MAX_LEN)
    with torch.no_grad():
        torch.testing.assert_close(frozen.score_all(frozen(seq)), model.score_all(model(seq)))


def pattern_windows(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(n, length) sequences where item i is always followed by item i + 1 (cyclic over 1..N_ITEMS)."""
    start = torch.randint(0, N_ITEMS, (n, 1), generator=gen)
    return (start + torch.arange(length)) % N_ITEMS + 1


def test_catalog_softmax_loss_on_a_hand_made_case() -> None:
    """loss="ce": cross-entropy of each non-padding position's state against every item vector."""
    from torch.nn import functional as F

    from models.srs.sasrec import next_item_ce

    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # row 0 = padding, 3 items
    enc = FrozenTableEncoder(table)
    states = torch.tensor([[[9.0, 9.0], [2.0, 0.0], [0.0, 3.0]]])  # (1, 3, 2); position 0 has no target
    pos = torch.tensor([[0, 1, 3]])
    # position 1: logits (2, 0, 2), target item 1; position 2: logits (0, 3, 3), target item 3
    want = (
        F.cross_entropy(torch.tensor([[2.0, 0.0, 2.0]]), torch.tensor([0]))
        + F.cross_entropy(torch.tensor([[0.0, 3.0, 3.0]]), torch.tensor([2]))
    ) / 2
    assert torch.allclose(next_item_ce(states, enc, pos), want)
    assert abs(want.item() - (math.log(2 + math.exp(-2)) + math.log(2 + math.exp(-3))) / 2) < 1e-6


@pytest.mark.parametrize("name", ["sasrec", "gru4rec"])
def test_loss_setting_switches_the_next_item_objective(name: str) -> None:
    seq = pad_left([[1, 2, 3], list(range(1, 20)), [5]], MAX_LEN + 1)
    batch = batch_for(make(name), seq, torch.Generator().manual_seed(0))
    bce, ce = make(name, seed=0, dropout=0.0).eval(), make(name, seed=0, dropout=0.0, loss="ce").eval()
    assert bce.loss(batch).item() != pytest.approx(ce.loss(batch).item())
    no_neg = {**batch, "neg": torch.zeros_like(batch["neg"])}  # CE needs no sampled negatives
    assert ce.loss(no_neg).item() == pytest.approx(ce.loss(batch).item())
    with pytest.raises(ValueError, match="loss must be one of"):
        config(loss="bpr")


@pytest.mark.parametrize(
    ("name", "loss"), [(n, "bce") for n in NAMES] + [("sasrec", "ce"), ("gru4rec", "ce")]
)
def test_learns_the_successor_pattern(name: str, loss: str) -> None:
    model = make(name, seed=0, dropout=0.1, loss=loss)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(120):
        windows = pattern_windows(32, int(torch.randint(4, MAX_LEN + 2, (1,), generator=gen)), gen)
        loss = model.loss(batch_for(model, windows, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Cloze CE over all items falls more slowly than BCE against one negative; both fall clearly.
    assert sum(losses[-10:]) < 0.75 * sum(losses[:10])

    # Next-item hit@10 on fresh histories: random guessing gives 10 / N_ITEMS = 0.33.
    model.eval()
    test = pattern_windows(64, 7, gen)
    with torch.no_grad():
        top = model.score_all(model(test[:, :-1])).topk(10).indices
    hit = (top == test[:, -1:]).any(1).float().mean().item()
    assert hit > 0.9, hit


def test_sasrec_positions_are_right_aligned() -> None:
    model = make("sasrec").eval()
    with torch.no_grad():
        model.stack.pos_emb.weight[:-1].fill_(1e3)  # only the last position keeps a sane embedding
        a = model(torch.tensor([[5]]))
        b = model(torch.tensor([[0, 0, 5]]))
    torch.testing.assert_close(a, b)
    assert isinstance(model, SASRec) and not isinstance(model, Bert4Rec)


def test_target_rows_through_a_host_index_equal_boolean_indexing() -> None:
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.4
    index = flat_targets(mask)
    torch.testing.assert_close(target_rows(x, mask, index), x[mask], rtol=0, atol=0)
    torch.testing.assert_close(target_rows(x, mask), x[mask], rtol=0, atol=0)
    assert index.tolist() == [i for i, m in enumerate(mask.reshape(-1).tolist()) if m]


@pytest.mark.parametrize("loss", ["bce", "ce"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_with_the_target_index_is_the_same_loss(name: str, loss: str) -> None:
    # Training batches carry "tgt" (flat indices of the target positions) so the loss needs no device sync.
    model = make(name, loss=loss).eval()
    gen = torch.Generator().manual_seed(3)
    seq = pad_left(
        [torch.randint(1, N_ITEMS + 1, (n,), generator=gen) for n in (3, 9, MAX_LEN + 1)], MAX_LEN + 1
    )
    batch = batch_for(model, seq, gen)
    key = "pos" if model.objective == "next" else "labels"
    with torch.no_grad():
        plain = model.loss(batch)
        indexed = model.loss({**batch, "tgt": flat_targets(batch[key] > 0)})
    torch.testing.assert_close(indexed, plain, rtol=0, atol=0)
