"""Block-sparse causal attention for prefill: each query block attends only to its selected key blocks."""

from .kernel import block_sparse_attention
from .naive import naive_block_sparse_attention

__all__ = ["block_sparse_attention", "naive_block_sparse_attention"]
