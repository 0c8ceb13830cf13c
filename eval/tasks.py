"""Built-in offline multiple-choice tasks as lm-eval task configs, their data built into the llmopt cache.

Specs: ``analogies`` (gensim) and ``bigbench:<task>[/<subtask>]`` (any BIG-bench JSON multiple-choice task).
Each is written once as JSONL under ``cache_dir()/eval`` and lm-eval reads it by absolute path (a relative
``data_files`` path would resolve against the working directory); nothing comes from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.eval.analogies import analogy_items
from llmopt.eval.bigbench import bigbench_items, read_bigbench_tasks

from llmopt.paths import cache_dir

# Bump when the items a spec produces change, so stale cached files are not reused.
FORMAT_VERSION = 2
# Items per task in the default suite, with SmolLM2-135M's 0-shot score at that size against chance. Left out:
# tasks at chance (misconceptions, strategyqa) and ruin_names (0.41 vs 0.25, but a model with mean-pooled KV
# heads and perplexity ×660 scored higher than the original: it rewards oddness, not retained ability).
# Sized for time: lm-eval scores one request per choice, ~80 k tokens in all, ~3 minutes on 2 CPU cores.
DEFAULT_SIZES = {
    "analogies": 300,                                        # 0.80 vs 0.25
    "bigbench:goal_step_wikihow/goal_inference": 150,        # 0.39 vs 0.25
    "bigbench:general_knowledge": 69,                        # 0.45 vs 0.14; the whole task
    "bigbench:cause_and_effect/one_sentence_no_prompt": 51,  # 0.57 vs 0.50; the whole task
    "bigbench:movie_recommendation": 100,                    # 0.58 vs 0.25
    "bigbench:social_iqa": 100,                              # acc_norm 0.55 vs 0.33 (acc is at chance)
}
# The metric that carries the signal where it is not plain accuracy.
METRICS = {"bigbench:social_iqa": "acc_norm"}
DEFAULT_TASKS = tuple(DEFAULT_SIZES)
MAX_ITEMS = 300


def is_builtin(spec: str) -> bool:
    return spec == "analogies" or spec.startswith("bigbench:")


def task_name(spec: str) -> str:
    """The lm-eval task name of a built-in spec: ``bigbench:a/b`` → ``llmopt_bigbench_a_b``."""
    return "llmopt_" + spec.replace(":", "_").replace("/", "_")


def task_size(spec: str) -> int:
    return DEFAULT_SIZES.get(spec, MAX_ITEMS)


def task_file(spec: str, max_items: int | None = None) -> Path:
    return cache_dir() / "eval" / f"{task_name(spec)}-{max_items or task_size(spec)}-v{FORMAT_VERSION}.jsonl"


def build_tasks(specs: list[str]) -> dict[str, Path]:
    """spec → its JSONL file, building the missing ones (all BIG-bench ones in a single pass over the sdist)."""
    paths = {spec: task_file(spec) for spec in specs}
    missing = [spec for spec, path in paths.items() if not path.is_file()]
    bigbench = [spec.split(":", 1)[1] for spec in missing if spec.startswith("bigbench:")]
    sources = read_bigbench_tasks(bigbench) if bigbench else {}
    for spec in missing:
        if spec == "analogies":
            items = analogy_items(task_size(spec))
        else:
            items = bigbench_items(sources[spec.split(":", 1)[1]], task_size(spec))
        _write_atomically(paths[spec], items)
    return paths


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chance_level(items: list[dict]) -> float:
    """Expected accuracy of uniform guessing."""
    return sum(1 / len(item["choices"]) for item in items) / len(items)


def task_config(spec: str, path: Path) -> dict:
    """An lm-eval task config (dict form) reading `path`: 0-shot cloze multiple choice, acc and acc_norm."""
    return {
        "task": task_name(spec),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": FORMAT_VERSION},
    }


def _write_atomically(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(item) + "\n" for item in items))
    partial.replace(path)
