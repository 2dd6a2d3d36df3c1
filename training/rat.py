"""Recommendation Adaptation Training (RAT, paper stage 2, Eq. 6-8): LLM item vectors into an SRS backbone.

The recipe, top to bottom: seed -> PCA of the LLM table (fit on items 1..n) -> the method's item encoder ->
training/srs.main with that encoder and, where the method aligns, the alignment term as its aux loss
(L_SRS + alpha * L_align, Eq. 8) -> the best-validation model, evaluated on test. There is no second training loop.

Methods (`RATConfig.method`):
  "None"                 ID backbone (trainable ID table), as `llmemb train srs`.
  "LLM2X"                PCA of the LLM table straight to H initialises a TRAINABLE ID table (Harte et al. 2023).
  "LLMEmb"               PCA to d_m, table FROZEN, Eq. 6 adapter (d_m -> d_m/2 -> H), fresh backbone,
                         + alpha * L_align: symmetric in-batch contrastive (Eq. 7, temperature gamma) between the
                         adapter outputs e_i and the ID-SASRec vectors ẽ_i over the DISTINCT items of the batch.
  "LLMEmb w/o SCFT"      LLMEmb; the caller passes the table of the LLM without SCFT (the label differs only).
  "LLMEmb w/o adapter"   PCA straight to H, frozen, no adapter. Nothing on the item side is trainable, so the
                         alignment term would have no gradient: it is not computed (alpha is ignored).
  "LLMEmb w/o freeze"    LLMEmb with the PCA'd table trainable.
  "LLMEmb w/o align"     LLMEmb with alpha = 0.
Beyond the paper (models/residual.py):
  "LLMEmb+ID"            e_i = adapter(ē_i) + r_i, r a trainable ID residual (init 0, or with `residual_pca_init`
                         LLM2X's: the PCA of the LLM table to H); alignment on adapter(ē_i).
  "LLMEmb+gatedID"       e_i = adapter(ē_i) + g(c_i) r_i, g a function of the item's training count c_i
                         (`gate`: "linear" min(1, c/scale) or "sigmoid" learnable in log c; g(0) = 0).

Alignment details. ẽ is a fixed target (no gradient). The items of a batch are the distinct real ids of its
input and target sequences ("seq", "pos"; "labels" for Bert4Rec) — the paper's S positions, with repeats removed so
that an item is never its own negative. `align_form="infonce"` keeps the positive in the denominator (bounded);
"paper" is Eq. 7 as printed. With `align_normalize` the similarity is the cosine, so gamma = 1 gives soft logits
in [-1, 1]; the paper sweeps gamma over 0.5..8 on raw inner products.

Tiny CPU run (about a minute on ml-100k):

    >>> from training.split import prepare
    >>> from training.embed import load_table
    >>> from training.rat import RATConfig, load_id_table, main, save_rat
    >>> from training.srs import SRSTrainConfig
    >>> data = prepare("ml-100k")
    >>> srs = SRSTrainConfig(max_epochs=3, hidden=64, max_len=50, device="cpu")
    >>> res = main(RATConfig(srs=srs, method="LLMEmb"), data, load_table("runs/llm.safetensors"),
    ...            load_id_table("runs/ml-100k/sasrec/seed42"))      # an ID-SASRec checkpoint with hidden=64
    >>> res.test["full"]["tail"]["N@10"]
    >>> save_rat(res, "runs/demo-rat", data=data, llm="minilm")      # inference form + pca + adapter
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save

from models.adapter import AdaptedTableEncoder, AdapterConfig
from models.contrastive import FORMS, info_nce
from models.io import atomic_write_bytes, atomic_write_text
from models.pca import PCA
from models.residual import GATES, GateConfig, PopularityGate, ResidualAdaptedEncoder
from models.srs import FrozenTableEncoder, IDEncoder, ItemEncoder, SRSBackbone
from training.data.dataset import PreparedDataset
from training.srs import SRSTrainConfig, TrainResult, load_checkpoint, save_checkpoint, seed_everything
from training.srs import main as srs_main

PAPER_METHODS = (
    "None",
    "LLM2X",
    "LLMEmb",
    "LLMEmb w/o SCFT",
    "LLMEmb w/o adapter",
    "LLMEmb w/o freeze",
    "LLMEmb w/o align",
)
EXTRA_METHODS = ("LLMEmb+ID", "LLMEmb+gatedID")
METHODS = PAPER_METHODS + EXTRA_METHODS
# Methods whose item side has trainable parameters the alignment can move (Eq. 7 applies).
ALIGNED = ("LLMEmb", "LLMEmb w/o SCFT", "LLMEmb w/o freeze", "LLMEmb+ID", "LLMEmb+gatedID")
PAPER_D_M = 1536  # the paper's intermediate PCA size; capped by d_llm (small LLMs) and the catalog size


@dataclass(frozen=True)
class RATConfig:
    srs: SRSTrainConfig = field(default_factory=SRSTrainConfig)
    method: str = "LLMEmb"
    d_m: int | None = None  # PCA size; None -> min(1536, d_llm, n_items). Must be <= d_llm.
    alpha: float = 0.01  # alignment weight (paper: best at 1e-2 on Yelp)
    # Alignment temperature (paper sweeps 0.5..8 on raw inner products). On cosines (align_normalize) the logits
    # are in [-1/gamma, 1/gamma]: gamma = 1 barely moves the loss off chance (2 log S); 0.1 is a real pull.
    gamma: float = 1.0
    align_form: str = "infonce"  # "infonce" (positive in the denominator) | "paper" (Eq. 7 as printed)
    align_normalize: bool = True  # cosine similarity: both forms bounded (see models/contrastive.py)
    adapter_dropout: float = 0.0  # on the adapter's hidden code; 0 as in the paper
    # ---- residual variants only ("LLMEmb+ID", "LLMEmb+gatedID") ----
    residual_init_std: float = 0.0  # 0: training starts from exactly the LLMEmb encoder
    # Start the residual at LLM2X's initialisation instead: the PCA of the method's LLM table to H (a variant;
    # the residual then begins as an LLM-initialised ID table beside the frozen one, residual_init_std ignored).
    residual_pca_init: bool = False
    residual_dropout: float = 0.0  # drop whole residual vectors (item falls back to its semantic vector)
    residual_l2: float = 0.0  # + residual_l2 * mean |g r_i|^2 over the batch's distinct items
    gate: str = "sigmoid"  # "LLMEmb+gatedID" only: "linear" | "sigmoid" (learnable; measured >= linear)
    # Count where the gate saturates (linear) / is 0.5 (sigmoid). None: the training count at the tail/head
    # boundary (the evaluator's 80 % Pareto split), so tail items get a partial residual and head items a full one.
    gate_scale: float | None = None
    gate_learnable: bool = True  # sigmoid gate: learn slope and midpoint

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.d_m is not None and self.d_m < 1:
            raise ValueError(f"d_m must be >= 1, got {self.d_m}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.align_form not in FORMS:
            raise ValueError(f"align_form must be one of {FORMS}, got {self.align_form!r}")
        for name in ("adapter_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.residual_init_std < 0 or self.residual_l2 < 0:
            raise ValueError("residual_init_std and residual_l2 must be >= 0")
        if self.gate not in GATES or self.gate == "none":
            raise ValueError(f"gate must be 'linear' or 'sigmoid', got {self.gate!r}")
        if self.gate_scale is not None and self.gate_scale <= 0:
            raise ValueError(f"gate_scale must be > 0, got {self.gate_scale}")

    @property
    def uses_llm(self) -> bool:
        return self.method != "None"

    @property
    def effective_alpha(self) -> float:
        """The alignment weight actually applied: 0 for methods without alignment (see the module docstring)."""
        return self.alpha if self.method in ALIGNED else 0.0

    def resolve_d_m(self, d_llm: int, n_items: int) -> int:
        if self.d_m is None:
            return min(PAPER_D_M, d_llm, n_items)
        if self.d_m > d_llm:
            raise ValueError(f"d_m={self.d_m} exceeds the LLM table's width d_llm={d_llm}")
        return self.d_m


@dataclass
class RATResult(TrainResult):
    pca: PCA | None = None  # the fitted transform (None for "None"); new items go through exactly this
    rat_config: RATConfig | None = None


# ---- item encoders ----------------------------------------------------------------------------------------------
def pca_table(llm_table: torch.Tensor, k: int) -> tuple[torch.Tensor, PCA]:
    """Fit a k-dim PCA on rows 1..n of `llm_table` (n + 1, d_llm); the projected table (n + 1, k), row 0 zeros."""
    pca = PCA.fit(llm_table[1:].float(), k)
    table = pca.transform(llm_table.float()).float()
    table[0] = 0
    return table, pca


def gate_scale_for(counts: np.ndarray, tail_share: float = 0.8) -> float:
    """The training count at the tail/head boundary: the least popular head item's count (>= 1)."""
    c = np.sort(np.asarray(counts)[1:])
    return float(max(c[min(int(round(tail_share * len(c))), len(c) - 1)], 1))


