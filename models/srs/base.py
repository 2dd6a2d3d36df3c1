"""The contract every SRS backbone follows, and the item encoders that feed them.

A backbone maps a left-padded item-id sequence to a user state and scores items by inner product:

    forward(seq: LongTensor[B, L]) -> Tensor[B, H]     user state after the last position (0 = padding)
    loss(batch: dict[str, Tensor]) -> Tensor            scalar training loss
    score(user: Tensor[B, H], items: Tensor[N, H]) -> Tensor[B, N]

Item vectors come from an `ItemEncoder`, so the same backbone runs on a trainable ID table, a frozen (LLM) table
plus adapter, or a table initialised from LLM vectors. Sequences are LEFT-padded: the most recent item is at
position L-1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

LOSSES = ("bce", "ce")


@dataclass(frozen=True)
class SRSConfig:
    """Shared backbone hyper-parameters. Defaults follow the LLMEmb reference code."""

    n_items: int  # internal ids 1..n_items; 0 = padding
    hidden: int = 128
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.5  # the reference's value; high, but ml-100k / Beauty overfit fast without it
    max_len: int = 200
    # Next-item backbones (SASRec, GRU4Rec): "bce" = one sampled negative per position (the SASRec / LLMEmb
    # reference), "ce" = softmax cross-entropy over the whole catalog. Bert4Rec's cloze loss is always the latter.
    loss: str = "bce"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if self.n_items < 1:
            raise ValueError("n_items must be >= 1")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.max_len < 1:
            raise ValueError("max_len must be >= 1")


class ItemEncoder(nn.Module):
    """Maps internal item ids to vectors of size `dim`. Row 0 (padding) is always the zero vector."""

    dim: int
    n_items: int

    def table(self) -> torch.Tensor:
        """All item vectors, (n_items + 1, dim); row 0 is zeros."""
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., dim)
        raise NotImplementedError


class IDEncoder(ItemEncoder):
    """A trainable ID embedding table (the classic SRS item embedding)."""

    def __init__(self, n_items: int, dim: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.n_items, self.dim = n_items, dim
        self.embedding = nn.Embedding(n_items + 1, dim, padding_idx=0)
        if init is not None:
            if tuple(init.shape) != (n_items + 1, dim):
                raise ValueError(f"init table has shape {tuple(init.shape)}, expected {(n_items + 1, dim)}")
            with torch.no_grad():
                self.embedding.weight.copy_(init)
        else:
            nn.init.normal_(self.embedding.weight, std=0.02)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def table(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


class FrozenTableEncoder(ItemEncoder):
    """A fixed table (e.g. an exported `item` table): not trained, saved as a buffer."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.n_items, self.dim = table.shape[0] - 1, table.shape[1]
        t = table.detach().clone().float()
        t[0] = 0
        self.register_buffer("weight", t)

    def table(self) -> torch.Tensor:
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class SRSBackbone(nn.Module):
    """Base class: subclasses implement `forward` and `loss`; `score` is the inner product."""

    config: SRSConfig
    item_encoder: ItemEncoder

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return user @ items.T  # (B, H) @ (H, N) -> (B, N)

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        """Scores against every item, (B, n_items + 1); column 0 (padding) is -inf."""
        s = self.score(user, self.item_encoder.table())
        s[:, 0] = float("-inf")
        return s

    def item_table(self) -> torch.Tensor:
        return self.item_encoder.table()

    def items_grew(self, n_items: int) -> None:
        """The item encoder now holds ``n_items`` items (a served catalog that grew): update what the backbone
        derives from the count, so it goes on without being rebuilt (its parameters stay where they are)."""
        self.config = replace(self.config, n_items=n_items)


def target_rows(x: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """x[mask] for x (B, L, ...) and a (B, L) mask: the rows of the target positions, in row-major order.

    index: the same positions as flat indices into B * L (`flat_targets(mask)`, computed on the host when the
    batch is built). Gathering through it gives the same rows without the device-to-host sync that boolean
    indexing needs to learn the result's size.
    """
    if index is None:
        return x[mask]
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def flat_targets(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> flat indices of its True entries (row-major), for `target_rows`."""
    return torch.nonzero(mask.reshape(-1), as_tuple=True)[0]


def pad_left(seqs: list, max_len: int, length: int | None = None) -> torch.Tensor:
    """Left-pad (and left-truncate to the most recent `max_len`) id sequences into a LongTensor (B, L).

    L = `length` if given, else the longest (truncated) sequence in the batch, so short batches stay short.
    Items keep their distance from the end: the last item is always at column L-1.
    """
    seqs = [list(s[-max_len:]) if max_len else list(s) for s in seqs]
    width = length if length is not None else max((len(s) for s in seqs), default=1)
    width = max(width, 1)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            s = s[-width:]
            out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
    return out
