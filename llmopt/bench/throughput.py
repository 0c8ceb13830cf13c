"""vLLM offline throughput on held-out text, the original against each optimized checkpoint, in one run: all
requests submitted at once, chunked prefill on, every request generating exactly its output length. Each load
runs on every model in turn (the same prompts), so the ratios compare models under the same conditions.

Checkpoints: the bench's KV-compressed model, and `configs/routing-30.yaml`, `configs/sparse-attention.yaml`
and `configs/kv-routing-sparse.yaml` applied to the bench's model (built once and cached; routing calibrates
for about ten minutes the first time)."""

from __future__ import annotations

from pathlib import Path

from llmopt.bench.results import Row, SectionResult
from llmopt.bench.timing import Spread, ratio
from llmopt.bench.vllm_engine import run_engine

RECIPES = {"routing": "routing-30.yaml", "sparse": "sparse-attention.yaml",
           "kv+routing+sparse": "kv-routing-sparse.yaml"}


def checkpoint(bench, recipe: str) -> Path:
    """`recipe` applied to the bench's model, built once and cached (its calibration time goes to the bench)."""
    from llmopt.bench.compressed import cached_optimized

    key = f"checkpoint:{recipe}"
    if key not in bench.shared:
        bench.progress(f"optimized model: {bench.model} with {recipe} (built once, then cached)")
        bench.shared[key], seconds = cached_optimized(bench.model, bench.recipe_dir / recipe)
        if seconds is not None:
            bench.calibration_seconds[Path(recipe).stem] = seconds
    return bench.shared[key]


def models(bench) -> dict[str, Path]:
    return {"original": bench.original(), "kv": bench.optimized(),
            **{name: checkpoint(bench, recipe) for name, recipe in RECIPES.items()}}


def run(bench) -> SectionResult:
    settings = bench.settings
    result = SectionResult("throughput", "vLLM throughput on held-out text, original vs each optimized checkpoint")
    measured: dict[str, dict[tuple, dict]] = {}
    for name, directory in models(bench).items():
        tasks = [{"kind": "text", "requests": n, "prompt": p, "output": o, "repeats": settings.repeats}
                 for n, p, o in settings.throughput_loads]
        bench.progress(f"vLLM throughput: {name} ({len(tasks)} loads)")
        job = {"model": str(directory), "dtype": bench.vllm_dtype, "max_num_seqs": settings.max_num_seqs,
               "max_model_len": max(p + o for _, p, o in settings.throughput_loads), "kv_space_gib": 2,
               "tasks": tasks}
        measured[name] = {(t["requests"], t["prompt"], t["output"]): t for t in run_engine(job, bench.log)["tasks"]}
    original = measured.pop("original")
    for load, base in original.items():
        requests, prompt, output = load
        for name, runs in measured.items():
            seconds = runs[load]["seconds"]
            for unit, amount in (("requests/s", requests), ("output tokens/s", requests * output)):
                result.rows.append(Row(f"{name}: {requests} × ({prompt} + {output}) tokens", unit,
                                       Spread.of([amount / s for s in base["seconds"]]),
                                       Spread.of([amount / s for s in seconds]), ratio(base["seconds"], seconds)))
    skipped = {load: task["skipped_share"] for load, task in measured["routing"].items() if "skipped_share" in task}
    result.notes += [
        (f"{bench.vllm_dtype}, eager, chunked prefill on, prefix caching off, 2 GiB of KV space; every request "
         "generates exactly its output length. Ratio > 1: the checkpoint is faster."),
        ("Routing skips queries, attention, o_proj and MLP of the skipped tokens (they still write K/V); sparse "
         "attention engages on prompts of at least its min_seq_len tokens only; KV compression shrinks the cache, "
         "which pays where the KV cache limits the batch (see the serving section)."),
    ]
    for load, shares in skipped.items():
        mean = sum(shares.values()) / len(shares)
        result.notes.append(f"routing, load {load}: {mean:.0%} of the routed blocks' tokens skipped on average.")
    result.raw = {name: {str(load): task for load, task in runs.items()} for name, runs in
                  {"original": original, **measured}.items()}
    return result
