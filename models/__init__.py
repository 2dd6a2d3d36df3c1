"""Shared core: prompts, LLM loading + pooling, PCA, adapter, SRS backbones, the bundle format."""
