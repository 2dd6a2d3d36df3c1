"""The embed path: the bundle's LLM (LoRA merged) + PCA + adapter, from token ids to vectors in every space.

    model = EmbedModel(spec)                   # spec: EmbedSpec (LLM config, LoRA dir, PCA, adapter, spaces)
    model.embed_tokens([[12, 9, 4], [7, 3]])   # -> {"llm": (2, d), "pca": (2, k), "item": (2, h)} float32

An ``EmbedModel`` runs where the embed batches run: on the embed micro-batcher's thread in the server process
(``LLMEMB_EMBED_WORKER=thread``), or in an embed worker process (``service.worker``, ``process``), which builds it
from the same picklable ``EmbedSpec``. Tokenizing stays in the server process either way (``LLMEmbedder`` with
``weights=False`` there in process mode): only token ids travel.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.adapter import Adapter
from models.llm import LLMConfig, LLMEmbedder, load_lora, merge_lora
from models.pca import PCA
from service.batching import length_groups

# One LLM call's fixed cost in prompt tokens, for grouping an embed batch by prompt length (batching.length_groups;
# the backbone's counterpart is in service.recommender): on CPU a token costs ~4 ms (SmolLM2-135M) and a call's
# overhead about one token, so a batch padded to its longest prompt (Beauty: mean 31 tokens, up to 64) wasted up
# to half its time. CUDA: tokens are nearly free and every call is a round of kernel launches, so one call.
_CALL_COST_CPU = 4
_CALL_COST_CUDA = 1 << 20


@dataclass
class EmbedSpec:
    """Everything an ``EmbedModel`` is built from. Picklable: the embed worker process receives it."""

    llm: LLMConfig  # source, device, cache dir, pooling settings
    lora_dir: str | None  # the bundle's LoRA adapter, merged into the LLM at load
    pca: PCA | None  # on the CPU
    adapter: Adapter | None  # on the CPU
    spaces: tuple[
        str, ...
    ]  # what embed_tokens returns: "llm", then "pca", then "item" where the bundle has them
    threads: int | None  # torch intra-op threads (None: torch's default)


class EmbedModel:
    """The LLM with its heads, built from an ``EmbedSpec``. Not thread-safe: ``embed_tokens`` runs on the one
    thread that runs the embed batches."""

    def __init__(self, spec: EmbedSpec, embedder: LLMEmbedder | None = None) -> None:
        """``embedder``: the spec's LLM already loaded with its weights (the server process's, in thread mode)."""
        start = time.perf_counter()
        self.spec = spec
        self.embedder = embedder if embedder is not None else LLMEmbedder(spec.llm)
        if spec.lora_dir is not None:
            self.embedder.model = merge_lora(load_lora(self.embedder.model, spec.lora_dir)).eval()
        self.embedder.model.requires_grad_(False)
        device = self.embedder.device
        self.pca = spec.pca.to(device) if spec.pca is not None else None
        self.adapter = spec.adapter.to(device).requires_grad_(False) if spec.adapter is not None else None
        self.spaces = spec.spaces
        self.load_seconds = time.perf_counter() - start

    @property
    def dtype(self) -> str:
        return str(next(self.embedder.model.parameters()).dtype).removeprefix("torch.")

    @torch.inference_mode()
    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Token ids per prompt -> (B, dim) float32 host arrays, one per space, rows in the batch's order. The
        LLM runs once per group of similar prompt lengths (on CUDA once)."""
        emb = self.embedder
        call_cost = _CALL_COST_CUDA if emb.device.type == "cuda" else _CALL_COST_CPU
        groups = length_groups([len(t) for t in batch], call_cost)
        if len(groups) == 1:
            pooled = emb.forward_pooled(emb.pad(batch))  # (B, d) fp32
        else:
            parts = [emb.forward_pooled(emb.pad([batch[i] for i in g])) for g in groups]
            order = np.argsort(np.fromiter((i for g in groups for i in g), dtype=np.int64, count=len(batch)))
            pooled = torch.cat(parts)[torch.from_numpy(order).to(parts[0].device)]
        out = {"llm": pooled}
        if "pca" in self.spaces:
            out["pca"] = self.pca.transform(pooled).float()
            if "item" in self.spaces:
                out["item"] = self.adapter(out["pca"]).float()
        return {k: v.cpu().numpy() for k, v in out.items()}
