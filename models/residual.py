"""Beyond the paper: the LLMEmb item encoder plus a trainable ID residual, optionally gated by popularity.

    e_i = adapter(ē_i) + g(c_i) * r_i        ē: frozen PCA'd LLM table (d_m), adapter: Eq. 6 (d_m -> d),
                                              r: trainable ID table (d), c_i: item i's training count, g in [0, 1]

Why. The frozen table + adapter (LLMEmb) carries semantics to the tail but has little room for item-specific
collaborative detail, so popular items lose accuracy; a trainable table initialised from LLM vectors (LLM2X) is the
reverse. Adding a free ID vector r_i brings the collaborative detail back, but an ungated r lets popular items'
vectors grow and take over full ranking (tail falls back to ID level). The gate g(c) scales the residual by how
much evidence the item has: an item never seen in training has g = 0 (its vector is purely semantic, which is also
what a new item registered online gets), a popular item has g ~ 1.

Gates (`GateConfig.kind`):
  "none"     g = 1 for every item ("LLMEmb+ID")
  "linear"   g = min(1, c / scale), fixed
  "sigmoid"  g = [c > 0] * sigmoid(slope * (log1p(c) - log1p(mid))), slope > 0 and mid learnable (init: scale)

r starts at zero (`init_std` = 0), so training starts from exactly the LLMEmb encoder. `dropout` drops whole
residual vectors (the item falls back to its semantic vector for that step), a second brake on memorisation.
`to_frozen()` exports the plain table for serving, like `AdaptedTableEncoder.to_frozen`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.adapter import Adapter, AdapterConfig, adapt_rows
from models.srs.base import FrozenTableEncoder, ItemEncoder

GATES = ("none", "linear", "sigmoid")


@dataclass(frozen=True)
class GateConfig:
    kind: str = "linear"  # "none" | "linear" | "sigmoid"
    # Count at which the linear gate saturates / the sigmoid is 0.5. None: the caller picks (training/rat.py uses
    # the count at the tail/head boundary, so the 80 % least popular items get a partial residual).
    scale: float | None = None
    slope: float = (
        2.0  # sigmoid only: initial steepness in log-count (2: g(scale / 5) ~ 0.05, g(5 * scale) ~ 0.95)
    )
    learnable: bool = True  # sigmoid only: learn slope and midpoint

    def __post_init__(self) -> None:
        if self.kind not in GATES:
            raise ValueError(f"gate kind must be one of {GATES}, got {self.kind!r}")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"gate scale must be > 0, got {self.scale}")
        if self.slope <= 0:
            raise ValueError(f"gate slope must be > 0, got {self.slope}")


class PopularityGate(nn.Module):
    """g(c_i) in [0, 1] for every item, from its training count; padding (row 0) gets 0."""

    def __init__(self, counts: torch.Tensor, config: GateConfig = GateConfig()) -> None:
        super().__init__()
        if counts.ndim != 1 or counts.shape[0] < 2:
            raise ValueError(f"counts must be (n_items + 1,), got {tuple(counts.shape)}")
        if bool((counts < 0).any()):
            raise ValueError("counts must be >= 0")
        if config.kind != "none" and config.scale is None:
            raise ValueError(f"gate {config.kind!r} needs a scale")
        self.config = config
        c = counts.detach().clone().float()
        c[0] = 0
        self.register_buffer("counts", c)  # (n + 1,)
        if config.kind == "sigmoid":
            # Slope kept positive through its log; the midpoint lives in log1p-count space.
            self.log_slope = nn.Parameter(
                torch.tensor(math.log(config.slope)), requires_grad=config.learnable
            )
            self.mid = nn.Parameter(torch.tensor(math.log1p(config.scale)), requires_grad=config.learnable)

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Gate values for `ids` (...,) -> (...,); all items (n + 1,) when ids is None."""
        c = self.counts if ids is None else self.counts[ids]
        kind = self.config.kind
        if kind == "none":
            g = torch.ones_like(c)
        elif kind == "linear":
            g = (c / self.config.scale).clamp(max=1.0)
        else:
            g = torch.sigmoid(self.log_slope.exp() * (torch.log1p(c) - self.mid)) * (c > 0).to(c.dtype)
        if ids is None:
            g = g.clone()
            g[0] = 0
        else:
            g = g.masked_fill(ids == 0, 0.0)
        return g

    def extra_repr(self) -> str:
        cfg = self.config
        if cfg.kind == "sigmoid":
            return f"kind=sigmoid, slope={self.log_slope.exp().item():.3g}, mid_count={math.expm1(self.mid.item()):.3g}"
        return f"kind={cfg.kind}, scale={cfg.scale}"


