"""Catalog embedding (paper step 3): every item's prompt through the (SCFT-tuned) LLM -> the ``llm`` table.

The table is a safetensors file, tensor ``weight`` of shape (n_items + 1, d) float32, row 0 = zeros (padding), so
row i is internal item id i. Its string metadata records what produced it: base model sha256, LoRA adapter sha256
(or "none"), sha256 of the prompts, max_length, dtype, pooling (+ any caller extras). A later call whose inputs give
the same metadata reuses the file instead of recomputing it (the pipeline skips stages whose outputs exist for the
same config).

    >>> from training.embed import catalog_prompts, embed_catalog, load_embedder
    >>> emb = load_embedder(LLMConfig(source="smollm2"), Path("runs/scft/lora"))       # LoRA merged for speed
    >>> table = embed_catalog(emb, catalog_prompts(data, scft_cfg.prompt_config(data)), Path("runs/llm.safetensors"))
    >>> table.shape                                                                      # (1350, 576) for ml-100k
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.io import TABLE_KEY, fsync_dir, fsync_file, sha256_file, tmp_path_for
from models.llm import LLMConfig, LLMEmbedder, file_sha256, load_lora, locate_source, merge_lora
from models.prompts import PromptConfig, build_prompt
from training.data.dataset import PreparedDataset

log = logging.getLogger(__name__)

FORMAT = "llmemb.table"
FORMAT_VERSION = "1"
PROMPT_META = "prompt_config"  # table metadata key: the PromptConfig (JSON) the prompts were built with
# Files of a model dir that decide its outputs (weights, architecture, tokenisation), hashed for the metadata.
_MODEL_FILES = (
    "*.safetensors",
    "*.bin",
    "config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens*",
)
_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
_INFORMATIONAL = ("seconds", "created")  # metadata that does not take part in the skip-if-exists match


def catalog_prompts(data: PreparedDataset, prompt_cfg: PromptConfig) -> list[str]:
    """Prompts of items 1..n_items, in internal id order (row i - 1 is item i)."""
    return [build_prompt(data.attributes[i], prompt_cfg) for i in range(1, data.n_items + 1)]


def lora_sha256(lora_dir: str | os.PathLike) -> str:
    """sha256 over a peft adapter dir's config and weights (not its README)."""
    lora_dir = Path(lora_dir)
    digest = hashlib.sha256()
    for name in _LORA_FILES:
        digest.update(f"{name}:{sha256_file(lora_dir / name)}\n".encode())
    return digest.hexdigest()


def load_embedder(
    llm_cfg: LLMConfig, lora_dir: str | os.PathLike | None = None, merge: bool = True
) -> LLMEmbedder:
    """The base LM with a saved SCFT adapter attached (and merged into the weights when ``merge``), in eval mode.

    The adapter's sha256 is recorded as ``embedder.lora_sha256`` for the table metadata (``embed_catalog``).
    """
    embedder = LLMEmbedder(llm_cfg)
    embedder.lora_sha256 = "none"
    if lora_dir is not None:
        model = load_lora(embedder.model, lora_dir)
        embedder.model = (merge_lora(model) if merge else model).eval()
        embedder.lora_sha256 = lora_sha256(lora_dir)
    return embedder


def model_sha256(embedder: LLMEmbedder) -> str:
    """The base model's identity: the GGUF file's sha256, or a sha256 over a model dir's weight/config/tokenizer
    files (each file's digest is cached by path, size and mtime, so a 7B checkout is hashed once)."""
    if embedder.source_sha256:
        return embedder.source_sha256
    return model_dir_sha256(embedder.model_dir, embedder.cfg.cache_dir)


def model_dir_sha256(model_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 over a model dir's weight, config and tokenizer files (per-file digests cached)."""
    files = sorted({p for pattern in _MODEL_FILES for p in Path(model_dir).glob(pattern) if p.is_file()})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path, cache_dir)}\n".encode())
    return digest.hexdigest()


def source_sha256(llm_cfg: LLMConfig) -> str:
    """What ``model_sha256`` gives for an embedder of ``llm_cfg``, without loading the model: the GGUF file's
    sha256 (shipped SmolLM2, any .gguf), else the digest of the model dir."""
    path = locate_source(llm_cfg.source)
    if path.is_file():
        return file_sha256(path, llm_cfg.cache_dir)
    return model_dir_sha256(path, llm_cfg.cache_dir)


