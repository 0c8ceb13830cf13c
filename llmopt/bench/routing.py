"""Token routing vs dense in transformers, router overhead included: the routed checkpoint against itself with
routing switched off (one process, taking turns): prefill of one held-out prompt, greedy decode tokens per second
at a few batch sizes; then the routed checkpoint in vLLM against the original (`vllm_loads`), the same prefill and
greedy decode at batch 1 to 32, where vLLM is installed.

The routed checkpoint is `configs/routing-30.yaml` applied to the bench's model, built once and cached (about ten
minutes of calibration the first time)."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from pathlib import Path

import torch
from torch import nn

from llmopt.bench import throughput
from llmopt.bench.results import Row, SectionResult
from llmopt.bench.timing import Spread, ratio, timed_rounds
from llmopt.routing.router import TokenRouter

DECODE_PROMPT = 128


@torch.no_grad()
def prefill_seconds(model: nn.Module, router: TokenRouter, ids: torch.Tensor, repeats: int,
                    warmup: int) -> dict[str, list[float]]:
    """Seconds of each forward over ``ids [1, length]``, routed and dense, taking turns. Logits of the last
    position only, as `generate()` and vLLM compute them in a prefill."""
    def dense():
        with router.disabled():
            model(ids, use_cache=False, logits_to_keep=1)

    return timed_rounds({"routed": lambda: model(ids, use_cache=False, logits_to_keep=1), "dense": dense},
                        repeats, warmup)


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, router: TokenRouter, ids: torch.Tensor,
                             new_tokens: int) -> dict[str, float]:
    """Greedy decode of `new_tokens` after the prompts ``ids [batch, length]``, prefill excluded (timed apart)."""
    options = {"do_sample": False, "pad_token_id": 0, "use_cache": True}
    result = {}
    for name, scope in (("routed", contextlib.nullcontext), ("dense", router.disabled)):
        with scope():
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **options)
            prefilled = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
            decoding = time.perf_counter() - prefilled - (prefilled - started)
        result[f"{name}_tokens_per_s"] = ids.shape[0] * (new_tokens - 1) / max(decoding, 1e-9)
    return result


@torch.no_grad()
def transformers_speed(bench, checkpoint) -> dict:
    from llmopt.bench.prompts import heldout_tokens
    from llmopt.checkpoint import load_optimized
    from llmopt.record import read_record
    from llmopt.routing.transform import TokenRouting

    settings = bench.settings
    model, tokenizer = load_optimized(checkpoint)
    router = model.model.token_router
    prompt = heldout_tokens(tokenizer, settings.routing_prefill)
    bench.progress(f"routing in transformers: prefill of {settings.routing_prefill} tokens")
    result = {"threads": torch.get_num_threads(),
              "prompt_costs": TokenRouting().cost(model, read_record(model).get("routing"), prompt),
              "prefill": prefill_seconds(model, router, prompt, settings.repeats, settings.warmup), "decode": {}}
    for batch in settings.routing_decode_batches:
        bench.progress(f"routing in transformers: greedy decode at batch {batch}")
        prompts = heldout_tokens(tokenizer, batch * DECODE_PROMPT).view(batch, DECODE_PROMPT)
        result["decode"][batch] = [decode_tokens_per_second(model, router, prompts, settings.decode_tokens)
                                   for _ in range(settings.repeats)]
    return result


def vllm_rows(bench, checkpoint: Path, prefill_bound: str) -> list[Row]:
    """The routed checkpoint in vLLM against the original, on held-out text: the prefill of `routing_prefill`
    tokens (the prompt the transformers rows and `prefill_bound` are measured on), then greedy decode at each of
    `routing_vllm_batches` after `DECODE_PROMPT`-token prompts."""
    from llmopt.bench.vllm_loads import decode_row, measure_loads, prefill_row

    settings = bench.settings
    batches = settings.routing_vllm_batches
    loads = measure_loads(bench, checkpoint, [(1, settings.routing_prefill)]
                          + [(batch, DECODE_PROMPT) for batch in batches], text=True)
    rows = [prefill_row(f"vLLM prefill, {settings.routing_prefill} tokens, batch 1", loads[0], prefill_bound)]
    return rows + [decode_row(f"vLLM greedy decode, batch {batch}, after {DECODE_PROMPT}-token prompts", load)
                   for batch, load in zip(batches, loads[1:], strict=True)]


def run(bench) -> SectionResult:
    settings = bench.settings
    checkpoint = throughput.checkpoint(bench, throughput.RECIPES["routing"])
    result = SectionResult("routing", "Token routing vs dense in transformers and in vLLM (routing-30)")
    speed = transformers_speed(bench, checkpoint)
    prefill = speed["prefill"]
    bound = f"skipped block FLOPs: {1 / (1 - speed['prompt_costs']['flops_skipped']):.2f}×"
    result.rows.append(Row(f"transformers prefill, {settings.routing_prefill} tokens, "
                           f"{speed['prompt_costs']['flops_skipped']:.0%} of block FLOPs skipped", "ms",
                           Spread.of(prefill["dense"]).scaled(1e3), Spread.of(prefill["routed"]).scaled(1e3),
                           ratio(prefill["dense"], prefill["routed"]),
                           bound=bound))
    for batch, runs in speed["decode"].items():
        dense, routed = [r["dense_tokens_per_s"] for r in runs], [r["routed_tokens_per_s"] for r in runs]
        result.rows.append(Row(f"transformers greedy decode, batch {batch}", "tokens/s", Spread.of(dense),
                               Spread.of(routed), ratio(routed, dense)))
    if importlib.util.find_spec("vllm") is not None:
        result.rows += vllm_rows(bench, checkpoint, bound)
    result.notes.append(
        f"{speed['threads']} torch threads, {speed['prompt_costs']['token_sparsity']:.0%} of token×block pairs "
        f"skipped on the prefill prompt; decode after {DECODE_PROMPT}-token prompts, {settings.decode_tokens} new "
        "tokens, prefill excluded, rows of a batch padded to the most kept tokens.")
    result.raw = {"checkpoint": str(checkpoint), "transformers": speed}
    return result
