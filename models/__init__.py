"""Shared core: prompts, LLM loading + pooling, PCA, adapter, SRS backbones, the bundle format."""

__version__ = "0.1.0"  # the distribution version; llmemb.__version__ re-exports it
