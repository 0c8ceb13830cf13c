"""Greedy answers to short prompts, scored against the reference model's answers: what a user sees first.

Perplexity can move little while the answers a user reads change ("The capital of France is" → "Paris" from the
original, "100, which is 100" from a damaged model). Each prompt is completed greedily; the answer is the
completion up to its first line or sentence end. A variant is scored by how often its answer equals the
reference's (exact match, after normalization) and by their word-overlap F1 (SQuAD's similarity).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from tqdm.auto import tqdm

MAX_NEW_TOKENS = 16
FACTUAL = (
    "The capital of France is", "The capital of Japan is", "The capital of Italy is", "The capital of Egypt is",
    "The largest planet in the solar system is", "The closest star to the Earth is the",
    "Water freezes at a temperature of", "The chemical symbol for gold is", "The chemical formula of water is",
    "The first president of the United States was", "The Mona Lisa was painted by",
    "Romeo and Juliet was written by", "The theory of relativity was developed by",
    "The longest river in Africa is the", "The tallest mountain in the world is",
    "The official language of Brazil is", "The currency of the United Kingdom is the",
    "A triangle has three sides, and a square has", "The opposite of hot is",
    "The day after Monday is", "The month after January is", "Ten plus five equals",
    "The Great Wall is located in", "The Eiffel Tower is located in the city of",
    "Honey is made by", "The heart pumps", "Plants make their food through a process called",
    "The author of the Harry Potter books is", "The Statue of Liberty was a gift from",
    "The largest ocean on Earth is the", "The primary colors are red, yellow and",
    "The speed of light is about",
)
INSTRUCTIONS = (
    "Question: How many legs does a spider have?\nAnswer:", "Question: What color is the sky on a clear day?\nAnswer:",
    "Question: What is the boiling point of water in degrees Celsius?\nAnswer:",
    "Question: Who wrote Hamlet?\nAnswer:", "Question: What is the largest animal on Earth?\nAnswer:",
    "Question: How many days are in a week?\nAnswer:", "Question: What gas do plants absorb from the air?\nAnswer:",
    "Question: What is the capital of Germany?\nAnswer:",
    "Translate to French: thank you =>", "Translate to Spanish: good morning =>",
    "Complete the sequence: 2, 4, 6, 8,", "List three fruits:", "Name a famous scientist:",
    "Give a synonym for happy:", "Write the plural of mouse:", "Spell the number 7 in words:",
)
PROMPTS = FACTUAL + INSTRUCTIONS
_SENTENCE_END = re.compile(r"\n|(?<!\b[A-Z])[.!?](?=\s|$)")  # "John F. Kennedy" is one sentence


def greedy_answers(model, tokenizer, prompts: tuple[str, ...] | list[str] = PROMPTS, batch_size: int = 16,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """`model`'s greedy answer to each prompt (left-padded batches through ``generate()``)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="answers", unit="batch", leave=False):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start: start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        answers += [first_sentence(tokenizer.decode(row[width:], skip_special_tokens=True)) for row in out]
    return answers


def first_sentence(completion: str) -> str:
    """The completion up to its first line break or sentence end (not after an initial), stripped."""
    return _SENTENCE_END.split(completion.strip(), maxsplit=1)[0].strip()


def normalize(answer: str) -> list[str]:
    """Lower-cased words, punctuation and articles removed (as SQuAD scores answers)."""
    words = answer.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return [word for word in words if word not in ("a", "an", "the")]


def word_f1(answer: str, reference: str) -> float:
    """Word-overlap F1 of two answers; 1 when both are empty."""
    ours, theirs = normalize(answer), normalize(reference)
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not common:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def agreement(answers: list[str], reference: list[str]) -> tuple[list[float], list[float]]:
    """Per prompt: exact match (0/1) and word F1 of `answers` against the `reference` answers."""
    if len(answers) != len(reference):
        raise ValueError(f"{len(answers)} answers against {len(reference)} reference answers")
    exact = [float(normalize(a) == normalize(r)) for a, r in zip(answers, reference)]
    return exact, [word_f1(a, r) for a, r in zip(answers, reference)]
