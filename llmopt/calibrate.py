"""`llmopt calibrate`: a thin shell over `patch_model` that measures the result against the original and the
recipe's baselines (held-out perplexity, retention, costs: the same report as `llmopt eval`) and saves atomically."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmopt.checkpoint import save_optimized
from llmopt.config import ConfigError, OptimizationConfig
from llmopt.costs import model_costs
from llmopt.offload import parse_max_memory, peak_resident_mib
from llmopt.patch import check_recipe, diagnostics, patch_model
from llmopt.transforms import transform_for

ORIGINAL, OURS = "original", "ours"


def recipe_baselines(config: OptimizationConfig, names: list[str]) -> dict[str, OptimizationConfig]:
    """name → the recipe with one transform replaced by that baseline; unknown names are refused, naming the ones
    the recipe's transforms offer."""
    offered = {name: config.replace(transform, baseline)
               for transform, settings in config.transforms.items()
               for name, baseline in transform_for(settings).baselines(settings).items()}
    unknown = [name for name in names if name not in offered]
    if unknown:
        raise ConfigError(f"unknown --baseline {', '.join(unknown)}: the recipe's transforms "
                          f"({', '.join(config.transforms)}) offer {', '.join(sorted(offered)) or 'none'}")
    return {name: offered[name] for name in names}


def with_budget(config: OptimizationConfig, max_loss: float | None) -> OptimizationConfig:
    """The recipe with `max_loss` set on every transform that takes an accuracy budget (refused if none does)."""
    if max_loss is None:
        return config
    budgeted = {name: settings for name, settings in config.transforms.items()
                if "max_loss" in {f.name for f in dataclasses.fields(settings)}}
    if not budgeted:
        raise ConfigError(f"--max-loss: none of the recipe's transforms ({', '.join(config.transforms)}) takes an "
                          f"accuracy budget yet; kv does")
    for name, settings in budgeted.items():
        config = config.replace(name, dataclasses.replace(settings, max_loss=max_loss))
    return config


def budget_lines(max_loss: float, scores: dict, transforms: dict[str, dict]) -> str:
    """Markdown: what each transform's budget search chose, and the budget against the loss measured on each
    held-out perplexity task of the report."""
    lines = ["", f"Accuracy budget: max_loss {max_loss:g} (held-out perplexity ratio - 1)", ""]
    for name, report in transforms.items():
        if "budget" in report:
            budget = report["budget"]
            lines.append(f"- {name}: {len(budget['compressed_layers'])} layers changed "
                         f"({budget['compressed_layers']}), KV {budget['kv_ratio']:g}x smaller; loss "
                         f"{budget['search_loss']:.4f} on the {budget['search_windows']} search windows, "
                         f"{budget['verified_loss']:.4f} on {budget['verify_windows']} verification windows")
    for task, score in scores[OURS].items():
        if score.metric == "ppl":
            loss = score.value / scores[ORIGINAL][task].value - 1
            lines.append(f"- {task}: measured loss {loss:.4f} "
                         f"({'within' if loss <= max_loss else 'OUTSIDE'} the budget)")
    return "\n".join(lines) + "\n"


def run_calibrate(args: argparse.Namespace) -> int:
    from llmopt.data.corpora import calibration_texts
    from llmopt.data.windows import read_texts
    from llmopt.eval.suite import checked_tasks
    from llmopt.models import load_model

    config = with_budget(OptimizationConfig.from_yaml(args.config), args.max_loss)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (llmopt never overwrites a model)")
    if args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be at least 1, got {args.eval_windows}")
    baselines = recipe_baselines(config, args.baselines)
    tasks = checked_tasks(args.tasks)
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    if max_memory and baselines:
        raise ConfigError("--baselines with --max-memory would copy the model: measure baselines in a run of their own")
    texts = read_texts(args.calibration) if args.calibration else calibration_texts()
    with offload_folder(args) as folder:
        model, tokenizer = load_model(args.model, max_memory=max_memory, offload_folder=folder)
        return _calibrate_loaded(args, config, model, tokenizer, baselines, tasks, texts, out)


@contextlib.contextmanager
def offload_folder(args: argparse.Namespace) -> Iterator[str | None]:
    """The folder offloaded weights go to: --offload-folder (new or empty), a temporary one with --max-memory
    alone (removed after), or None."""
    if args.offload_folder is not None:
        if args.max_memory is None:
            raise ConfigError("--offload-folder needs --max-memory (how much the weights may use in memory)")
        folder = Path(args.offload_folder)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"--offload-folder {folder} is not empty; give a new or empty folder")
        yield str(folder)
    elif args.max_memory is not None:
        with tempfile.TemporaryDirectory(prefix="llmopt-offload-") as folder:
            yield folder
    else:
        yield None


