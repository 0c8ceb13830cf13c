"""KV bytes per token (from the configs) and vLLM's KV capacity (read from the engine: blocks × block size) in the
same KV space, original vs KV-compressed; the capacity ratio must match the KV-head ratio (the heads of all layers
summed: a checkpoint may keep its own count in each layer)."""

from __future__ import annotations

from llmopt.bench.report import size
from llmopt.bench.results import Row, SectionResult
from llmopt.bench.vllm_runs import vllm_measurements

TOLERANCE = 0.03


def head_ratio(bench) -> float:
    from transformers import AutoConfig

    from llmopt.kv.config import kv_heads_per_layer

    original, optimized = (sum(kv_heads_per_layer(AutoConfig.from_pretrained(d))) for d in (bench.original(),
                                                                                           bench.optimized()))
    return original / optimized


def run(bench) -> SectionResult:
    measured = vllm_measurements(bench)
    costs = [bench.cost(bench.original()), bench.cost(bench.optimized())]
    heads = head_ratio(bench)
    original, optimized = (measured[role]["capacity"] for role in ("original", "optimized"))
    capacity = optimized["tokens"] / original["tokens"]
    within = abs(capacity / heads - 1) <= TOLERANCE
    space = size(original["kv_bytes"])
    result = SectionResult("kv-capacity", "KV cache: bytes per token and vLLM capacity")
    result.rows += [
        Row(f"KV bytes per token, {bench.vllm_dtype} (config)", "bytes", costs[0].kv_bytes_per_token,
            costs[1].kv_bytes_per_token, costs[0].kv_bytes_per_token / costs[1].kv_bytes_per_token,
            bound=f"head ratio {heads:g}×"),
        Row(f"vLLM KV capacity in {space}", "tokens", original["tokens"], optimized["tokens"], capacity,
            bound=f"head ratio {heads:g}×",
            check=f"{'✓' if within else '✗'} within {TOLERANCE:.0%} of {heads:g}× ({capacity / heads - 1:+.1%})"),
    ]
    result.notes += [
        (f"Capacity = KV blocks × block size as the engine allocated them ({original['num_blocks']:,} vs "
        f"{optimized['num_blocks']:,} blocks of {original['block_size']}) in the same {space} "
        f"({original['kv_bytes']:,} bytes) of {bench.vllm_dtype} KV cache."),
        (f"Bytes per token the engine achieved: {original['kv_bytes'] / original['tokens']:,.0f} vs "
        f"{optimized['kv_bytes'] / optimized['tokens']:,.0f} (config: {costs[0].kv_bytes_per_token:,} vs "
        f"{costs[1].kv_bytes_per_token:,}; whole blocks round the engine's figure)."),
    ]
    result.raw = {"capacity": {"original": original, "optimized": optimized}, "head_ratio": heads}
    return result
