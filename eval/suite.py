"""The eval suite: score every model on the same tasks in one run and write the retention report.

Task names: ``wikipedia-ppl`` and ``news-ppl`` (held-out text, never calibration text), ``passkey``,
``analogies``, ``bigbench:<task>[/<subtask>]``, or any lm-eval task name where its data is available.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from llmopt.arch import attention_shape
from llmopt.eval.report import Report, Score
from llmopt.eval.tasks import DEFAULT_TASKS

PERPLEXITY_TASKS = {"wikipedia-ppl": "wikipedia", "news-ppl": "news"}
DEFAULT_SUITE = (*PERPLEXITY_TASKS, *DEFAULT_TASKS)
PPL_WINDOWS, PPL_SEQ_LEN = 16, 512


def evaluate_model(model, tokenizer, tasks: list[str], limit: int | None = None) -> dict[str, Score]:
    """One model's scores on `tasks`; `limit` caps items per lm-eval task and windows per perplexity."""
    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows
    from llmopt.eval.harness import run_lm_eval
    from llmopt.eval.passkey import passkey_accuracy
    from llmopt.eval.perplexity import perplexity

    scores: dict[str, Score] = {}
    for task in tasks:
        if task in PERPLEXITY_TASKS:
            windows = token_windows(corpus_split(PERPLEXITY_TASKS[task], "heldout"), tokenizer, PPL_SEQ_LEN,
                                    min(limit or PPL_WINDOWS, PPL_WINDOWS))
            scores[task] = Score(perplexity(model, windows), higher_is_better=False)
        elif task == "passkey":
            for length, accuracy in passkey_accuracy(model, tokenizer).items():
                scores[f"passkey@{length}"] = Score(accuracy)
    harness_tasks = [t for t in tasks if t not in PERPLEXITY_TASKS and t != "passkey"]
    if harness_tasks:
        for task, metrics in run_lm_eval(model, tokenizer, harness_tasks, limit).items():
            scores[task] = Score(metrics["acc"], metrics.get("acc_stderr"))
    return scores


def run_suite(models: dict[str, tuple], reference: str, tasks: list[str], limit: int | None,
              out_dir: str | Path, threshold: float = 0.95) -> Report:
    """Evaluate every ``name → (model, tokenizer)`` (the reference among them) and write the report."""
    if reference not in models:
        raise ValueError(f"the reference {reference!r} must be one of the models")
    scores, kv = {}, {}
    for name, (model, tokenizer) in models.items():
        started = time.perf_counter()
        print(f"[llmopt eval] {name}: {', '.join(tasks)}", file=sys.stderr)
        scores[name] = evaluate_model(model, tokenizer, tasks, limit)
        kv[name] = attention_shape(model.config).kv_bytes_per_token(2)
        print(f"[llmopt eval] {name} done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = Report(reference, scores, kv, threshold)
    report.write(out_dir)
    return report


def _baseline(spec: str, reference_model, tokenizer) -> tuple[str, tuple]:
    """A baseline is a model name/path, or a YAML recipe applied to a copy of the reference."""
    from llmopt.config import OptimizationConfig
    from llmopt.data.corpora import calibration_texts
    from llmopt.models import load_model
    from llmopt.patch import patch_model

    if spec.endswith((".yaml", ".yml")):
        model = patch_model(copy.deepcopy(reference_model), OptimizationConfig.from_yaml(spec),
                            tokenizer=tokenizer, calibration=calibration_texts())
        return Path(spec).stem, (model, tokenizer)
    return _label(spec), load_model(spec)


def _label(spec: str) -> str:
    return Path(spec).name if Path(spec).exists() else spec


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="model(s) to evaluate: name, HF directory or hub id; repeatable")
    parser.add_argument("--reference", default="smollm2-135m", help="the original model (default: smollm2-135m)")
    parser.add_argument("--baselines", nargs="*", default=[],
                        help="baseline models, or YAML recipes applied to the reference (e.g. configs/kv-mean-pool.yaml)")
    parser.add_argument("--tasks", nargs="*", default=list(DEFAULT_SUITE),
                        help=f"tasks (default: {' '.join(DEFAULT_SUITE)}); also passkey, bigbench:<task>, "
                             "or any lm-eval task name")
    parser.add_argument("--limit", type=int, default=None, help="items per task (a quick run)")
    parser.add_argument("--threshold", type=float, default=0.95, help="retention needed to pass (default 0.95)")
    parser.add_argument("--out", default=None, help="report folder (default: out/eval-<time>)")


def run_eval_command(args: argparse.Namespace) -> int:
    from llmopt.eval.harness import task_specs
    from llmopt.models import load_model

    task_specs([t for t in args.tasks if t not in PERPLEXITY_TASKS and t != "passkey"])  # fail before loading
    out = Path(args.out or f"out/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    reference_model, tokenizer = load_model(args.reference)
    models = {_label(args.reference): (reference_model, tokenizer)}
    for spec in args.model:
        models[_label(spec)] = load_model(spec)
    for spec in args.baselines:
        name, pair = _baseline(spec, reference_model, tokenizer)
        models[name] = pair
    report = run_suite(models, _label(args.reference), args.tasks, args.limit, out, args.threshold)
    print(report.to_markdown())
    print(f"report: {out}/report.md, report.json, *.png", file=sys.stderr)
    return 0
