"""Model-family adapters: the only place that knows module names and RoPE layouts."""

from llmopt.arch.adapter import ArchAdapter, AttentionShape, Projection, adapter_for, attention_shape

__all__ = ["ArchAdapter", "AttentionShape", "Projection", "adapter_for", "attention_shape"]
