"""The vLLM engines of a bench run, started once per model and shared by the capacity, decode and serving
sections: capacity and decode at `capacity_gib` of KV space, serving at a fixed KV budget in bytes (one engine per
model at that budget in `--quick`). Only the tasks of the sections chosen run (serving needs decode: its step-time
model is fitted on the decode measurements)."""

from __future__ import annotations

from llmopt.bench.bounds import ModelCost
from llmopt.bench.vllm_engine import run_engine

ROLES = ("original", "optimized")


def serving_budget(original: ModelCost, settings) -> int:
    """KV bytes that hold `serving_concurrency` sequences of the original's longest serving load: the original is
    memory-limited there and the compressed model fits its KV ratio times as many."""
    longest = max(prompt + output for _, prompt, output in settings.serving_loads)
    return original.kv_bytes_per_token * longest * settings.serving_concurrency


def _capacity(result: dict, kv_bytes: int) -> dict:
    return {key: result[key] for key in ("tokens", "num_blocks", "block_size")} | {"kv_bytes": kv_bytes}


def vllm_measurements(bench) -> dict[str, dict]:
    """Per role ("original", "optimized"): ``capacity``, ``decode`` (tasks) and ``serving`` (capacity at the
    budget and tasks); measured on first use, then shared."""
    if "vllm" in bench.shared:
        return bench.shared["vllm"]
    settings = bench.settings
    budget = serving_budget(bench.cost(bench.original()), settings)
    decode = [{"kind": "decode", "batch": b, "prompt": p, "output": settings.decode_tokens,
               "warmup": settings.warmup, "repeats": settings.repeats} for b, p in settings.decode_loads
              if {"decode", "serving"} & set(bench.sections)]
    serve = [{"kind": "serve", "requests": n, "prompt": p, "output": o, "repeats": settings.serving_repeats}
             for n, p, o in settings.serving_loads if "serving" in bench.sections]
    measured = {}
    for role, directory in zip(ROLES, (bench.original(), bench.optimized()), strict=True):
        base = {"model": str(directory), "dtype": bench.vllm_dtype, "max_model_len": settings.max_model_len,
                "max_num_seqs": settings.max_num_seqs}
        if settings.capacity_gib is None:
            bench.progress(f"vLLM, {role} model: engine at a {budget / 2**20:.1f} MiB KV budget "
                           f"({len(decode)} decode loads, {len(serve)} serving loads)")
            capacity = serving = run_engine({**base, "kv_cache_bytes": budget, "tasks": decode + serve}, bench.log)
            capacity_bytes = budget
        else:
            bench.progress(f"vLLM, {role} model: engine at {settings.capacity_gib} GiB of KV space "
                           f"({len(decode)} decode loads)")
            capacity = run_engine({**base, "kv_space_gib": settings.capacity_gib, "tasks": decode}, bench.log)
            capacity_bytes = settings.capacity_gib * 2**30
            serving = None
            if serve:
                bench.progress(f"vLLM, {role} model: engine at a {budget / 2**20:.1f} MiB KV budget "
                               f"({len(serve)} serving loads)")
                serving = run_engine({**base, "kv_cache_bytes": budget, "tasks": serve}, bench.log)
        measured[role] = {
            "model": str(directory),
            "capacity": _capacity(capacity, capacity_bytes),
            "decode": [t for t in capacity["tasks"] if t["kind"] == "decode"],
            "serving": serving and {**_capacity(serving, budget),
                                    "tasks": [t for t in serving["tasks"] if t["kind"] == "serve"]},
        }
    bench.shared["vllm"] = measured
    return measured
