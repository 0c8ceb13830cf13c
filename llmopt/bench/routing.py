"""Token routing vs dense in transformers, router overhead included: the routed checkpoint against itself with
routing switched off (one process, taking turns): prefill of one held-out prompt, greedy decode tokens per second
at a few batch sizes. (vLLM: the throughput section.)

The routed checkpoint is `configs/routing-30.yaml` applied to the bench's model, built once and cached (about ten
minutes of calibration the first time)."""

from __future__ import annotations

import torch

from llmopt.bench import throughput
from llmopt.bench.results import Row, SectionResult
from llmopt.bench.timing import Spread, ratio

DECODE_PROMPT = 128


@torch.no_grad()
def transformers_speed(bench, checkpoint) -> dict:
    from llmopt.bench.sparse_attention import heldout_tokens
    from llmopt.checkpoint import load_optimized
    from llmopt.record import read_record
    from llmopt.routing.bench import decode_tokens_per_second, prefill_seconds
    from llmopt.routing.transform import TokenRouting

    settings = bench.settings
    model, tokenizer = load_optimized(checkpoint)
    router = model.model.token_router
    prompt = heldout_tokens(tokenizer, settings.routing_prefill)
    bench.progress(f"routing in transformers: prefill of {settings.routing_prefill} tokens")
    result = {"threads": torch.get_num_threads(),
              "prompt_costs": TokenRouting().cost(model, read_record(model).get("routing"), prompt),
              "prefill": prefill_seconds(model, router, prompt, settings.repeats), "decode": {}}
    for batch in settings.routing_decode_batches:
        bench.progress(f"routing in transformers: greedy decode at batch {batch}")
        prompts = heldout_tokens(tokenizer, batch * DECODE_PROMPT).view(batch, DECODE_PROMPT)
        result["decode"][batch] = [decode_tokens_per_second(model, router, prompts, settings.decode_tokens)
                                   for _ in range(settings.repeats)]
    return result


def run(bench) -> SectionResult:
    settings = bench.settings
    checkpoint = throughput.checkpoint(bench, throughput.RECIPES["routing"])
    result = SectionResult("routing", "Token routing vs dense in transformers (routing-30)")
    speed = transformers_speed(bench, checkpoint)
    prefill = speed["prefill"]
    result.rows.append(Row(f"transformers prefill, {settings.routing_prefill} tokens, "
                           f"{speed['prompt_costs']['flops_skipped']:.0%} of block FLOPs skipped", "ms",
                           Spread.of(prefill["dense"]).scaled(1e3), Spread.of(prefill["routed"]).scaled(1e3),
                           ratio(prefill["dense"], prefill["routed"]),
                           bound=f"blocks alone: {1 / (1 - speed['prompt_costs']['flops_skipped']):.2f}× "
                                 "(the LM head does not shrink)"))
    for batch, runs in speed["decode"].items():
        dense, routed = [r["dense_tokens_per_s"] for r in runs], [r["routed_tokens_per_s"] for r in runs]
        result.rows.append(Row(f"transformers greedy decode, batch {batch}", "tokens/s", Spread.of(dense),
                               Spread.of(routed), ratio(routed, dense)))
    result.notes.append(
        f"{speed['threads']} torch threads, {speed['prompt_costs']['token_sparsity']:.0%} of token×block pairs "
        f"skipped on the prefill prompt; decode after {DECODE_PROMPT}-token prompts, {settings.decode_tokens} new "
        "tokens, prefill excluded, rows of a batch padded to the most kept tokens.")
    result.raw = {"checkpoint": str(checkpoint), "transformers": speed}
    return result