def pca_size(cfg: RATConfig, d_llm: int, n_items: int) -> int:
    """The PCA size a method projects the LLM table to: the hidden size for LLM2X / "w/o adapter" (no adapter
    between table and backbone), else d_m (`RATConfig.resolve_d_m`)."""
    if cfg.method in ("LLM2X", "LLMEmb w/o adapter"):
        return cfg.srs.hidden
    return cfg.resolve_d_m(d_llm, n_items)


def _projected(llm_table: torch.Tensor, k: int, pca: PCA | None) -> tuple[torch.Tensor, PCA]:
    """`pca_table(llm_table, k)`, or the table through an already fitted `pca` (which must be k x d_llm)."""
    if pca is None:
        return pca_table(llm_table, k)
    if (pca.k, pca.d) != (k, llm_table.shape[1]):
        raise ValueError(f"the fitted PCA is {pca.k} x {pca.d}, the method needs {k} x {llm_table.shape[1]}")
    table = pca.transform(llm_table.float()).float()
    table[0] = 0
    return table, pca


def build_item_encoder(
    cfg: RATConfig, data: PreparedDataset, llm_table: torch.Tensor | None, pca: PCA | None = None
) -> tuple[ItemEncoder, PCA | None]:
    """The method's item encoder (dim = cfg.srs.hidden) and the PCA it was built on (None for "None").

    pca: a PCA already fitted on `llm_table` (the pipeline's PCA stage); None fits one here (`pca_table`).
    """
    n, hidden = data.n_items, cfg.srs.hidden
    if not cfg.uses_llm:
        return IDEncoder(n, hidden), None
    if llm_table is None:
        raise ValueError(f"method {cfg.method!r} needs an LLM table")
    if llm_table.ndim != 2 or llm_table.shape[0] != n + 1:
        raise ValueError(
            f"llm_table must be (n_items + 1, d_llm) = ({n + 1}, d), got {tuple(llm_table.shape)}"
        )
    d_llm = llm_table.shape[1]

    if cfg.method in ("LLM2X", "LLMEmb w/o adapter"):
        if hidden > d_llm:
            raise ValueError(f"{cfg.method} projects d_llm={d_llm} to hidden={hidden}: needs hidden <= d_llm")
        table, pca = _projected(llm_table, hidden, pca)
        enc = IDEncoder(n, hidden, init=table) if cfg.method == "LLM2X" else FrozenTableEncoder(table)
        return enc, pca

    d_m = cfg.resolve_d_m(d_llm, n)
    table, pca = _projected(llm_table, d_m, pca)
    adapter = AdapterConfig(d_in=d_m, d_out=hidden, dropout=cfg.adapter_dropout)  # d_hidden = d_m // 2
    if cfg.method in EXTRA_METHODS:
        if cfg.residual_pca_init and hidden > d_llm:
            raise ValueError(
                f"residual_pca_init projects d_llm={d_llm} to hidden={hidden}: needs hidden <= d_llm"
            )
        counts = torch.from_numpy(data.item_popularity())
        if cfg.method == "LLMEmb+ID":
            gate = GateConfig(kind="none")
        else:
            scale = cfg.gate_scale or gate_scale_for(data.item_popularity())
            gate = GateConfig(kind=cfg.gate, scale=scale, learnable=cfg.gate_learnable)
        enc: ItemEncoder = ResidualAdaptedEncoder(
            table,
            adapter,
            PopularityGate(counts, gate),
            init_std=cfg.residual_init_std,
            init=pca_table(llm_table, hidden)[0] if cfg.residual_pca_init else None,
            dropout=cfg.residual_dropout,
        )
        return enc, pca
    return AdaptedTableEncoder(table, adapter, trainable_table=cfg.method == "LLMEmb w/o freeze"), pca


