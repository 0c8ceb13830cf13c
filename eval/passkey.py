"""Passkey retrieval: a 5-digit key hidden in held-out filler text at a given depth, asked back at the end.

A prompt is scored by ranking: the model must give the true key a higher log-likelihood than `distractors`
random keys (chance 1 / (distractors + 1)). SmolLM2-135M ranks the key first on every prompt up to 2k tokens
but writes it greedily only ~20-70% of the time, so ranking is what can show a transform losing the needle.
"""

from __future__ import annotations

import copy
import random

import torch
from tqdm.auto import tqdm

LENGTHS = (512, 1024, 2048)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about it.\n")
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\nWhat is the pass key? The pass key is"


def filler_tokens(tokenizer, min_tokens: int) -> list[int]:
    """Held-out Wikipedia (never calibration text) as one token stream of `2 * min_tokens` tokens."""
    from llmopt.data.corpora import corpus_split

    ids: list[int] = []
    for text in corpus_split("wikipedia", "heldout"):
        ids += tokenizer(text + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= 2 * min_tokens:  # room for distinct starting offsets per prompt
            break
    if not ids:
        raise ValueError("no held-out filler text")
    return (ids * (2 * min_tokens // len(ids) + 1))[: 2 * min_tokens]


def passkey_prompt(tokenizer, filler: list[int], length: int, depth: float, key: int, offset: int = 0) -> list[int]:
    """`length` token ids: the instruction, filler from `offset` with the needle at `depth` (0 = start, 1 = end),
    and the question, which the answer " <key>" continues."""
    intro = tokenizer(_INTRO, add_special_tokens=False)["input_ids"]
    needle = tokenizer(_NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
    question = tokenizer(_QUESTION, add_special_tokens=False)["input_ids"]
    room = length - len(intro) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"length {length} is too short for the needle and the question ({-room} tokens missing)")
    body = filler[offset: offset + room]
    cut = round(len(body) * depth)
    return intro + body[:cut] + needle + body[cut:] + question


@torch.no_grad()
def continuation_log_likelihoods(model, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """log p(continuation | prompt) for each continuation; the prompt runs once, its KV cache is reused."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    scores = []
    for tokens in continuations:
        step = model(input_ids=torch.tensor([tokens], device=device),
                     past_key_values=copy.deepcopy(out.past_key_values), use_cache=True)
        logits = torch.cat([out.logits[0, -1:], step.logits[0, :-1]]).float().log_softmax(-1)
        scores.append(logits[torch.arange(len(tokens)), torch.tensor(tokens, device=device)].sum().item())
    return scores


def passkey_results(model, tokenizer, lengths=LENGTHS, depths=DEPTHS, trials: int = 1, distractors: int = 4,
                    seed: int = 0, progress: bool = True) -> dict[int, list[bool]]:
    """length → one hit per (depth, trial): the true key ranked first. Same keys and filler for every model."""
    rng = random.Random(seed)
    filler = filler_tokens(tokenizer, max(lengths))
    cases = [(length, depth, rng.sample(range(10000, 100000), distractors + 1), rng.randrange(len(filler) - length))
             for length in lengths for depth in depths for _ in range(trials)]
    results: dict[int, list[bool]] = {length: [] for length in lengths}
    for length, depth, keys, offset in tqdm(cases, desc="passkey", unit="prompt", disable=not progress, leave=False):
        prompt = passkey_prompt(tokenizer, filler, length, depth, keys[0], offset)
        answers = [tokenizer(f" {key}", add_special_tokens=False)["input_ids"] for key in keys]
        scores = continuation_log_likelihoods(model, prompt, answers)
        results[length].append(scores[0] > max(scores[1:]))
    return results
