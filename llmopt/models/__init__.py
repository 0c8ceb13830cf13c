"""Model loading: the embedded default by name, a local HF directory, or a hub id."""

from llmopt.models.loading import load_model, resolve_model

__all__ = ["load_model", "resolve_model"]
