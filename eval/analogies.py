"""Word analogies as 4-way multiple choice, from gensim's ``questions-words.txt`` (19,544 questions).

"Athens is to Greece as Oslo is to" → Norway, against three answers of other questions of the same section
(other countries, other plurals, ...), so no distractor is ruled out by its kind alone.
"""

from __future__ import annotations

import random
import zipfile

from llmopt.data.corpora import GENSIM
from llmopt.data.packages import package_file

_MEMBER = "gensim/test/test_data/questions-words.txt"


def analogy_sections() -> dict[str, list[tuple[str, str, str, str]]]:
    """section name → its questions ``(a, b, c, d)``: a is to b as c is to d."""
    with zipfile.ZipFile(package_file(GENSIM)) as wheel:
        lines = wheel.read(_MEMBER).decode().splitlines()
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = ""
    for line in lines:
        if line.startswith(":"):
            current = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            sections.setdefault(current, []).append((a, b, c, d))
    return sections


def analogy_items(max_items: int, seed: int = 0) -> list[dict]:
    """`max_items` questions drawn without replacement across all sections, deterministic for a seed.

    Each item: ``{"query": "a is to b as c is to", "choices": [4 words], "gold": index of d}``.
    """
    sections = analogy_sections()
    rng = random.Random(seed)
    pool = [(name, question) for name, questions in sections.items() for question in questions]
    rng.shuffle(pool)
    items = []
    for name, (a, b, c, d) in pool[:max_items]:
        distractors = sorted({q[3] for q in sections[name]} - {a, b, c, d})
        choices = rng.sample(distractors, 3) + [d]
        rng.shuffle(choices)
        items.append({"query": f"{a} is to {b} as {c} is to", "choices": choices, "gold": choices.index(d)})
    return items
