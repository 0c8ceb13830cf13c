"""BIG-bench JSON multiple-choice tasks, read from the bigbench==1.0.0 sdist (never pip-installed).

Items are scored as lm-eval cloze multiple choice: the prompt is BIG-bench's own (task prefix, input prefix,
input, output prefix) without the choices appended, and each choice is scored by its log-likelihood.
"""

from __future__ import annotations

import json
import random
import tarfile

from llmopt.data.packages import package_file

BIGBENCH = "bigbench==1.0.0"
_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def read_bigbench_tasks(names: list[str]) -> dict[str, dict]:
    """name (``task`` or ``task/subtask``) → its task.json, in one pass over the 358 MB sdist (~15 s)."""
    wanted = {f"{_ROOT}{name}/task.json": name for name in names}
    found: dict[str, dict] = {}
    with tarfile.open(package_file(BIGBENCH, sdist=True)) as sdist:
        for member in sdist:
            if member.name in wanted:
                found[wanted[member.name]] = json.load(sdist.extractfile(member))
                if len(found) == len(wanted):
                    break
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"no BIG-bench JSON task {', '.join(map(repr, missing))} in {BIGBENCH}; name it as "
                         "bigbench:<task> or bigbench:<task>/<subtask> (folders of bigbench/benchmark_tasks/)")
    return found


def bigbench_items(task: dict, max_items: int, seed: int = 0) -> list[dict]:
    """Up to `max_items` examples of a task.json with one best choice, in a seeded shuffled order.

    Each item: ``{"query": prompt, "choices": [...], "gold": index of the highest target score}``. Examples
    whose top score is shared by several choices are skipped (a single gold index could not judge them).
    """
    examples = [e for e in task.get("examples", []) if e.get("target_scores") and _single_best(e["target_scores"])]
    if not examples:
        raise ValueError(f"BIG-bench task {task.get('name')!r} has no multiple-choice examples with one best answer")
    examples = examples[:]
    random.Random(seed).shuffle(examples)
    prefix = (task.get("task_prefix") or "").strip()
    prefix = prefix + "\n" if prefix else ""
    question = _field(task, "example_input_prefix", "\nQ: ").lstrip("\n")
    answer = _field(task, "example_output_prefix", "\nA: ").rstrip()
    items = []
    for example in examples[:max_items]:
        choices = [str(choice).strip() for choice in example["target_scores"]]
        scores = list(example["target_scores"].values())
        items.append({"query": f"{prefix}{question}{example['input'].strip()}{answer}", "choices": choices,
                      "gold": scores.index(max(scores))})
    return items


def _single_best(target_scores: dict) -> bool:
    scores = list(target_scores.values())
    return scores.count(max(scores)) == 1 and len(set(map(str, target_scores))) == len(scores)


def _field(task: dict, key: str, default: str) -> str:
    value = task.get(key)
    return default if value is None else value
