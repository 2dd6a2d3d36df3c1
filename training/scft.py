"""Supervised Contrastive Fine-Tuning (SCFT, paper stage 1): LoRA on the LLM, two RandomDrop views per item,
symmetric in-batch contrastive loss (Eq. 4-5) with a learnable, clamped temperature.

Recipe, top to bottom: items -> model + LoRA -> probe (before) -> optimiser + schedule -> [resume] -> loop
(views -> one forward of both views -> loss -> step -> checkpoint) -> probe (after) -> save adapter + scft.json.

    >>> from training.split import prepare
    >>> from training.scft import SCFTConfig, main
    >>> cfg = SCFTConfig(llm=LLMConfig(source="smollm2", max_length=48), batch_size=16, max_steps=30,
    ...                  out_dir="runs/scft-demo")                       # ~1.5 min on a 2-core CPU
    >>> lora_dir = main(cfg, prepare("ml-100k"))                          # runs/scft-demo/lora

Determinism. The batches are a pure function of (seed, micro-batch index): items are shuffled per epoch with
``default_rng([seed, epoch])``, views come from ``default_rng([seed, 1, m])`` and the torch RNG (LoRA / model
dropout) is re-seeded from ``(seed, m)`` before every micro-batch. A checkpoint therefore only needs the step
counter besides the weights and the optimiser / scheduler state, and ``resume=True`` replays exactly the batches an
uninterrupted run would have seen.

Output (``out_dir``): ``lora/`` (peft adapter dir), ``scft.json`` (config, fingerprint, steps, losses,
temperature, seconds, retrieval probe before / after), ``checkpoint-<step>/`` (``lora/``, ``trainer.safetensors``
with the temperature and optimiser tensors, ``trainer_state.json`` with everything else; no pickles). Every
directory is written to a temp dir and renamed. A finished run with the same fingerprint is not redone.

Micro-batches are independent contrastive problems: with ``grad_accum > 1`` the gradient is accumulated, but the
negatives of an item are still only the other items of its own micro-batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.contrastive import FORMS, Form, Temperature, info_nce
from models.io import atomic_write_text, fsync_dir, fsync_file
from models.llm import (
    LLMConfig,
    LLMEmbedder,
    LoraSettings,
    apply_lora,
    file_sha256,
    load_lora,
    locate_source,
    save_lora,
)
from models.prompts import PromptConfig, ViewConfig, make_views
from training.data.dataset import PreparedDataset
from training.embed import lora_sha256

log = logging.getLogger(__name__)

SCFT_JSON = "scft.json"
LORA_DIR = "lora"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Fields that do not change what is trained: they stay out of the fingerprint, so e.g. adding checkpoints to a
# run, or resuming it, still matches the finished result.
_RUN_ONLY = ("checkpoint_every", "keep_checkpoints", "out_dir", "resume", "log_every", "progress")


@dataclass(frozen=True)
class SCFTConfig:
    """What SCFT trains and how. A "step" is one optimiser step = ``grad_accum`` micro-batches of ``batch_size``
    items (2 x batch_size prompts: two views each)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    views: ViewConfig = field(default_factory=ViewConfig)
    instruction: str | None = None  # None: the dataset's own instruction (data.instruction)
    max_value_chars: int = 200
    batch_size: int = 32  # items per micro-batch; in-batch negatives = batch_size - 1
    grad_accum: int = 1
    lr: float = 2e-4  # LoRA; higher than full fine-tuning because only the low-rank matrices move
    temperature_lr: float | None = (
        1e-2  # None: lr. log-t needs a larger step than LoRA to move in a short run
    )
    weight_decay: float = 0.0  # on the LoRA matrices only; never on the temperature
    epochs: int = 1
    max_steps: int | None = None  # None: epochs x steps per epoch; else exactly this many (cycling epochs)
    warmup_ratio: float = 0.05  # linear warmup over this share of the steps, then `schedule` decay
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = 1.0
    temperature: float = 0.05  # initial value
    learn_temperature: bool = True
    temperature_min: float = 0.01  # the clamp: cosine logits stay within +-1/0.01 = +-100
    temperature_max: float = 1.0
    loss_form: Form = (
        "infonce"  # "paper" = Eq. 4 (positive not in the denominator; see models/contrastive.py)
    )
    normalize: bool = True  # cosine similarity; the paper's raw inner product makes both forms unbounded
    gradient_checkpointing: bool = (
        False  # trades ~30 % more compute for activation memory (long prompts on GPU)
    )
    checkpoint_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2  # newest kept; older ones are deleted after a new one is in place
    out_dir: str = "runs/scft"
    resume: bool = False  # continue from the newest checkpoint-<step> in out_dir
    seed: int = 42
    items: tuple[int, ...] | None = None  # internal ids to train on; None = the whole catalog 1..n
    probe_items: int = 256  # retrieval probe sample size; 0 = no probe
    probe_holdout: bool = (
        True  # probe items are left out of training (the probe then measures generalisation)
    )
    log_every: int = 10  # steps between history entries / tqdm postfix updates
    progress: bool = True

    def __post_init__(self) -> None:
        if self.items is not None:
            object.__setattr__(self, "items", tuple(int(i) for i in self.items))
            if not self.items:
                raise ValueError("items must be None (whole catalog) or non-empty")
        checks = [
            (self.max_value_chars >= 1, "max_value_chars must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (an item needs in-batch negatives)"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.temperature_lr is None or self.temperature_lr > 0, "temperature_lr must be None or > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be None or >= 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (
                self.schedule in ("cosine", "linear", "constant"),
                "schedule must be cosine, linear or constant",
            ),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be None or > 0"),
            (
                0 < self.temperature_min <= self.temperature <= self.temperature_max,
                "need 0 < temperature_min <= temperature <= temperature_max",
            ),
            (self.loss_form in FORMS, f"loss_form must be one of {FORMS}"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.probe_items == 0 or self.probe_items >= 2, "probe_items must be 0 (off) or >= 2"),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def prompt_config(self, data: PreparedDataset) -> PromptConfig:
        """The prompt settings SCFT uses; embed the catalog with the same ones."""
        instruction = self.instruction if self.instruction is not None else data.instruction
        return PromptConfig(instruction=instruction, max_value_chars=self.max_value_chars)


def fingerprint(cfg: SCFTConfig, data: PreparedDataset) -> str:
    """sha256 of everything that determines the trained adapter: config (minus run-only fields), data, base LM."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RUN_ONLY}
    source = locate_source(cfg.llm.source)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(
        file_sha256(source, cfg.llm.cache_dir).encode() if source.is_file() else str(source).encode()
    )
    data_key = [data.name, data.item_ids, data.attributes, data.instruction]
    digest.update(json.dumps(data_key, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()


def split_items(cfg: SCFTConfig, data: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(training item ids, probe item ids), int64; the probe sample is drawn with ``default_rng([seed, 5])``."""
    items = np.arange(1, data.n_items + 1) if cfg.items is None else np.asarray(cfg.items, dtype=np.int64)
    if items.min() < 1 or items.max() > data.n_items:
        raise ValueError(f"items must be internal ids in 1..{data.n_items}")
    items = np.unique(items)
    n_probe = min(cfg.probe_items, len(items))
    probe = np.sort(np.random.default_rng([cfg.seed, 5]).choice(items, size=n_probe, replace=False))
    train = np.setdiff1d(items, probe) if cfg.probe_holdout else items
    if len(train) < 2:
        raise ValueError(f"only {len(train)} training items left after holding out {n_probe} probe items")
    return train.astype(np.int64), probe.astype(np.int64)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based): linear warmup, then decay to ~0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class _Batches:
    """Micro-batch m -> item ids; a pure function of (seed, m). Epochs reshuffle; a remainder is dropped (a
    smaller last batch would be an easier contrastive problem and would change with the catalog size)."""

    def __init__(self, train: np.ndarray, batch_size: int, seed: int) -> None:
        self.train, self.seed = train, seed
        self.size = min(batch_size, len(train))
        self.per_epoch = len(train) // self.size
        self._epoch, self._order = -1, train

    def __call__(self, m: int) -> np.ndarray:
        epoch, index = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.train),
            )
        return self._order[index * self.size : (index + 1) * self.size]


