"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer trained with the cloze task.

The transformer stack is SASRec's (same blocks, right-aligned learned positions, sqrt(H) item scaling) without
the causal mask: every position sees the whole sequence. The [mask] token has id n_items + 1 and its own
learnable vector, kept apart from the item encoder so that the encoder stays exactly n_items + 1 rows and can be
exported or swapped (frozen LLM table + adapter) like any other backbone's.

Training (batch "seq" with some items replaced by the mask id, "labels" = original id at masked positions and 0
elsewhere): softmax cross-entropy over all items (padding excluded) at every masked position.

Inference: `forward(seq)` keeps the most recent max_len - 1 items, appends a [mask] and returns the state at
that position — "what comes next?" asked in the form the model was trained on (the training job also masks
the last item of each sequence for this reason).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.srs.base import IDEncoder, ItemEncoder, SRSBackbone, SRSConfig, target_rows
from models.srs.sasrec import TransformerStack, _check_encoder


class Bert4Rec(SRSBackbone):
    """Bidirectional cloze-trained recommender. Batch for `loss`: seq, labels, both (B, L)."""

    objective = "cloze"

    def __init__(self, config: SRSConfig, item_encoder: ItemEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.item_encoder = _check_encoder(config, item_encoder or IDEncoder(config.n_items, config.hidden))
        self.mask_id = config.n_items + 1
        self.mask_vector = nn.Parameter(torch.randn(config.hidden) * 0.02)  # (H,)
        self.stack = TransformerStack(config, causal=False)

    def items_grew(self, n_items: int) -> None:
        super().items_grew(n_items)
        self.mask_id = n_items + 1  # the [mask] id stays past the last item

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, possibly containing mask_id -> (B, L, H) input vectors."""
        is_mask = seq == self.mask_id
        e = self.item_encoder(seq.masked_fill(is_mask, 0))
        return torch.where(is_mask.unsqueeze(-1), self.mask_vector.to(e.dtype), e)

    def sequence_states(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids (mask_id allowed) -> (B, L, H) states, each seeing the whole row."""
        seq = seq[:, -self.config.max_len :]
        return self.stack(self.embed(seq), seq != 0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        keep = self.config.max_len - 1
        seq = seq[:, -keep:] if keep else seq[:, :0]  # most recent max_len - 1 items
        mask = torch.full((seq.shape[0], 1), self.mask_id, dtype=seq.dtype, device=seq.device)
        return self.sequence_states(torch.cat([seq, mask], dim=1))[:, -1]  # (B, H): state at the [mask]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.config.max_len
        states = self.sequence_states(batch["seq"])
        labels = batch["labels"][:, -w:]
        m = labels > 0  # (B, L) masked positions
        index = batch.get("tgt") if batch["labels"].shape[1] <= w else None  # as in next_item_loss
        rows = target_rows(states, m, index)
        logits = rows @ self.item_encoder.table()[1:].T  # (M, n_items): column c is item c + 1
        return F.cross_entropy(logits, target_rows(labels, m, index) - 1)
