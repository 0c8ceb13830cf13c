"""lm-eval in process, on model objects (no re-export), through HFLM."""

from __future__ import annotations

import logging

from llmopt.eval.tasks import is_builtin, task_config, task_name


def task_specs(tasks: list[str]) -> list[str | dict]:
    """Built-in specs become dict configs; any other name goes to lm-eval as is (checked before running)."""
    from lm_eval.tasks import TaskManager

    specs: list[str | dict] = [task_config(t) if is_builtin(t) else t for t in tasks]
    unknown = [t for t in specs if isinstance(t, str) and t not in TaskManager().all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: use a built-in one (analogies, "
                         "bigbench:<task>[/<subtask>], wikipedia-ppl, news-ppl, passkey) or an lm-eval task name")
    return specs


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None,
                batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Accuracy per task: ``{task: {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": ..}}``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    specs = task_specs(tasks)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    output = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False,
                                     bootstrap_iters=100, verbosity="WARNING")
    results = {}
    for spec in tasks:
        raw = output["results"][task_name(spec) if is_builtin(spec) else spec]
        results[spec] = {key.replace(",none", ""): float(value) for key, value in raw.items()
                         if key.startswith(("acc", "acc_norm")) and isinstance(value, (int, float))}
    return results