# ---- the alignment term (Eq. 7) as srs.main's aux loss ------------------------------------------------------------
ITEMS_KEY = "align_items"  # the batch key RATAuxLoss.prepare fills with batch_items, on the host


def batch_items(batch: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """Distinct real item ids (sorted) of a training batch's sequences: "seq", "pos" / "labels"; no padding,
    no [mask] token, no sampled negatives."""
    parts = [batch[k].reshape(-1) for k in ("seq", "pos", "labels") if k in batch]
    ids = torch.unique(torch.cat(parts))
    return ids[(ids > 0) & (ids <= n_items)]


def semantic_vectors(encoder: ItemEncoder, ids: torch.Tensor) -> torch.Tensor:
    """The vectors RAT aligns: the adapter output (`semantic`) where the encoder has an ID residual, else e_i."""
    return encoder.semantic(ids) if hasattr(encoder, "semantic") else encoder(ids)


class RATAuxLoss:
    """alpha * L_align(e, ẽ) [+ residual_l2 * mean |g r|^2], over a batch's distinct items; srs.main's aux_loss."""

    def __init__(self, cfg: RATConfig, n_items: int, id_table: torch.Tensor | None) -> None:
        self.cfg, self.n_items, self.alpha = cfg, n_items, cfg.effective_alpha
        self.id_table = None if id_table is None else id_table.detach().float()
        # The components of the latest call (detached 0-dim tensors: reading them is the caller's sync).
        self.last: dict[str, torch.Tensor] = {}

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The host batch plus its distinct item ids (srs.main calls this before moving the batch to the device:
        `torch.unique` there would wait for the device on every step)."""
        return {**batch, ITEMS_KEY: batch_items(batch, self.n_items)}

    def __call__(self, model: SRSBackbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        enc = model.item_encoder
        # (S,) distinct: computed by prepare() on the host where srs.main called it
        ids = batch[ITEMS_KEY] if ITEMS_KEY in batch else batch_items(batch, self.n_items)
        total = torch.zeros((), device=ids.device)
        if self.alpha > 0:
            if self.id_table.device != ids.device:
                self.id_table = self.id_table.to(ids.device)
            e = semantic_vectors(enc, ids)  # (S, H), with gradient to the adapter
            target = self.id_table[ids]  # (S, H), a fixed target
            align = info_nce(
                e, target, self.cfg.gamma, form=self.cfg.align_form, normalize=self.cfg.align_normalize
            )
            self.last["align"] = align.detach()
            total = total + self.alpha * align
        if self.cfg.residual_l2 > 0 and isinstance(enc, ResidualAdaptedEncoder):
            r = enc.residual(ids) * enc.gate(ids).unsqueeze(-1)  # (S, H)
            l2 = r.pow(2).sum(-1).mean()
            self.last["residual_l2"] = l2.detach()
            total = total + self.cfg.residual_l2 * l2
        return total

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.cfg.residual_l2 > 0


# ---- the job ------------------------------------------------------------------------------------------------------
def main(
    cfg: RATConfig,
    data: PreparedDataset,
    llm_table: torch.Tensor | None,
    id_table: torch.Tensor | None = None,
    pca: PCA | None = None,
) -> RATResult:
    """Train cfg.method on `data`; returns the best-validation model (training/srs.main's result + the PCA).

    llm_table: (n_items + 1, d_llm), row 0 padding (a file of training/embed.py: `load_table(path)`); unused for
        "None". id_table: (n_items + 1, hidden), the trained ID-SASRec item table (`load_id_table`), the fixed
        alignment target; needed when cfg.effective_alpha > 0. pca: a PCA fitted on llm_table (of size
        `pca_size(cfg, d_llm, n_items)`) to use instead of fitting one.
    """
    seed_everything(cfg.srs.seed)  # the adapter / residual initialisation is part of the seeded run
    encoder, pca = build_item_encoder(cfg, data, llm_table, pca)
    aux = RATAuxLoss(cfg, data.n_items, id_table)
    if aux.alpha > 0:
        if id_table is None:
            raise ValueError(f"{cfg.method} with alpha={cfg.alpha} needs id_table (an ID-SASRec item table)")
        expected = (data.n_items + 1, cfg.srs.hidden)
        if tuple(id_table.shape) != expected:
            raise ValueError(
                f"id_table has shape {tuple(id_table.shape)}, expected {expected} "
                "(the ID model must share the dataset and the hidden size)"
            )
    res = srs_main(cfg.srs, data, encoder, aux_loss=aux if aux.active else None)
    return RATResult(**{f.name: getattr(res, f.name) for f in fields(TrainResult)}, pca=pca, rat_config=cfg)


# ---- loading and exporting ----------------------------------------------------------------------------------------
def load_id_table(ckpt_dir: str | Path) -> torch.Tensor:
    """The item table (n_items + 1, H) of a trained SRS checkpoint (e.g. runs/<ds>/sasrec/seed42): RAT's ẽ."""
    model, _ = load_checkpoint(ckpt_dir)
    with torch.no_grad():
        return model.item_table().detach().clone()


@torch.no_grad()
def final_item_table(model: SRSBackbone) -> torch.Tensor:
    """The cached SRS table (n_items + 1, H) the model scores with, materialised in eval mode (no dropout)."""
    enc = model.item_encoder
    was_training = enc.training
    enc.eval()
    try:
        return enc.table().detach().clone()
    finally:
        enc.train(was_training)


def method_slug(method: str) -> str:
    """A directory name for a method label: "LLMEmb w/o align" -> "llmemb-wo-align"."""
    return re.sub(r"[^a-z0-9]+", "-", method.lower().replace("w/o", "wo")).strip("-")


def save_rat(
    result: RATResult,
    path: str | Path,
    data: PreparedDataset | None = None,
    llm: str | None = None,
) -> Path:
    """Write a RAT run: the SRS checkpoint in inference form (`load_checkpoint` restores it, item table frozen),
    `pca.safetensors` (the fitted transform), `adapter.safetensors` (Eq. 6 weights, for new items) and `rat.json`.
    """
    path = Path(path)
    save_checkpoint(result.model, result.config, path, data=data)
    enc = result.model.item_encoder
    if result.pca is not None:
        result.pca.save(path / "pca.safetensors")
    adapter = getattr(enc, "adapter", None)
    if adapter is not None:
        c = adapter.config
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
        meta = {
            "d_in": str(c.d_in),
            "d_out": str(c.d_out),
            "d_hidden": str(c.d_hidden),
            "dropout": str(c.dropout),
        }
        atomic_write_bytes(path / "adapter.safetensors", st_save(tensors, metadata=meta))
    info: dict[str, Any] = {
        "method": result.rat_config.method if result.rat_config else None,
        "llm": llm,
        "rat_config": asdict(result.rat_config) if result.rat_config else None,
        "d_m": result.pca.k if result.pca is not None else None,
        "best_epoch": result.best_epoch,
        "best_val_N@10": result.best_val,
    }
    if isinstance(enc, ResidualAdaptedEncoder):
        norms = enc.residual_norms().cpu()
        info["gate"] = repr(enc.gate)
        info["mean_residual_norm"] = float(norms[1:].mean())
    atomic_write_text(path / "rat.json", json.dumps(info, indent=1))
    return path