def _calibrate_loaded(args: argparse.Namespace, config: OptimizationConfig, model, tokenizer, baselines: dict,
                      tasks: list[str], texts: list[str], out: Path) -> int:
    from llmopt.eval.report import Report
    from llmopt.eval.suite import evaluate_model, model_facts, run_facts

    for recipe in (config, *baselines.values()):  # a recipe the model or the text cannot take costs no measuring
        check_recipe(model, recipe, tokenizer=tokenizer, calibration=texts)
    reference_kv = model_costs(model)["kv_bytes_per_token"]
    scores, facts = {}, {}

    def measure(label: str, measured, stage_facts: dict | None = None) -> None:
        print(f"[llmopt calibrate] measuring {label}", file=sys.stderr, flush=True)
        scores[label] = evaluate_model(measured, tokenizer, tasks, limit=args.eval_windows,
                                       reference=scores.get(ORIGINAL))
        facts[label] = {"role": "reference" if label == ORIGINAL else "variant",
                        **model_facts(measured, tokenizer, reference_kv), **(stage_facts or {})}

    measure(ORIGINAL, model)
    for name, baseline in baselines.items():
        measure(name, patch_model(copy.deepcopy(model), baseline, tokenizer=tokenizer, calibration=texts))
        facts[name]["role"] = "baseline"
    patch_model(model, config, tokenizer=tokenizer, calibration=texts,
                observer=lambda stage, stage_model, stage_facts: measure(f"{OURS} ({stage})", stage_model,
                                                                          stage_facts))
    measure(OURS, model, training_minutes(diagnostics(model)))
    run = {**run_facts(args.eval_windows), "model": args.model, "recipe": str(args.config),
           "peak_resident_mib": round(peak_resident_mib())}
    if args.max_memory:
        run["max_memory"] = args.max_memory
    report = Report(ORIGINAL, scores, facts, run=run)
    details, files = describe_diagnostics(diagnostics(model))
    markdown = report.to_markdown() + details
    if args.max_loss is not None:
        markdown += budget_lines(args.max_loss, scores, diagnostics(model))
    print(markdown)
    with tempfile.TemporaryDirectory() as tmp:
        plots = report.write(tmp)
        files.update({path.name: path.read_bytes() for path in plots if path.suffix == ".png"})
    files["llmopt_report.md"] = markdown.encode()
    save_optimized(model, out, tokenizer, files=files,
                   report={"recipe": config.to_dict(), "retention": report.to_dict(),
                           "diagnostics": diagnostics(model)})
    print(f"saved to {out} (peak resident memory {peak_resident_mib():.0f} MiB)", file=sys.stderr)
    return 0


def training_minutes(transforms: dict[str, dict]) -> dict[str, float]:
    """``{"training_minutes": ...}``: the minutes of the training runs (distillation curves) the transforms
    report, for the retention-against-training-time plot; empty if nothing trained."""
    seconds = [value["seconds"] for report in transforms.values() for value in report.values()
               if isinstance(value, dict) and "curve" in value]
    return {"training_minutes": round(sum(seconds) / 60, 1)} if seconds else {}


def describe_diagnostics(transforms: dict[str, dict]) -> tuple[str, dict[str, bytes]]:
    """Markdown for what the transforms reported (scalars, per-layer tables, training runs) and PNG curves."""
    from llmopt.eval.plots import training_curve_png

    lines, files = [], {}
    for transform, report in transforms.items():
        scalars = {key: value for key, value in report.items() if not isinstance(value, (dict, list))}
        if scalars:
            lines += ["", f"{transform}: " + ", ".join(f"{key} {value}" for key, value in scalars.items())]
        for key, value in report.items():
            if isinstance(value, dict) and "curve" in value:
                curve = value["curve"]
                tail = curve[-10:]
                bought = " (all its minutes budget bought)" if value.get("stopped_by_minutes") else ""
                lines += ["", f"{transform} {key}: {value['steps']} steps{bought}, {value['tokens']:,} tokens in "
                              f"{value['seconds']:.0f} s; loss {curve[0]:.4f} → {sum(tail) / len(tail):.4f} "
                              "(mean of the last 10)"]
                files[f"{transform}_{key}_curve.png"] = training_curve_png(curve, f"{transform} {key}")
            elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
                lines += ["", f"{transform} {key} (per layer):", "",
                          "| layer | " + " | ".join(value) + " |", "|---:|" + "---:|" * len(value)]
                for index, row in enumerate(zip(*value.values())):
                    lines.append(f"| {index} | " + " | ".join("–" if v is None else f"{v:.4g}" for v in row) + " |")
    return "\n".join(lines) + "\n", files

