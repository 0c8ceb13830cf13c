"""Retrieval from long held-out filler text, scored by ranking: ``passkey`` (a 5-digit key hidden at a given
depth, asked back at the end) and ``multihop`` (the key split in two halves hidden at two depths: the answer
combines both, so a model that retrieves one half only loses).

A prompt is scored by ranking: the model must give the true key a higher log-likelihood than 4 distractors
(chance 1/5). In ``multihop`` two distractors share one true half each, so retrieving a single half is no better
than chance among those three. SmolLM2-135M ranks the passkey first on every prompt up to 2k tokens but writes it
greedily only ~20-70% of the time, so ranking is what can show a transform losing the needle.
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
_HALF_NEEDLE = " The {half} half of the pass key is {digits}. Remember it. "
_QUESTION = "\nWhat is the pass key? The pass key is"
KINDS = ("passkey", "multihop")
SECOND_NEEDLE_SHIFT = 0.4  # multihop: the second half sits this much deeper (wrapping), before or after the first


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


def haystack_prompt(tokenizer, filler: list[int], length: int, needles: list[tuple[float, str]],
                    offset: int = 0) -> list[int]:
    """`length` token ids: the instruction, filler from `offset` with each ``(depth, text)`` needle at its depth
    (0 = start, 1 = end), and the question, which the answer " <key>" continues."""
    intro = tokenizer(_INTRO, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in needles]
    question = tokenizer(_QUESTION, add_special_tokens=False)["input_ids"]
    room = length - len(intro) - sum(map(len, pieces)) - len(question)
    if room < 0:
        raise ValueError(f"length {length} is too short for the needles and the question ({-room} tokens missing)")
    body, prompt, done = filler[offset: offset + room], list(intro), 0
    for (depth, _), piece in sorted(zip(needles, pieces), key=lambda pair: pair[0][0]):
        cut = round(len(body) * depth)
        prompt += body[done:cut] + piece
        done = cut
    return prompt + body[done:] + question


def passkey_prompt(tokenizer, filler: list[int], length: int, depth: float, key: int, offset: int = 0) -> list[int]:
    """One needle holding the whole `key` at `depth`."""
    return haystack_prompt(tokenizer, filler, length, [(depth, _NEEDLE.format(key=key))], offset)


def multihop_prompt(tokenizer, filler: list[int], length: int, depth: float, key: int, offset: int = 0) -> list[int]:
    """The first three digits of the 6-digit `key` at `depth`, the last three `SECOND_NEEDLE_SHIFT` deeper."""
    first, second = divmod(key, 1000)
    return haystack_prompt(tokenizer, filler, length, [
        (depth, _HALF_NEEDLE.format(half="first", digits=first)),
        ((depth + SECOND_NEEDLE_SHIFT) % 1.0, _HALF_NEEDLE.format(half="second", digits=f"{second:03d}"))], offset)


def candidate_keys(kind: str, rng: random.Random) -> list[int]:
    """The true key first, then 4 distractors; for multihop two of them keep one true half each."""
    if kind == "passkey":
        return rng.sample(range(10000, 100000), 5)
    firsts, seconds = rng.sample(range(100, 1000), 3), rng.sample(range(1000), 3)
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)]
    return [firsts[i] * 1000 + seconds[j] for i, j in pairs]


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


def retrieval_results(model, tokenizer, kind: str = "passkey", lengths=LENGTHS, depths=DEPTHS, trials: int = 1,
                      seed: int = 0, progress: bool = True) -> dict[int, list[bool]]:
    """length → one hit per (depth, trial): the true key ranked first. Same keys and filler for every model."""
    if kind not in KINDS:
        raise ValueError(f"unknown retrieval task {kind!r}: use one of {', '.join(KINDS)}")
    prompt_for = passkey_prompt if kind == "passkey" else multihop_prompt
    rng = random.Random(seed)
    filler = filler_tokens(tokenizer, max(lengths))
    cases = [(length, depth, candidate_keys(kind, rng), rng.randrange(len(filler) - length))
             for length in lengths for depth in depths for _ in range(trials)]
    results: dict[int, list[bool]] = {length: [] for length in lengths}
    for length, depth, keys, offset in tqdm(cases, desc=kind, unit="prompt", disable=not progress, leave=False):
        prompt = prompt_for(tokenizer, filler, length, depth, keys[0], offset)
        answers = [tokenizer(f" {key}", add_special_tokens=False)["input_ids"] for key in keys]
        scores = continuation_log_likelihoods(model, prompt, answers)
        results[length].append(scores[0] > max(scores[1:]))
    return results
