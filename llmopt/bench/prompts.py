"""The bench's prompts: held-out Wikipedia text, never calibration text (the numbers depend on real tokens)."""

from __future__ import annotations

import torch

from llmopt.data.corpora import corpus_split
from llmopt.data.windows import token_windows


def heldout_tokens(tokenizer, length: int) -> torch.Tensor:
    """``[1, length]`` token ids: the first `length` tokens of the held-out Wikipedia articles, joined by EOS."""
    return token_windows(list(corpus_split("wikipedia", "heldout")), tokenizer, length, max_windows=1)
