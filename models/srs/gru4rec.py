"""GRU4Rec (Hidasi et al., ICLR 2016) in its common SRS form: embedding -> dropout -> GRU -> dense.

Trained like SASRec (the LLMEmb reference does the same): every position predicts the next item, BCE against
one sampled negative per position. Batch for `loss`: seq, pos, neg, all (B, L), left-padded.

Left padding: a GRU that ran over the padding zeros would carry a state that depends on how much padding its
batch had (the zero vector still moves the hidden state through the biases). So the padding is never fed to the
GRU: each row is rotated into right-padded form, packed with its true length, run, and rotated back. The user
state is then exactly a function of the real items, and the last column is always the last real item.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.srs.base import IDEncoder, ItemEncoder, SRSBackbone, SRSConfig
from models.srs.sasrec import next_item_loss


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, j] = x[b, (j + shift[b]) % L] for x (B, L, ...) and shift (B,)."""
    b, length = x.shape[:2]
    idx = (torch.arange(length, device=x.device)[None, :] + shift[:, None]) % length  # (B, L)
    idx = idx.view(b, length, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


class GRU4Rec(SRSBackbone):
    """Recurrent sequential recommender over the item encoder's vectors."""

    objective = "next"

    def __init__(self, config: SRSConfig, item_encoder: ItemEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        enc = item_encoder or IDEncoder(config.n_items, config.hidden)
        if enc.n_items != config.n_items:
            raise ValueError(f"item encoder has {enc.n_items} items, config says {config.n_items}")
        self.item_encoder = enc
        self.emb_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(enc.dim, config.hidden, num_layers=config.n_layers, batch_first=True)
        # Maps GRU states into the item space so `score` stays an inner product with item vectors.
        self.dense = nn.Linear(config.hidden, enc.dim)
        for name, p in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(p)
        nn.init.xavier_normal_(self.dense.weight)

    def sequence_states(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, L, D) states in item space; padding rows are zero."""
        seq = seq[:, -self.config.max_len :]
        b, length = seq.shape
        valid = seq != 0
        n = valid.sum(1)  # (B,) real items per row; they occupy the last n columns
        x = self.emb_dropout(self.item_encoder(seq))  # (B, L, D)
        x = _rotate(x, length - n)  # right-padded: real items in columns 0..n-1
        # pack_padded_sequence wants lengths >= 1 on the CPU; an all-padding row runs one step, zeroed below.
        packed = pack_padded_sequence(x, n.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)  # (B, L, H)
        out = _rotate(out, n)  # back to left-padded
        return self.dense(out) * valid.unsqueeze(-1).to(out.dtype)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.sequence_states(seq)[:, -1]  # (B, D): state after the most recent item

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_item_loss(self.config, self.sequence_states(batch["seq"]), self.item_encoder, batch)
