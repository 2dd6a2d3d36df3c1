"""Train an SRS backbone (SASRec, GRU4Rec, Bert4Rec) on a prepared dataset, early-stopped on validation N@10.

The recipe, top to bottom: seed -> training examples -> model -> Adam -> epochs of (shuffled batches, padded
only to their own longest row) -> validation N@10 each `eval_every` epochs -> keep the best weights -> restore
them -> evaluate on test.

Objectives (each backbone class names its own in `objective`):
  "next"  (SASRec, GRU4Rec): a user's training sequence s = seq[:-2] gives input s[:-1] and targets s[1:]
          (most recent max_len); one negative per position, uniform over items the user never interacted with.
  "cloze" (Bert4Rec): each epoch sees every training sequence twice — once with items masked at random
          (probability mask_prob, at least one per sequence) and once with only its last item masked, the form
          used at inference (the reference trains on both views).

Tiny CPU run:

    >>> from training.split import prepare
    >>> from training.srs import SRSTrainConfig, main, save_checkpoint, load_checkpoint
    >>> data = prepare("ml-100k")
    >>> res = main(SRSTrainConfig(backbone="sasrec", max_epochs=3, hidden=32, device="cpu"), data)
    >>> res.test["full"]["overall"]["N@10"], res.seconds_per_epoch
    >>> save_checkpoint(res.model, res.config, "runs/demo", data=data)
    >>> model, cfg = load_checkpoint("runs/demo")
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.srs import (
    BACKBONES,
    FrozenTableEncoder,
    IDEncoder,
    ItemEncoder,
    SRSBackbone,
    SRSConfig,
    flat_targets,
    pad_left,
)
from training.data.dataset import PreparedDataset

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class SRSTrainConfig:
    """Everything one training run needs besides the data. Defaults follow the LLMEmb reference code."""

    backbone: str = "sasrec"  # "sasrec" | "gru4rec" | "bert4rec"
    seed: int = 42
    dataset: str = "ml-100k"  # only used when main() is not handed a PreparedDataset
    lr: float = 1e-3
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20  # epochs without a better validation N@10 before stopping
    eval_every: int = 1
    weight_decay: float = 0.0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    val_protocol: str = "full"  # early-stopping metric's protocol: full ranking is cheap on these catalogs
    # backbone (SRSConfig) fields
    hidden: int = 128
    n_layers: int = 2
    n_heads: int = 1
    dropout: float = 0.5  # high, as in the reference: ml-100k / Beauty overfit within a few epochs without it
    max_len: int = 200
    # Bert4Rec only. The BERT4Rec paper tunes 0.2 on MovieLens; the LLMEmb reference defaults to 0.6.
    mask_prob: float = 0.2
    # next-item loss of SASRec / GRU4Rec: "bce" (one sampled negative, the reference) | "ce" (catalog softmax)
    loss: str = "bce"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, not {self.backbone!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")
        for name in ("batch_size", "max_epochs", "patience", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1 or None")
        if self.val_protocol not in ("full", "sampled100"):
            raise ValueError("val_protocol must be 'full' or 'sampled100'")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError("mask_prob must be in (0, 1)")
        if self.backbone == "bert4rec" and self.max_len < 2:
            raise ValueError("bert4rec needs max_len >= 2 (history + the appended [mask])")
        if self.device != "auto":
            torch.device(self.device)  # raises on a malformed device string
        self.srs_config(1)  # validates hidden / heads / dropout / max_len

    def srs_config(self, n_items: int) -> SRSConfig:
        return SRSConfig(
            n_items=n_items,
            hidden=self.hidden,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            dropout=self.dropout,
            max_len=self.max_len,
            loss=self.loss,
        )


@dataclass
class TrainResult:
    model: SRSBackbone  # best-validation weights, eval mode
    config: SRSTrainConfig
    best_epoch: int
    best_val: float  # validation N@10 at best_epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # {epoch, loss, seconds, val_N@10}
    test: dict[str, Any] = field(default_factory=dict)  # Evaluator.evaluate(model, "test")
    seconds_per_epoch: float = 0.0  # training loop only, evaluation excluded


# ---- setup ----------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- training batches -----------------------------------------------------------------------------------------
def seen_keys(sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Sorted unique keys user * (n_items + 1) + item over each user's full sequence: a flat "seen" set."""
    if not sequences:
        return np.zeros(0, dtype=np.int64)
    users = np.repeat(np.arange(len(sequences), dtype=np.int64), [len(s) for s in sequences])
    return np.unique(users * (n_items + 1) + np.concatenate(sequences).astype(np.int64))


