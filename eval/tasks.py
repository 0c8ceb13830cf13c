"""Offline multiple-choice tasks for lm-eval, built from packaged data into the llmopt cache.

- ``analogies``: gensim's questions-words.txt as 4-way choice ("Athens is to Greece as Oslo is to" Norway).
- ``bigbench:<task>[/<subtask>]``: any BIG-bench JSON multiple-choice task, from the bigbench==1.0.0 sdist.
The JSONL files live under ``cache_dir()/eval`` and lm-eval reads them by absolute path; nothing comes from a hub.
"""

from __future__ import annotations

import json
import random
import tarfile
import zipfile

from llmopt.data.corpora import GENSIM
from llmopt.data.packages import package_file
from llmopt.paths import cache_dir

BIGBENCH = "bigbench==1.0.0"
_ANALOGIES = "gensim/test/test_data/questions-words.txt"
MAX_ITEMS = 300
# signal above chance on SmolLM2-135M (ENVIRONMENT.md): 0.41 vs 0.25, 0.41 vs 0.14, 0.63 vs 0.50
DEFAULT_TASKS = ("analogies", "bigbench:goal_step_wikihow/goal_inference", "bigbench:general_knowledge",
                 "bigbench:cause_and_effect/one_sentence_no_prompt")


def task_name(spec: str) -> str:
    """The lm-eval task name of a built-in spec: ``bigbench:a/b`` → ``llmopt_bigbench_a_b``."""
    return "llmopt_" + spec.replace(":", "_").replace("/", "_")


def is_builtin(spec: str) -> bool:
    return spec == "analogies" or spec.startswith("bigbench:")


def task_config(spec: str, max_items: int = MAX_ITEMS) -> dict:
    """An lm-eval task config (a dict) for a built-in spec, its data built once into the cache."""
    path = cache_dir() / "eval" / f"{task_name(spec)}-{max_items}.jsonl"
    if not path.is_file():
        items = analogy_items(max_items) if spec == "analogies" else bigbench_items(spec, max_items)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(item) + "\n" for item in items))
        partial.replace(path)
    return {
        "task": task_name(spec),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def analogy_items(max_items: int, seed: int = 0) -> list[dict]:
    """4-way analogies; the distractors are answers of other questions in the same section."""
    with zipfile.ZipFile(package_file(GENSIM)) as wheel:
        lines = wheel.read(_ANALOGIES).decode().splitlines()
    sections: dict[str, list[list[str]]] = {}
    current = ""
    for line in lines:
        if line.startswith(":"):
            current = line[1:].strip()
        elif line.strip():
            sections.setdefault(current, []).append(line.split())
    rng = random.Random(seed)
    pool = [(name, q) for name, questions in sections.items() for q in questions]
    rng.shuffle(pool)
    items = []
    for name, (a, b, c, d) in pool[:max_items]:
        candidates = sorted({q[3] for q in sections[name]} - {a, b, c, d})
        choices = rng.sample(candidates, 3) + [d]
        rng.shuffle(choices)
        items.append({"query": f"{a} is to {b} as {c} is to", "choices": choices, "gold": choices.index(d)})
    return items


def bigbench_items(spec: str, max_items: int, seed: int = 0) -> list[dict]:
    """Items of a BIG-bench JSON task with `target_scores`; gold = the highest-scored choice."""
    name = spec.split(":", 1)[1]
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
    with tarfile.open(package_file(BIGBENCH, sdist=True)) as sdist:
        try:
            task = json.load(sdist.extractfile(member))
        except KeyError:
            raise ValueError(f"no BIG-bench JSON task {name!r} in {BIGBENCH}; name it as bigbench:<task> or "
                             "bigbench:<task>/<subtask> (see bigbench/benchmark_tasks/)") from None
    examples = [e for e in task.get("examples", []) if e.get("target_scores")]
    if not examples:
        raise ValueError(f"BIG-bench task {name!r} has no multiple-choice examples")
    random.Random(seed).shuffle(examples)
    prefix = task.get("task_prefix", "").strip()
    prefix = prefix + "\n" if prefix else ""
    question = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    answer = task.get("example_output_prefix", "\nA: ").rstrip()
    items = []
    for example in examples[:max_items]:
        choices = list(example["target_scores"])
        scores = list(example["target_scores"].values())
        items.append({"query": f"{prefix}{question}{example['input']}{answer}", "choices": choices,
                      "gold": scores.index(max(scores))})
    return items
