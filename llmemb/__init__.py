"""llmemb: LLM item embeddings for sequential recommendation (training jobs + HTTP service)."""

from models import __version__

__all__ = ["__version__"]