def sample_negatives(
    keys: np.ndarray, users: np.ndarray, n_items: int, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """(B, L) item ids uniform over 1..n_items, each outside its row's user's seen set (rejection sampling).

    A user who has seen (almost) every item cannot be satisfied; after 100 rounds the leftovers are kept.
    """
    base = users.astype(np.int64)[:, None] * (n_items + 1)  # (B, 1)
    neg = rng.integers(1, n_items + 1, size=shape)
    if keys.size == 0:
        return neg
    for _ in range(100):
        k = base + neg
        hit = keys[np.minimum(np.searchsorted(keys, k), keys.size - 1)] == k
        if not hit.any():
            break
        neg[hit] = rng.integers(1, n_items + 1, size=int(hit.sum()))
    return neg


def next_item_batch(
    windows: Sequence[np.ndarray],
    users: np.ndarray,
    keys: np.ndarray,
    n_items: int,
    max_len: int,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Windows (each the most recent <= max_len + 1 training items of a user) -> seq / pos / neg, (B, L).

    L is the longest window in this batch minus one, not max_len: padding costs compute in every layer.
    """
    seq = pad_left([w[:-1] for w in windows], max_len)
    pos = pad_left([w[1:] for w in windows], max_len)
    neg = sample_negatives(keys, users, n_items, tuple(pos.shape), rng)
    neg = torch.from_numpy(neg) * (pos > 0)
    return {"seq": seq, "pos": pos, "neg": neg, "tgt": flat_targets(pos > 0)}


def cloze_batch(
    seqs: Sequence[np.ndarray],
    last_only: np.ndarray,
    n_items: int,
    mask_prob: float,
    max_len: int,
    rng: np.random.Generator,
) -> dict[str, torch.Tensor]:
    """Sequences -> seq (with [mask] = n_items + 1 at masked positions) / labels (original id there, else 0).

    Rows with last_only[b] mask exactly their last item; the others mask each item with prob mask_prob,
    at least one per row.
    """
    tokens = pad_left(seqs, max_len).numpy()  # (B, L)
    b, length = tokens.shape
    valid = tokens > 0
    masked = (rng.random((b, length)) < mask_prob) & valid
    n = valid.sum(1)
    empty = ~masked.any(1) & (n > 0)
    pick = length - 1 - (rng.random(b) * n).astype(np.int64)  # a uniform real column per row
    masked[empty, pick[empty]] = True
    masked[last_only] = False
    masked[last_only, length - 1] = valid[last_only, length - 1]
    labels = torch.from_numpy(np.where(masked, tokens, 0))
    tokens = np.where(masked, n_items + 1, tokens)
    return {"seq": torch.from_numpy(tokens), "labels": labels, "tgt": flat_targets(labels > 0)}


class TrainBatches:
    """One epoch of shuffled training batches for a backbone objective; the RNG advances every epoch."""

    def __init__(self, data: PreparedDataset, objective: str, cfg: SRSTrainConfig, rng: np.random.Generator):
        self.objective, self.cfg, self.rng, self.n_items = objective, cfg, rng, data.n_items
        train = data.train_sequences()
        if objective == "next":
            self.users = np.array([u for u, s in enumerate(train) if len(s) >= 2], dtype=np.int64)
            self.rows = [train[u][-(cfg.max_len + 1) :] for u in self.users]
            self.keys = seen_keys(data.sequences, data.n_items)
            self.size = len(self.rows)
        elif objective == "cloze":
            self.rows = [s[-cfg.max_len :] for s in train if len(s) >= 1]
            self.size = 2 * len(self.rows)  # random-mask view + last-item view of every sequence
        else:
            raise ValueError(f"unknown objective {objective!r}")
        if not self.size:
            raise ValueError("no training sequences")

    def __len__(self) -> int:
        return -(-self.size // self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.rng.permutation(self.size)
        for start in range(0, self.size, self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            if self.objective == "next":
                yield next_item_batch(
                    [self.rows[i] for i in idx],
                    self.users[idx],
                    self.keys,
                    self.n_items,
                    self.cfg.max_len,
                    self.rng,
                )
            else:
                rows = [self.rows[i % len(self.rows)] for i in idx]
                yield cloze_batch(
                    rows, idx >= len(self.rows), self.n_items, self.cfg.mask_prob, self.cfg.max_len, self.rng
                )


# ---- the job --------------------------------------------------------------------------------------------------
AuxLoss = Callable[[SRSBackbone, dict[str, torch.Tensor]], torch.Tensor]
# An aux loss may also have `prepare(batch) -> batch`, called on the host batch before it moves to the device
# (e.g. RAT's distinct item ids, computed there so that the step needs no device-to-host sync).


def main(
    cfg: SRSTrainConfig,
    data: PreparedDataset | None = None,
    item_encoder: ItemEncoder | None = None,
    aux_loss: AuxLoss | None = None,
) -> TrainResult:
    """Train cfg.backbone on `data` (default: training.split.prepare(cfg.dataset)); returns the best model.

    item_encoder: None -> a fresh trainable ID table; or e.g. IDEncoder(init=PCA'd LLM table) (LLM2X), or a
    FrozenTableEncoder, or the RAT encoders (frozen table + adapter, see training/rat.py).
    aux_loss: optional (model, batch on device) -> scalar added to the backbone's loss at every step (RAT's
    alpha * L_align, Eq. 8). Its mean per epoch is logged in `history` as "aux"; "loss" is the total.
    """
    from training.evaluate import EvalConfig, Evaluator

    if data is None:
        from training.split import prepare

        data = prepare(cfg.dataset)
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)

    model = BACKBONES[cfg.backbone](cfg.srs_config(data.n_items), item_encoder).to(device)
    batches = TrainBatches(data, model.objective, cfg, rng)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    evaluator = Evaluator(data, cfg.seed, EvalConfig())

    history: list[dict[str, Any]] = []
    best_val, best_epoch, best_state = float("-inf"), 0, None
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=f"{cfg.backbone} {data.name}", unit="epoch", disable=None)
    prepare = getattr(aux_loss, "prepare", None)
    pin = device.type == "cuda"
    for epoch in bar:
        model.train()
        t0, count = time.perf_counter(), 0
        # Running sums stay on the device: a per-step .item() would stall the host on every step.
        total = torch.zeros((), dtype=torch.float64, device=device)
        aux_total = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            if prepare is not None:
                batch = prepare(batch)
            batch = {
                k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()
            }
            loss = model.loss(batch)
            if aux_loss is not None:
                aux = aux_loss(model, batch)
                loss = loss + aux
                aux_total += aux.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(total) / count,  # waits for the epoch's last step
            "seconds": time.perf_counter() - t0,
            "val_N@10": None,
        }
        if aux_loss is not None:
            row["aux"] = float(aux_total) / count
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
            row["val_N@10"] = val = _validate(model, evaluator, cfg.val_protocol)
            if val > best_val:
                best_val, best_epoch = val, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(row)
        val_text = "-" if row["val_N@10"] is None else f"{row['val_N@10']:.4f}"
        bar.set_postfix(loss=f"{row['loss']:.4f}", val=val_text, best=f"{best_val:.4f}")
        if epoch - best_epoch >= cfg.patience:
            break
    bar.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        test = evaluator.evaluate(model, "test")
    return TrainResult(
        model=model,
        config=cfg,
        best_epoch=best_epoch,
        best_val=best_val,
        history=history,
        test=test,
        seconds_per_epoch=float(np.mean([h["seconds"] for h in history])),
    )


def _validate(model: SRSBackbone, evaluator: Any, protocol: str) -> float:
    model.eval()
    with torch.no_grad():
        result = evaluator.evaluate(model, "valid", protocols=(protocol,))
    model.train()
    return float(result[protocol]["overall"]["N@10"])


# ---- checkpoints: safetensors + JSON, no pickles --------------------------------------------------------------
def save_checkpoint(
    model: SRSBackbone, cfg: SRSTrainConfig, path: str | Path, data: PreparedDataset | None = None
) -> Path:
    """Write `path/model.safetensors` and `path/config.json` (each atomically); returns `path`.

    An item encoder that is neither an ID table nor a frozen table but has `to_frozen()` (the RAT encoders:
    frozen LLM table + adapter, + ID residual) is saved in its inference form (method step 7): its table is
    precomputed and stored as a frozen table, so `load_checkpoint` gives a model with exactly the same scores.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    trained_encoder = type(model.item_encoder).__name__
    if isinstance(model.item_encoder, FrozenTableEncoder):
        encoder = "frozen"
    elif isinstance(model.item_encoder, IDEncoder):
        encoder = "id"
    elif hasattr(model.item_encoder, "to_frozen"):
        encoder = "frozen"
        state = {k: v for k, v in state.items() if not k.startswith("item_encoder.")}
        state["item_encoder.weight"] = model.item_encoder.to_frozen().weight
    else:
        raise TypeError(f"cannot checkpoint item encoder {trained_encoder}")
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "backbone": cfg.backbone,
        "item_encoder": encoder,
        "trained_item_encoder": trained_encoder,
        "item_dim": model.item_encoder.dim,
        "srs_config": asdict(model.config),
        "train_config": asdict(cfg),
    }
    if data is not None:
        meta["dataset"] = {"name": data.name, "n_items": data.n_items, "n_users": data.n_users}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": str(CHECKPOINT_FORMAT)})
    os.replace(tmp, path / "model.safetensors")
    tmp = path / ".config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, path / "config.json")
    return path


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[SRSBackbone, SRSTrainConfig]:
    """Rebuild the backbone written by `save_checkpoint` (eval mode, on `device`) and its training config."""
    path = Path(path)
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint format {meta.get('format')!r}, this code reads {CHECKPOINT_FORMAT}"
        )
    srs = SRSConfig(**meta["srs_config"])
    cfg = SRSTrainConfig(**meta["train_config"])
    if meta["item_encoder"] == "frozen":
        encoder: ItemEncoder = FrozenTableEncoder(torch.zeros(srs.n_items + 1, meta["item_dim"]))
    else:
        encoder = IDEncoder(srs.n_items, meta["item_dim"])
    model = BACKBONES[meta["backbone"]](srs, encoder)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(resolve_device(device)).eval(), cfg
