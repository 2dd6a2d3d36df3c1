"""llmemb: LLM item embeddings for sequential recommendation (training jobs + HTTP service)."""

__version__ = "0.1.0"