def _views(
    data: PreparedDataset, ids: np.ndarray, cfg: SCFTConfig, prompt: PromptConfig, rng
) -> tuple[list[str], list[str]]:
    pairs = [make_views(data.attributes[int(i)], cfg.views, rng, prompt) for i in ids]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def retrieval_probe(
    embedder: LLMEmbedder, views1: list[str], views2: list[str], normalize: bool = True, batch_size: int = 32
) -> dict[str, float]:
    """Top-1 accuracy and MRR of finding an item's view 2 among the sample's view 2s from its view 1 (and back),
    averaged over both directions. Ties count against the item (identical texts, e.g. two items whose views both
    kept only "year is 1996; genres is Drama", are not distinguishable), so before/after compare fairly."""
    e1 = embedder.embed(views1, batch_size=batch_size)
    e2 = embedder.embed(views2, batch_size=batch_size)
    if normalize:
        e1, e2 = F.normalize(e1, dim=-1), F.normalize(e2, dim=-1)
    top1, mrr = [], []
    for sim in (e1 @ e2.T, e2 @ e1.T):  # (P, P)
        positive = sim.diagonal().unsqueeze(1)
        rank = (sim >= positive - 1e-6).sum(dim=1).float()  # 1 + others scoring at least as high
        top1.append((rank == 1).float().mean().item())
        mrr.append(rank.reciprocal().mean().item())
    return {"top1": sum(top1) / 2, "mrr": sum(mrr) / 2, "n": len(views1)}