def _adapter_sha256(embedder: LLMEmbedder) -> str:
    recorded = getattr(embedder, "lora_sha256", None)
    if recorded is not None:
        return recorded
    lora = {k: v for k, v in embedder.model.state_dict().items() if "lora_" in k}
    if not lora:
        return "none"  # an embedder not made by load_embedder whose LoRA was merged cannot be told apart
    digest = hashlib.sha256()  # a live (unmerged) peft model: hash its adapter tensors
    for name in sorted(lora):
        digest.update(name.encode())
        digest.update(lora[name].detach().float().cpu().contiguous().numpy().tobytes())
    return "live:" + digest.hexdigest()


def table_metadata(
    embedder: LLMEmbedder, prompts: Sequence[str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The metadata a table of these prompts by this embedder carries (and is matched on to skip work)."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "table": "llm",
        "rows": str(len(prompts) + 1),
        "dim": str(embedder.hidden_size),
        "padding_row": "0",
        "model_source": str(embedder.cfg.source),
        "model_sha256": model_sha256(embedder),
        "lora_sha256": _adapter_sha256(embedder),
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest(),
        "max_length": str(embedder.max_length),
        "dtype": str(next(embedder.model.parameters()).dtype).removeprefix("torch."),
        "pooling": embedder.cfg.pooling,
    }
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra metadata key {key!r} would overwrite a built-in one")
        meta[key] = str(value)
    return meta


def read_table_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A table file's metadata ({} when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_table(path: str | os.PathLike) -> torch.Tensor:
    """The (n_items + 1, d) table of a file written by ``embed_catalog``."""
    return load_file(str(path))[TABLE_KEY]


def embed_catalog(
    embedder: LLMEmbedder,
    prompts: Sequence[str],
    out_path: str | os.PathLike,
    batch_size: int = 32,
    progress: bool = True,
    extra_metadata: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """Embed ``prompts`` (item 1..n order) into a (n + 1, d) float32 table with row 0 zeros; write it atomically.

    Prompts run in batches of similar token length (longest first: an out-of-memory shows at once) straight into a
    preallocated table; with right padding and the attention mask the result does not depend on ``batch_size``.
    The file is written to a temp sibling, fsynced and renamed. If ``out_path`` already holds a table with the
    same metadata (model, adapter, prompts, max_length, dtype, extras), it is loaded instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to embed")
    out_path = Path(out_path)
    meta = table_metadata(embedder, prompts, extra_metadata)
    if out_path.is_file():
        old = read_table_metadata(out_path)
        if {k: v for k, v in old.items() if k not in _INFORMATIONAL} == meta:
            log.info("%s is up to date (same model, adapter and prompts); reusing it", out_path)
            return load_table(out_path)
        changed = sorted(
            k for k in meta.keys() | old.keys() if k not in _INFORMATIONAL and old.get(k) != meta.get(k)
        )
        log.info("%s is stale (%s differ); re-embedding", out_path, ", ".join(changed))

    start = time.perf_counter()
    ids = embedder.tokenize(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    table = torch.zeros(
        len(ids) + 1, embedder.hidden_size, dtype=torch.float32
    )  # row 0 stays the padding row
    was_training = embedder.model.training
    embedder.model.eval()
    try:
        with torch.no_grad():
            for begin in tqdm(
                range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress
            ):
                rows = order[begin : begin + batch_size]
                pooled = embedder.forward_pooled(embedder.pad([ids[i] for i in rows]))  # (b, d) fp32
                table[torch.tensor(rows) + 1] = pooled.cpu()
    finally:
        embedder.model.train(was_training)
    meta["seconds"] = f"{time.perf_counter() - start:.3f}"

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(out_path)
    try:
        save_file({TABLE_KEY: table}, str(tmp), metadata=meta)
        fsync_file(tmp)
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(out_path.parent)
    log.info("embedded %d items in %s s -> %s", len(ids), meta["seconds"], out_path)
    return table


def prompt_metadata(prompt_cfg: PromptConfig) -> dict[str, str]:
    """Extra table metadata recording the prompt config (`embed_catalog(..., extra_metadata=...)`)."""
    return {PROMPT_META: json.dumps(dataclasses.asdict(prompt_cfg), sort_keys=True)}


def prompt_config_of(meta: dict[str, str]) -> PromptConfig | None:
    """The PromptConfig recorded in a table's metadata, or None."""
    raw = meta.get(PROMPT_META)
    if not raw:
        return None
    kw = json.loads(raw)
    for key in ("attributes", "exclude"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return PromptConfig(**kw)
