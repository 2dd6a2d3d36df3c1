"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the item sequence, BCE with sampled negatives
(the reference) or softmax cross-entropy over the catalog (`SRSConfig.loss`).

The block arrangement follows the reference implementations (the authors' TF code, SASRec.pytorch, and the
LLMEmb code built on it):

    x = e(item) * sqrt(H) + P[position];  x = dropout(x);  x *= not_pad
    per block:  q = LN(x);  x = q + MHA(q, x, x);  x = x + FFN(LN(x));  x *= not_pad
    states = LN(x)

Queries are layer-normed, keys/values are not, and the FFN residual adds the normed input; this is the reference's
"pre-LN" variant, kept because it is what the published SASRec numbers come from. The FFN is two position-wise
linear layers with ReLU and dropout, as in the reference. Scaling item vectors by sqrt(H) is the original
SASRec's (and the Transformer's) choice: it keeps the item signal ahead of the positional one at init.

Unlike the LLMEmb reference code, attention is CAUSAL: position t sees only positions <= t, so the target of
position t (the item at t + 1) never leaks into its state.

Positions are right-aligned: sequences are left-padded to a batch-dependent width L <= max_len, and column j
gets position max_len - L + j, so the most recent item always has position max_len - 1 whatever L is. A user's
state therefore does not depend on how wide their batch was padded.

The transformer stack here is shared with Bert4Rec (which uses it without the causal mask).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.srs.base import IDEncoder, ItemEncoder, SRSBackbone, SRSConfig, target_rows


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True = query i may attend to key j.

    Padding keys are masked out, except that every position may always attend to itself: a padding query
    (or a row that is all padding) then has one allowed key instead of none, so softmax never sees an all -inf
    row and no NaN appears. Padding states are zeroed afterwards, and real queries never attend to padding.
    """
    b, length = valid.shape
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    allowed = valid[:, None, None, :] | eye  # (B, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    return allowed


class SelfAttention(nn.Module):
    """Multi-head attention with queries from one input and keys/values from another (the reference's form)."""

    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, h = q_in.shape
        q = self.q(q_in).view(b, length, self.n_heads, -1).transpose(1, 2)  # (B, nh, L, dh)
        k, v = (
            self.kv(kv_in).view(b, length, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        )  # 2 x (B, nh, L, dh)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)  # (B, nh, L, dh)
        return self.out(y.transpose(1, 2).reshape(b, length, h))


class PointWiseFFN(nn.Module):
    """Position-wise Linear-ReLU-Linear with dropout and a residual, as SASRec's point-wise feed-forward."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attn = SelfAttention(hidden, n_heads, dropout)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = PointWiseFFN(hidden, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        x = q + self.attn(q, x, allowed)
        return self.ffn(self.ffn_norm(x))


class TransformerStack(nn.Module):
    """Item vectors (B, L, H) + right-aligned positions -> per-position states (B, L, H); padding rows zero."""

    def __init__(self, config: SRSConfig, causal: bool) -> None:
        super().__init__()
        self.causal, self.max_len, self.hidden = causal, config.max_len, config.hidden
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        nn.init.xavier_normal_(self.pos_emb.weight)  # the reference initialises every matrix this way
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.hidden, config.n_heads, config.dropout) for _ in range(config.n_layers)
        )
        self.last_norm = nn.LayerNorm(config.hidden, eps=1e-8)

    def forward(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence width {length} exceeds max_len {self.max_len}")
        pos = torch.arange(self.max_len - length, self.max_len, device=items.device)  # (L,) right-aligned
        keep = valid.unsqueeze(-1).to(items.dtype)  # (B, L, 1)
        x = self.emb_dropout(items * self.hidden**0.5 + self.pos_emb(pos)) * keep
        allowed = attention_mask(valid, self.causal)
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.last_norm(x) * keep


def _check_encoder(config: SRSConfig, enc: ItemEncoder) -> ItemEncoder:
    if enc.dim != config.hidden:
        raise ValueError(f"item encoder dim {enc.dim} != hidden {config.hidden}")
    if enc.n_items != config.n_items:
        raise ValueError(f"item encoder has {enc.n_items} items, config says {config.n_items}")
    return enc


def next_item_bce(
    states: torch.Tensor,
    item_encoder: ItemEncoder,
    pos: torch.Tensor,
    neg: torch.Tensor,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE with one sampled negative per position, averaged over positions whose target is not padding.

    states: (B, L, H); pos / neg: (B, L) target and negative ids, 0 where there is no target. index: optional
    flat indices of those positions (`target_rows`), so that selecting them needs no device sync.
    """
    m = pos > 0  # (B, L)
    h = target_rows(states, m, index)  # (M, H)
    pos_logit = (h * item_encoder(target_rows(pos, m, index))).sum(-1)  # (M,)
    neg_logit = (h * item_encoder(target_rows(neg, m, index))).sum(-1)
    pos_loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
    return pos_loss + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


def next_item_ce(
    states: torch.Tensor, item_encoder: ItemEncoder, pos: torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy over every catalog item, averaged over positions whose target is not padding.

    Unlike `next_item_bce`, every item is a negative at every position, popular ones included, which is what
    full-ranking evaluation asks of the scores. states: (B, L, H); pos: (B, L), 0 where there is no target;
    index as in `next_item_bce`.
    """
    m = pos > 0
    rows = target_rows(states, m, index)  # (M, H)
    logits = rows @ item_encoder.table()[1:].T  # (M, n_items): column c is item c + 1
    return F.cross_entropy(logits.float(), target_rows(pos, m, index) - 1)


def next_item_loss(
    config: SRSConfig, states: torch.Tensor, item_encoder: ItemEncoder, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The next-item backbones' training loss, as `config.loss` names it, over the last max_len positions."""
    w = config.max_len
    # batch["tgt"] (training/srs.py): flat indices of the target positions, valid while nothing is cut off
    index = batch.get("tgt") if batch["pos"].shape[1] <= w else None
    if config.loss == "ce":
        return next_item_ce(states, item_encoder, batch["pos"][:, -w:], index)
    return next_item_bce(states, item_encoder, batch["pos"][:, -w:], batch["neg"][:, -w:], index)


class SASRec(SRSBackbone):
    """Causal self-attentive sequential recommender. Batch for `loss`: seq, pos, neg, all (B, L)."""

    objective = "next"

    def __init__(self, config: SRSConfig, item_encoder: ItemEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.item_encoder = _check_encoder(config, item_encoder or IDEncoder(config.n_items, config.hidden))
        self.stack = TransformerStack(config, causal=True)

    def sequence_states(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, L, H) states; state t summarises items <= t. Padding rows are zero."""
        seq = seq[:, -self.config.max_len :]
        return self.stack(self.item_encoder(seq), seq != 0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.sequence_states(seq)[:, -1]  # (B, H): state after the most recent item

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_item_loss(self.config, self.sequence_states(batch["seq"]), self.item_encoder, batch)
