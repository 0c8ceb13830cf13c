"""Model-family adapters: the only place that knows module names and RoPE layouts."""

from llmopt.arch.adapter import ArchAdapter, AttentionShape, adapter_for, attention_shape

__all__ = ["ArchAdapter", "AttentionShape", "adapter_for", "attention_shape"]
