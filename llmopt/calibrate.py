"""`llmopt calibrate`: apply a recipe to a model, measure it against the original, save it atomically."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import torch

from llmopt.arch import attention_shape
from llmopt.checkpoint import save_optimized
from llmopt.config import OptimizationConfig
from llmopt.data.corpora import CORPORA, calibration_texts, corpus_split
from llmopt.data.windows import read_texts, token_windows
from llmopt.kv.transform import compress_kv_heads
from llmopt.models import load_model
from llmopt.patch import patch_model

EVAL_SEQ_LEN = 512


def _perplexities(model, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    from llmopt.eval.perplexity import perplexity

    return {name: perplexity(model, windows) for name, windows in heldout.items()}


def run_calibrate(args: argparse.Namespace) -> int:
    config = OptimizationConfig.from_yaml(args.config)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (llmopt never overwrites a model)")
    model, tokenizer = load_model(args.model)
    texts = read_texts(args.calibration) if args.calibration else calibration_texts()
    heldout = {name: token_windows(corpus_split(name, "heldout"), tokenizer, EVAL_SEQ_LEN, args.eval_windows)
               for name in CORPORA}
    kv_bytes = {"original": attention_shape(model.config).kv_bytes_per_token(2)}
    results = {"original": _perplexities(model, heldout)}
    if config.kv is not None:
        for method in args.baseline:
            baseline = dataclasses.replace(config.kv, method=method, healing=None)
            results[method] = _perplexities(compress_kv_heads(copy.deepcopy(model), baseline), heldout)
    started = time.perf_counter()
    if config.kv is not None:
        label = "ours" if config.kv.method == "calibrated" else config.kv.method

        def measure(folded) -> None:
            results[f"{label} (training-free)" if config.kv.healing else label] = _perplexities(folded, heldout)

        compress_kv_heads(model, config.kv, tokenizer=tokenizer, calibration=texts, after_fold=measure)
        if config.kv.healing is not None:
            results[f"{label} (healed)"] = _perplexities(model, heldout)
    if config.routing is not None or config.sparse is not None:
        rest = OptimizationConfig(routing=config.routing, sparse=config.sparse)
        patch_model(model, rest, tokenizer=tokenizer, calibration=texts)
    seconds = time.perf_counter() - started
    kv_bytes["optimized"] = attention_shape(model.config).kv_bytes_per_token(2)
    summary = {"model": args.model, "config": config.to_dict(), "seconds": round(seconds, 1),
               "kv_bytes_per_token_bf16": kv_bytes, "perplexity": results,
               "record": model.config.llmopt}
    report = format_report(summary)
    print(report)
    extras = {"llmopt_report.json": json.dumps(summary, indent=2).encode(), "llmopt_report.md": report.encode()}
    curve = _healing_curve(model.config.llmopt)
    if curve is not None:
        extras["healing_curve.png"] = curve
    save_optimized(model, out, tokenizer, extras=extras)
    print(f"saved to {out}", file=sys.stderr)
    return 0


def format_report(summary: dict) -> str:
    kv = summary["kv_bytes_per_token_bf16"]
    lines = [f"## llmopt calibrate: {summary['model']}", "",
             f"KV cache bytes/token (bf16): {kv['original']:,} → {kv['optimized']:,} "
             f"({kv['original'] / kv['optimized']:.1f}× smaller); transform time {summary['seconds']:.0f} s "
             f"({_stage_times(summary['record'])})", ""]
    results = summary["perplexity"]
    corpora = list(results["original"])
    lines += ["| model | " + " | ".join(f"{c} ppl | × original" for c in corpora) + " |",
              "|---|" + "---:|---:|" * len(corpora)]
    for name, values in results.items():
        cells = " | ".join(f"{values[c]:.2f} | {values[c] / results['original'][c]:.2f}" for c in corpora)
        lines.append(f"| {name} | {cells} |")
    for transform in summary["record"]["transforms"]:
        layers = transform.get("layers")
        if layers:
            lines += ["", "Per-layer relative RMS error on windows held out from the fit (key, value, o_proj refit):",
                      "", "| layer | key | value | refit |", "|---:|---:|---:|---:|"]
            for index, row in enumerate(zip(layers["key_error"], layers["value_error"], layers["refit_residual"])):
                lines.append(f"| {index} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in row) + " |")
        healing = transform.get("healing")
        if healing:
            curve = healing["kl_curve"]
            lines += ["", f"Healing: {healing['steps']} steps in {healing['seconds']:.0f} s, "
                          f"KL {curve[0]:.4f} → {sum(curve[-10:]) / len(curve[-10:]):.4f} (mean of the last 10)"]
    return "\n".join(lines)


def _stage_times(record: dict) -> str:
    stages = []
    for transform in record["transforms"]:
        stages.append(f"{transform['transform']} fold {transform['fold_seconds']:.0f} s")
        if transform.get("healing"):
            stages.append(f"healing {transform['healing']['seconds']:.0f} s")
    return ", ".join(stages)


def _healing_curve(record: dict) -> bytes | None:
    healing = next((t["healing"] for t in record["transforms"] if t.get("healing")), None)
    if healing is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.5))
    curve = healing["kl_curve"]
    steps = range(1, len(curve) + 1)
    axis.plot(steps, curve, lw=0.8, alpha=0.5, label="per step")
    smooth = [sum(curve[max(0, i - 9):i + 1]) / len(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
    axis.plot(steps, smooth, lw=1.5, label="mean of 10")
    axis.set(xlabel="step", ylabel="KL(original ‖ compressed) per token", yscale="log", title="KV healing")
    axis.legend()
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