class ResidualAdaptedEncoder(ItemEncoder):
    """Frozen table ē (n + 1, d_in) -> `Adapter` -> + g(c) * r, r a trainable (n + 1, d_out) ID table.

    `semantic(ids)` is the adapter part alone (what RAT aligns with the ID-SASRec table, and all that a new item
    has); `forward(ids)` is the full item vector.
    """

    def __init__(
        self,
        table: torch.Tensor,
        adapter: Adapter | AdapterConfig,
        gate: PopularityGate,
        init_std: float = 0.0,
        dropout: float = 0.0,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if table.ndim != 2 or table.shape[0] < 2:
            raise ValueError(f"table must be (n_items + 1, d_in) with n_items >= 1, got {tuple(table.shape)}")
        self.adapter = adapter if isinstance(adapter, Adapter) else Adapter(adapter)
        if table.shape[1] != self.adapter.config.d_in:
            raise ValueError(f"table dim {table.shape[1]} != adapter d_in {self.adapter.config.d_in}")
        if gate.counts.shape[0] != table.shape[0]:
            raise ValueError(f"gate has {gate.counts.shape[0]} rows, table {table.shape[0]}")
        if init_std < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need init_std >= 0 and dropout in [0, 1), got {init_std}, {dropout}")
        self.n_items, self.dim = table.shape[0] - 1, self.adapter.config.d_out
        t = table.detach().clone().float()
        t[0] = 0
        self.register_buffer("weight", t)  # ē, frozen (same name as AdaptedTableEncoder's)
        self.residual = nn.Embedding(self.n_items + 1, self.dim, padding_idx=0)  # r
        if init is not None and tuple(init.shape) != tuple(self.residual.weight.shape):
            raise ValueError(
                f"residual init has shape {tuple(init.shape)}, expected {tuple(self.residual.weight.shape)}"
            )
        with torch.no_grad():
            if init is not None:
                self.residual.weight.copy_(init)
            elif init_std > 0:
                self.residual.weight.normal_(0.0, init_std)
            else:
                self.residual.weight.zero_()
            self.residual.weight[0].zero_()
        self.gate = gate
        self.dropout = dropout

    def semantic(self, ids: torch.Tensor) -> torch.Tensor:
        """adapter(ē_ids): (...,) -> (..., d_out); padding rows zero."""
        return adapt_rows(self.adapter, self.weight, ids)

    def gated_residual(self, ids: torch.Tensor) -> torch.Tensor:
        """g(c_ids) * r_ids, (...,) -> (..., d_out); whole vectors dropped with prob `dropout` in training."""
        r = self.residual(ids) * self.gate(ids).unsqueeze(-1)
        if self.training and self.dropout > 0:
            keep = torch.rand(r.shape[:-1] + (1,), device=r.device) >= self.dropout
            r = r * keep.to(r.dtype) / (1.0 - self.dropout)
        return r

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., d_out)
        return self.semantic(ids) + self.gated_residual(ids)

    def table(self) -> torch.Tensor:
        """All item vectors, (n_items + 1, d_out); row 0 zeros. Uses the expected residual (no dropout)."""
        sem = self.adapter(self.weight)  # (n + 1, d_out)
        out = sem + self.residual.weight * self.gate().unsqueeze(-1)
        mask = torch.ones(out.shape[0], 1, dtype=out.dtype, device=out.device)
        mask[0] = 0  # the adapter is affine: adapter(0) != 0, so zero the padding row explicitly
        return out * mask

    def residual_norms(self) -> torch.Tensor:
        """|g(c_i) r_i| per item, (n + 1,): how far each item moved from its semantic vector."""
        with torch.no_grad():
            return (self.residual.weight * self.gate().unsqueeze(-1)).norm(dim=-1)

    @torch.no_grad()
    def to_frozen(self) -> FrozenTableEncoder:
        """The inference form: every e_i precomputed into a plain table."""
        was_training = self.training
        self.eval()
        try:
            return FrozenTableEncoder(self.table())
        finally:
            self.train(was_training)
