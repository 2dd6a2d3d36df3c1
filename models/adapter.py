"""The RAT adapter (paper Eq. 6) and the item encoder it drives (method step 6).

    e_i = W1 (W2 ē_i + b2) + b1        ē_i: PCA'd LLM embedding (d_m), e_i: SRS item embedding (d)

Two linear layers and deliberately NO activation between them (the paper's form): the map is affine, rank-limited
by d_hidden = d_m / 2. `AdaptedTableEncoder` keeps ē frozen (the paper's choice: updating it destroys the
semantics) and runs the adapter only on the ids a batch asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.srs.base import FrozenTableEncoder, ItemEncoder


@dataclass(frozen=True)
class AdapterConfig:
    d_in: int  # d_m, the PCA size (paper 1536)
    d_out: int  # the SRS hidden size (paper 128)
    d_hidden: int | None = (
        None  # None -> d_in // 2, the paper's W2 in R^{d_m/2 x d_m}; resolved in __post_init__
    )
    dropout: float = 0.0  # on the hidden code; 0 as in the paper (the backbone has its own embedding dropout)

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_out < 1:
            raise ValueError(f"d_in and d_out must be >= 1, got d_in={self.d_in}, d_out={self.d_out}")
        if self.d_hidden is None:
            object.__setattr__(self, "d_hidden", max(1, self.d_in // 2))
        if self.d_hidden < 1:
            raise ValueError(f"d_hidden must be >= 1, got {self.d_hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class Adapter(nn.Module):
    """Eq. 6: (..., d_in) -> (..., d_out). `w2` is applied first (d_in -> d_hidden), then `w1` (-> d_out)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.w2 = nn.Linear(config.d_in, config.d_hidden)  # W2, b2
        self.dropout = nn.Dropout(config.dropout)
        self.w1 = nn.Linear(config.d_hidden, config.d_out)  # W1, b1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1(self.dropout(self.w2(x)))  # no activation: Eq. 6 is affine


def adapt_rows(
    adapter: nn.Module, table: torch.Tensor, ids: torch.Tensor, dedupe: bool | None = None
) -> torch.Tensor:
    """adapter(table[ids]), (...,) -> (..., d_out), with padding (id 0) rows zero.

    dedupe (default: on the CPU only) runs the adapter once per distinct id, not once per position: a (B=256,
    L=200) batch of sequences holds far fewer distinct items than positions. On an accelerator it runs on every
    position instead, because `torch.unique` waits for the device (its output size is data-dependent), and a host
    sync per call costs more there than the redundant rows, above all with several training processes sharing
    one GPU. Both give the same vectors.
    """
    if dedupe is None:
        dedupe = ids.device.type == "cpu"
    if dedupe:
        uniq, inverse = torch.unique(ids, return_inverse=True)  # (U,), ids.shape
        vecs = adapter(table[uniq]).masked_fill((uniq == 0)[:, None], 0.0)  # (U, d_out)
        return vecs[inverse]
    return adapter(table[ids]) * (ids != 0).unsqueeze(-1).to(table.dtype)


class AdaptedTableEncoder(ItemEncoder):
    """LLMEmb's item encoder: a frozen table ē (n_items + 1, d_in), row 0 padding, followed by an `Adapter`.

    `trainable_table=True` makes ē an `nn.Parameter` (the paper's "w/o freeze" ablation); the tensor keeps the
    name `weight` either way, so state dicts of the two variants are interchangeable.
    """

    def __init__(
        self,
        table: torch.Tensor,
        adapter: Adapter | AdapterConfig,
        trainable_table: bool = False,
    ) -> None:
        super().__init__()
        if table.ndim != 2 or table.shape[0] < 2:
            raise ValueError(f"table must be (n_items + 1, d_in) with n_items >= 1, got {tuple(table.shape)}")
        self.adapter = adapter if isinstance(adapter, Adapter) else Adapter(adapter)
        if table.shape[1] != self.adapter.config.d_in:
            raise ValueError(f"table dim {table.shape[1]} != adapter d_in {self.adapter.config.d_in}")
        self.n_items, self.dim = table.shape[0] - 1, self.adapter.config.d_out
        self.trainable_table = trainable_table
        t = table.detach().clone().float()
        t[0] = 0
        if trainable_table:
            self.weight = nn.Parameter(t)
        else:
            self.register_buffer("weight", t)

    def table(self) -> torch.Tensor:
        """All adapted item vectors, (n_items + 1, d_out); row 0 is zeros."""
        out = self.adapter(self.weight)  # (n + 1, d_out)
        mask = torch.ones(out.shape[0], 1, dtype=out.dtype, device=out.device)
        mask[0] = 0  # the adapter is affine, so adapter(0) = W1 b2 + b1 != 0: zero the padding row explicitly
        return out * mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., d_out)
        return adapt_rows(self.adapter, self.weight, ids)

    @torch.no_grad()
    def to_frozen(self) -> FrozenTableEncoder:
        """Method step 7: precompute e_i for every item and cache them as a plain table (no adapter at serve)."""
        was_training = self.training
        self.eval()
        try:
            return FrozenTableEncoder(self.table())
        finally:
            self.train(was_training)