def _seed_torch(seed: int, m: int) -> None:
    torch.manual_seed(int(np.random.default_rng([seed, 3, m]).integers(2**62)))


# ---- checkpoints: safetensors + JSON, written to a temp dir and renamed --------------------------------------
def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp dir onto ``target`` (an old ``target`` is moved aside first, then deleted)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _temp_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the published dir should read like any other
    return tmp


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (for safetensors) and JSON (everything else)."""
    sd = opt.state_dict()
    tensors, other = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, extra in meta["state"].items():
        state.setdefault(int(index), {}).update(extra)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save_checkpoint(
    out: Path, step: int, keep: int, model, temp: Temperature, opt, sched, state: dict
) -> None:
    tmp = _temp_dir(out, f"checkpoint-{step}")
    try:
        save_lora(model, tmp / LORA_DIR)
        tensors, opt_meta = _optimizer_state(opt)
        tensors["temperature.log_t"] = temp.log_t.detach().cpu().reshape(())
        save_file(tensors, str(tmp / TRAINER_TENSORS), metadata={"format": "llmemb.scft.trainer"})
        doc = {**state, "step": step, "optimizer": opt_meta, "scheduler": sched.state_dict()}
        (tmp / TRAINER_STATE).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        _publish(tmp, out / f"checkpoint-{step}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint dirs (temp dirs are hidden), oldest first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _load_checkpoint(path: Path, key: str, model, temp: Temperature, opt, sched) -> dict:
    from peft import set_peft_model_state_dict

    state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    if state["fingerprint"] != key:
        raise ValueError(f"{path} was written by a different config or dataset; refusing to resume")
    result = set_peft_model_state_dict(model, load_file(str(path / LORA_DIR / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: adapter has unexpected keys {result.unexpected_keys[:5]}")
    tensors = load_file(str(path / TRAINER_TENSORS))
    with torch.no_grad():
        temp.log_t.copy_(tensors["temperature.log_t"])
    _load_optimizer_state(opt, tensors, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state


# ---- the recipe -----------------------------------------------------------------------------------------------
def main(cfg: SCFTConfig, data: PreparedDataset, embedder: LLMEmbedder | None = None) -> Path:
    """Run SCFT and return the saved adapter dir (``out_dir/lora``).

    ``embedder``: an already loaded ``LLMEmbedder(cfg.llm)`` to fine-tune in place. On return its ``model`` is
    the peft model carrying the trained adapter (unmerged, eval mode) and ``embedder.lora_sha256`` names the saved
    adapter, so ``merge_lora`` + ``training.embed.embed_catalog`` can follow without a reload. None loads one.
    A finished run with the same fingerprint returns at once (attaching its saved adapter to ``embedder``).
    """
    out = Path(cfg.out_dir)
    key = fingerprint(cfg, data)
    done = _finished(out, key)
    if done is not None:
        log.info("SCFT already done in %s (same fingerprint); skipping", out)
        if embedder is not None:
            embedder.model = load_lora(embedder.model, done).eval()
            embedder.lora_sha256 = lora_sha256(done)
        return done
    prompt = cfg.prompt_config(data)
    train, probe_ids = split_items(cfg, data)
    batches = _Batches(train, cfg.batch_size, cfg.seed)
    steps_per_epoch = max(1, batches.per_epoch // cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = math.ceil(cfg.warmup_ratio * total)

    # model: base LM frozen, LoRA trainable
    if embedder is None:
        embedder = LLMEmbedder(cfg.llm)
    elif embedder.cfg != cfg.llm:
        raise ValueError("embedder was built from a different LLMConfig than cfg.llm")
    torch.manual_seed(cfg.seed)  # LoRA A init
    model = apply_lora(embedder.model, cfg.lora)
    embedder.model = model
    if cfg.gradient_checkpointing:
        base = model.get_base_model()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    device = embedder.device
    temp = Temperature(cfg.temperature, cfg.temperature_min, cfg.temperature_max, cfg.learn_temperature)
    temp = temp.to(device)

    # probe views are fixed once, from their own rng, so before and after see the same texts
    probe_views = _views(data, probe_ids, cfg, prompt, np.random.default_rng([cfg.seed, 11]))
    probe_before = None

    lora_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": lora_params, "weight_decay": cfg.weight_decay}]
    if cfg.learn_temperature:
        groups.append({"params": [temp.log_t], "weight_decay": 0.0, "lr": cfg.temperature_lr or cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    trainable = lora_params + ([temp.log_t] if cfg.learn_temperature else [])

    step, history, window, seconds = 0, [], [], 0.0
    if cfg.resume and (ckpts := _checkpoints(out)):
        state = _load_checkpoint(ckpts[-1], key, model, temp, opt, sched)
        step, history, window, seconds = state["step"], state["history"], state["window"], state["seconds"]
        probe_before = state["probe_before"]
        log.info("resumed from %s (step %d / %d)", ckpts[-1], step, total)
    if probe_before is None and len(probe_ids):
        probe_before = retrieval_probe(embedder, *probe_views, cfg.normalize)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    model.train()
    bar = tqdm(total=total, initial=step, desc="scft", unit="step", disable=not cfg.progress)
    start = time.perf_counter() - seconds
    while step < total:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            ids = batches(m)
            view1, view2 = _views(data, ids, cfg, prompt, np.random.default_rng([cfg.seed, 1, m]))
            _seed_torch(cfg.seed, m)
            enc = embedder.encode(view1 + view2)  # both views in one right-padded batch: (2B, T)
            with autocast:
                pooled = embedder.forward_pooled(enc)  # (2B, d) fp32
            loss = info_nce(pooled[: len(ids)], pooled[len(ids) :], temp(), cfg.loss_form, cfg.normalize)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        lr = sched.get_last_lr()[0]  # the lr this step used
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        temp.clamp_()
        step += 1
        loss_value = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"SCFT loss is {loss_value} at step {step}")
        window.append(loss_value)
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            entry = {"step": step, "loss": sum(window) / len(window), "temperature": temp().item()}
            entry["lr"] = lr
            history.append(entry)
            window = []
            bar.set_postfix(loss=f"{entry['loss']:.4f}", t=f"{entry['temperature']:.4f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            seconds = time.perf_counter() - start
            state = {"fingerprint": key, "history": history, "window": window, "seconds": seconds}
            state["probe_before"] = probe_before
            _save_checkpoint(out, step, cfg.keep_checkpoints, model, temp, opt, sched, state)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()

    probe_after = retrieval_probe(embedder, *probe_views, cfg.normalize) if len(probe_ids) else None
    summary = {
        "fingerprint": key,
        "config": dataclasses.asdict(cfg),
        "data": {
            "name": data.name,
            "n_items": data.n_items,
            "n_train": len(train),
            "n_probe": len(probe_ids),
        },
        "base_model": {"source": cfg.llm.source, "source_sha256": embedder.source_sha256},
        "steps": total,
        "micro_batch_items": batches.size,
        "final_loss": history[-1]["loss"] if history else None,
        "temperature": temp().item(),
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, total),
        "probe": {"before": probe_before, "after": probe_after},
        "history": history,
        "lora_dir": LORA_DIR,
    }
    tmp = _temp_dir(out, LORA_DIR)
    try:
        save_lora(model, tmp)
        _publish(tmp, out / LORA_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / SCFT_JSON, json.dumps(summary, indent=1, default=str) + "\n")
    embedder.lora_sha256 = lora_sha256(
        out / LORA_DIR
    )  # the table metadata names the adapter (training/embed.py)
    if probe_after is not None:
        message = (
            f"SCFT probe ({len(probe_ids)} held-out items, view 1 -> view 2): top-1 "
            f"{probe_before['top1']:.3f} -> {probe_after['top1']:.3f}, MRR {probe_before['mrr']:.3f} -> "
            f"{probe_after['mrr']:.3f}; {total} steps in {seconds:.0f} s, temperature {temp().item():.4f}"
        )
        if cfg.progress:
            tqdm.write(message)
        else:
            log.info(message)
    return out / LORA_DIR


def _finished(out: Path, key: str) -> Path | None:
    try:
        summary = json.loads((out / SCFT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lora = out / LORA_DIR
    if summary.get("fingerprint") == key and (lora / "adapter_model.safetensors").is_file():
        return lora
    return None
