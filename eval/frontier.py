"""The KV frontier: held-out perplexity against KV bytes per token, for per-layer allocations and uniform ones.

For each fold method (ours: the calibrated fold; the baseline: mean-pool) every layer is folded once, each layer's
sensitivity is measured by splicing its folded attention alone into the original (`llmopt.kv.budget`), and the
greedy path (`llmopt.budget.greedy_path`) is cut after k layers; each cut is measured on the held-out split of the
packaged corpora, which neither the folds nor the sensitivities saw. Cutting after every layer is the uniform model.

    python -m llmopt.eval.frontier --out out/frontier [--layers 6 10 15 20 25 30] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from llmopt.arch import adapter_for, attention_shape
from llmopt.budget import Ladder, greedy_path
from llmopt.calibration import calibration_windows
from llmopt.kv.budget import set_attention, splice_sensitivity
from llmopt.kv.config import KVCompressionConfig
from llmopt.patch import patch_model

CORPORA = ("wikipedia", "news")


def folded_attention(model: nn.Module, config: KVCompressionConfig, texts: list[str], tokenizer) -> list[nn.Module]:
    """Every layer's attention after `config`'s fold of the whole model (a copy; `model` is untouched)."""
    folded = patch_model(copy.deepcopy(model), config, tokenizer=tokenizer, calibration=texts)
    return adapter_for(folded).attention_modules(folded)


def kv_frontier(model: nn.Module, tokenizer, texts: list[str], layer_counts: dict[str, list[int]], eval_windows: int,
                calibration_tokens: int = 16384, search_tokens: int = 4096) -> dict:
    """``{"original": point, method: [point per count]}``, each point ``{"layers", "kv_bytes_per_token",
    "<corpus>-ppl"}``: `model` with the `count` least sensitive layers (KL per layer on `search_tokens` of
    calibration text after the fold's) folded 3 → 1 by that method, on `eval_windows` held-out windows."""
    from llmopt.eval.suite import perplexity_score

    adapter, shape = adapter_for(model), attention_shape(model.config)
    layers = list(adapter.decoder_layers(model))
    originals = adapter.attention_modules(model)
    recipe = KVCompressionConfig(num_kv_heads=1, calibration_tokens=calibration_tokens)
    fold_windows = recipe.calibration_tokens // recipe.seq_len
    search = calibration_windows(texts, tokenizer, recipe.seq_len, recipe.calibration_tokens + search_tokens)
    search = search[fold_windows:]
    head_bytes = 2 * shape.head_dim * 2

    def point(count: int) -> dict:
        scores = {f"{corpus}-ppl": perplexity_score(model, tokenizer, corpus, eval_windows).value
                  for corpus in CORPORA}
        return {"layers": count, "kv_bytes_per_token": head_bytes * (shape.num_kv_heads * shape.num_layers
                                                                     - (shape.num_kv_heads - 1) * count), **scores}

    result: dict = {"original": point(0), "search_windows": len(search)}
    for method, counts in layer_counts.items():
        started = time.perf_counter()
        changed = folded_attention(model, dataclasses.replace(recipe, method=method), texts, tokenizer)
        sensitivity = splice_sensitivity(model, layers, adapter.attention, originals, changed, search)
        path = list(greedy_path([Ladder((0.0, 1.0), (0.0, kl)) for kl in sensitivity]))
        points = []
        for count in counts:
            rungs = path[count - 1]
            set_attention(layers, adapter.attention,
                          [changed[i] if rung else originals[i] for i, rung in enumerate(rungs)])
            points.append(point(count))
            print(f"[frontier] {method} {points[-1]}", file=sys.stderr, flush=True)
        set_attention(layers, adapter.attention, originals)
        result[method] = {"points": points, "sensitivity_kl": sensitivity, "order": [
            next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
            for before, after in zip([[0] * len(layers), *path], path)], "seconds": time.perf_counter() - started}
    return result


def frontier_markdown(result: dict) -> str:
    original = result["original"]
    lines = ["| allocation | layers 3→1 | KV bytes/token | KV smaller | " + " | ".join(
        f"{c}-ppl (×)" for c in CORPORA) + " |", "|---|---:|---:|---:|" + "---:|" * len(CORPORA)]

    def row(name: str, p: dict) -> str:
        ratios = " | ".join(f"{p[f'{c}-ppl']:.2f} (×{p[f'{c}-ppl'] / original[f'{c}-ppl']:.3f})" for c in CORPORA)
        return (f"| {name} | {p['layers']} | {p['kv_bytes_per_token']:,} | "
                f"{original['kv_bytes_per_token'] / p['kv_bytes_per_token']:.2f}× | {ratios} |")

    lines.append(row("original", original))
    for method, name in (("calibrated", "ours per-layer"), ("mean-pool", "mean-pool per-layer")):
        for p in result.get(method, {}).get("points", []):
            uniform = p["layers"] == len(result[method]["sensitivity_kl"])
            lines.append(row(f"{name}{' (= uniform)' if uniform else ''}", p))
    return "\n".join(lines) + "\n"


def frontier_png(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original = result["original"]
    figure, axes = plt.subplots(1, len(CORPORA), figsize=(6 * len(CORPORA), 4.5))
    for axis, corpus in zip(axes, CORPORA):
        key = f"{corpus}-ppl"
        for method, label, style in (("calibrated", "ours per-layer (calibrated fold)", "o-"),
                                     ("mean-pool", "per-layer mean-pool", "s--")):
            if method not in result:
                continue
            points = result[method]["points"]
            axis.plot([original["kv_bytes_per_token"] / p["kv_bytes_per_token"] for p in points],
                      [p[key] / original[key] for p in points], style, label=label)
            last = points[-1]
            if last["layers"] == len(result[method]["sensitivity_kl"]):
                axis.plot([original["kv_bytes_per_token"] / last["kv_bytes_per_token"]], [last[key] / original[key]],
                          "k*", ms=12, label=f"uniform 3→1 ({method})")
        axis.set(xlabel="KV cache smaller (×)", ylabel=f"held-out {corpus} perplexity (× original)", yscale="log",
                 title=f"KV frontier, {corpus} held-out")
        axis.axhline(1.0, color="grey", lw=0.6)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    from llmopt.data.corpora import calibration_texts
    from llmopt.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True, help="a new directory for frontier.json, .md and .png")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 10, 15, 20, 25, 30],
                        help="cut the path after this many layers (ours)")
    parser.add_argument("--mean-pool-layers", type=int, nargs="+", default=[3, 6, 10, 15, 20, 25, 30])
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 512 tokens per corpus")
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="the calibrated fold's")
    parser.add_argument("--search-tokens", type=int, default=4096, help="the sensitivities'")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    model, tokenizer = load_model(args.model)
    result = kv_frontier(model, tokenizer, calibration_texts(), {"calibrated": args.layers,
                                                                 "mean-pool": args.mean_pool_layers},
                         args.eval_windows, args.calibration_tokens, args.search_tokens)
    (out / "frontier.json").write_text(json.dumps(result, indent=2))
    (out / "frontier.md").write_text(frontier_markdown(result))
    frontier_png(result, out / "frontier.png")
    print(frontier_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
