"""Symmetric in-batch contrastive loss (paper Eq. 4-5 for SCFT, Eq. 7 for RAT's alignment) and its temperature.

Row i of ``a`` and row i of ``b`` are a positive pair; every other row of the other side is a negative. The loss is
the sum of both directions, ``L(a->b) + L(b->a)`` (Eq. 5), each a mean over the rows.

Two forms of one direction (``s_ik = sim(a_i, b_k) / t``):

- ``"infonce"`` (default): ``-log( exp(s_ii) / sum_k exp(s_ik) )``, cross-entropy with the positive *in* the
  denominator. It is bounded below by 0 and its gradient vanishes once the positive wins by a margin, so a
  learnable temperature settles instead of running away.
- ``"paper"``: ``-log( exp(s_ii) / sum_{k != i} exp(s_ik) )``, the paper's Eq. 4 / Eq. 7 with the positive left
  out. It is unbounded below: ``s_ii - max_k s_ik`` can grow without limit, and a learnable temperature is pushed
  to its floor (``L -> -(s_ii - max s_ik) / t``). On L2-normalised vectors with a clamped temperature each side is
  bounded below by ``-2 / t_min + log(B - 1)``, which is why both forms work on normalised vectors by default.

The similarity is the inner product (paper), of L2-normalised vectors when ``normalize=True`` (i.e. cosine).
Everything is computed in fp32 whatever the inputs' dtype (fp16/bf16 logits divided by a small temperature
overflow: one cause of the NaNs of the reference code).

    >>> t = Temperature(init=0.05)
    >>> loss = info_nce(view1, view2, t(), form="infonce")   # (B, d), (B, d) -> scalar
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Form = Literal["infonce", "paper"]
FORMS = ("infonce", "paper")


def first_occurrence(ids: Tensor) -> Tensor:
    """Indices (sorted) of the first occurrence of each distinct value of ``ids`` (B,); O(B log B), no B x B mask."""
    ids = ids.reshape(-1)
    unique, inverse = torch.unique(
        ids, return_inverse=True
    )  # inverse (B,): each row's index among the uniques
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full(unique.shape, ids.numel(), dtype=positions.dtype, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # (U,) smallest row per unique value
    return first.sort().values


def info_nce(
    a: Tensor,
    b: Tensor,
    temperature: Tensor | float,
    form: Form = "infonce",
    normalize: bool = True,
    ids: Tensor | None = None,
) -> Tensor:
    """Symmetric in-batch contrastive loss ``L(a->b) + L(b->a)`` (paper Eq. 5); a scalar fp32 tensor.

    a, b: (B, d) paired rows (row i of ``a`` is the positive of row i of ``b``), any float dtype; upcast to fp32.
    temperature: positive scalar (a float, or a 0-dim tensor such as ``Temperature()()`` to learn it).
    form: "infonce" (positive in the denominator) or "paper" (Eq. 4: positive left out); see the module docstring.
    normalize: L2-normalise rows first, so the similarity is the cosine and both forms are bounded.
    ids: optional (B,) item ids. Rows whose id already appeared earlier in the batch are dropped (the first
        occurrence is kept) before the loss: the same item twice in a batch (RAT aligns over the items of a batch
        of sequences) would otherwise be its own negative, with a score equal to the positive's. Filter padding
        ids out before calling.

    With fewer than two rows (after dedupe) there are no negatives: the loss is a zero that still backpropagates
    (zero gradients), so a degenerate batch does not stop a training loop.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"a and b must both be (B, d) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if not isinstance(temperature, Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if ids is not None:
        if ids.shape != a.shape[:1]:
            raise ValueError(f"ids must be (B,) = ({a.shape[0]},), got {tuple(ids.shape)}")
        keep = first_occurrence(ids.to(a.device))
        if keep.numel() < a.shape[0]:
            a, b = a[keep], b[keep]
    a, b = a.float(), b.float()
    if isinstance(temperature, Tensor):
        temperature = temperature.float()
    if a.shape[0] < 2:
        return (a.sum() + b.sum()) * 0.0
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = (a @ b.T) / temperature  # (B, B): logits[i, k] = sim(a_i, b_k) / t
    return _one_side(logits, form) + _one_side(logits.T, form)


def _one_side(logits: Tensor, form: Form) -> Tensor:
    """Mean over rows of the contrastive loss of one direction; the positives are on the diagonal."""
    target = torch.arange(logits.shape[0], device=logits.device)
    if form == "infonce":
        return F.cross_entropy(logits, target)
    positive = logits.diagonal()  # (B,)
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    negatives = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1)  # (B,): log sum_{k != i} exp
    return (negatives - positive).mean()


class Temperature(nn.Module):
    """A learnable contrastive temperature, stored as ``log t`` and clamped to ``[min_value, max_value]``.

    Log-parameterised so the optimiser moves it multiplicatively and it can never reach 0 or go negative. Clamped
    because an unclamped learnable temperature is the runaway direction of the paper's loss form (see the module
    docstring) and a tiny one overflows the logits; 0.01..1.0 suits normalised vectors (cosine in [-1, 1], so
    logits stay within +-100). ``forward`` returns the clamped value (the gradient flows inside the range and at
    its edges); call ``clamp_()`` after each optimiser step so momentum cannot carry the raw parameter beyond the
    range, where its gradient would be zero for good.
    """

    def __init__(
        self, init: float = 0.05, min_value: float = 0.01, max_value: float = 1.0, learnable: bool = True
    ) -> None:
        super().__init__()
        if not 0 < min_value <= init <= max_value:
            raise ValueError(f"need 0 < min_value <= init <= max_value, got {min_value}, {init}, {max_value}")
        self.min_value, self.max_value = float(min_value), float(max_value)
        self.log_t = nn.Parameter(torch.tensor(math.log(init), dtype=torch.float32), requires_grad=learnable)

    def forward(self) -> Tensor:
        """The temperature, a 0-dim fp32 tensor in [min_value, max_value]."""
        return self.log_t.clamp(math.log(self.min_value), math.log(self.max_value)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Put the raw parameter back into range (in place)."""
        self.log_t.clamp_(math.log(self.min_value), math.log(self.max_value))

    def extra_repr(self) -> str:
        return f"value={self().item():.4g}, range=[{self.min_value}, {self.max_value}]"
