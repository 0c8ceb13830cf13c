"""Sparse decode attention: one new query per sequence reads only the selected pages of its KV cache."""

from .kernel import sparse_decode_attention
from .naive import naive_sparse_decode_attention

__all__ = ["naive_sparse_decode_attention", "sparse_decode_attention"]
