"""Passkey retrieval: a number hidden in held-out filler text at a given depth, asked back at the end."""

from __future__ import annotations

import random

import torch

from llmopt.data.corpora import corpus_split

LENGTHS = (256, 512, 1024, 2048)
DEPTHS = (0.1, 0.5, 0.9)
_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """About `length` tokens: filler, the key sentence at `depth` (0 = start, 1 = end), the question."""
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                       add_special_tokens=False)["input_ids"]
    question = tokenizer(_QUESTION, add_special_tokens=False)["input_ids"]
    filler: list[int] = []
    for text in corpus_split("wikipedia", "heldout"):
        filler += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(filler) >= length:
            break
    filler = filler[: max(length - len(needle) - len(question), 0)]
    cut = int(len(filler) * depth)
    return filler[:cut] + needle + filler[cut:] + question


@torch.no_grad()
def passkey_accuracy(model, tokenizer, lengths=LENGTHS, depths=DEPTHS, trials: int = 2,
                     seed: int = 0) -> dict[int, float]:
    """Fraction of prompts whose greedy answer contains the key, per prompt length."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    accuracy = {}
    for length in lengths:
        hits = 0
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)], device=device)
                out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
                hits += str(key) in tokenizer.decode(out[0, ids.shape[1]:])
        accuracy[length] = hits / (len(depths) * trials)
    return accuracy
