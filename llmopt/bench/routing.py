"""Token routing vs dense, router overhead included: in transformers the routed checkpoint against itself with
routing switched off (one process, taking turns): prefill of one held-out prompt, greedy decode tokens per second
at a few batch sizes; in vLLM the offline throughput (chunked prefill on) of the original and the routed
checkpoint on the same held-out prompts, with the share of tokens each routed block skipped there.

The routed checkpoint is `configs/routing-30.yaml` applied to the bench's model, built once and cached (about ten
minutes of calibration the first time)."""

from __future__ import annotations

import statistics

import torch

from llmopt.bench.results import Row, SectionResult
from llmopt.bench.timing import Spread, ratio
from llmopt.bench.vllm_engine import run_engine

RECIPE = "routing-30.yaml"
DECODE_PROMPT = 128


def routed_checkpoint(bench):
    from llmopt.bench.compressed import cached_optimized

    if "routed" not in bench.shared:
        bench.progress(f"routed model: {bench.model} with {RECIPE} (built once, then cached)")
        bench.shared["routed"], seconds = cached_optimized(bench.model, bench.recipe_dir / RECIPE)
        if seconds is not None:
            bench.calibration_seconds[RECIPE.removesuffix(".yaml")] = seconds
    return bench.shared["routed"]


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


def vllm_throughput(bench, checkpoint) -> dict:
    settings = bench.settings
    requests, prompt, output = settings.routing_throughput
    task = {"kind": "text", "requests": requests, "prompt": prompt, "output": output, "repeats": settings.repeats}
    measured = {}
    for role, directory in (("original", bench.original()), ("routed", checkpoint)):
        bench.progress(f"routing in vLLM: {role}, {requests} requests of {prompt} + {output} tokens")
        job = {"model": str(directory), "dtype": "bfloat16", "max_model_len": prompt + output,
               "max_num_seqs": requests, "kv_space_gib": 1, "tasks": [task]}
        measured[role] = run_engine(job, bench.log)["tasks"][0]
    return measured


def run(bench) -> SectionResult:
    settings = bench.settings
    checkpoint = routed_checkpoint(bench)
    result = SectionResult("routing", "Token routing vs dense (routing-30), transformers and vLLM")
    speed = transformers_speed(bench, checkpoint)
    prefill = speed["prefill"]
    result.rows.append(Row(f"transformers prefill, {settings.routing_prefill} tokens, "
                           f"{speed['prompt_costs']['flops_skipped']:.0%} of block FLOPs skipped", "ms",
                           Spread.of(prefill["dense"]).scaled(1e3), Spread.of(prefill["routed"]).scaled(1e3),
                           ratio(prefill["dense"], prefill["routed"]),
                           bound=f"1/(1 − skipped) {1 / (1 - speed['prompt_costs']['flops_skipped']):.2f}×"))
    for batch, runs in speed["decode"].items():
        dense, routed = [r["dense_tokens_per_s"] for r in runs], [r["routed_tokens_per_s"] for r in runs]
        result.rows.append(Row(f"transformers greedy decode, batch {batch}", "tokens/s", Spread.of(dense),
                               Spread.of(routed), ratio(routed, dense)))
    requests, prompt, output = settings.routing_throughput
    served = vllm_throughput(bench, checkpoint)
    seconds = {role: served[role]["seconds"] for role in served}
    result.rows += [
        Row(f"vLLM throughput, {requests} × ({prompt} + {output}) tokens of held-out text", "requests/s",
            Spread.of([requests / s for s in seconds["original"]]), Spread.of([requests / s for s in seconds["routed"]]),
            ratio(seconds["original"], seconds["routed"])),
        Row("vLLM output tokens/s, same run", "tokens/s",
            Spread.of([requests * output / s for s in seconds["original"]]),
            Spread.of([requests * output / s for s in seconds["routed"]]), ratio(seconds["original"], seconds["routed"])),
    ]
    skipped = served["routed"].get("skipped_share", {})
    shares = ", ".join(f"{block}: {share:.0%}" for block, share in sorted(skipped.items(), key=lambda kv: int(kv[0])))
    result.notes += [
        (f"transformers: {speed['threads']} torch threads, {speed['prompt_costs']['token_sparsity']:.0%} of "
         f"token×block pairs skipped on the prefill prompt; decode after {DECODE_PROMPT}-token prompts, "
         f"{settings.decode_tokens} new tokens, prefill excluded, rows of a batch padded to the most kept tokens."),
        ("vLLM: bf16, eager, chunked prefill on, prefix caching off; skipped tokens still write their K/V, so the KV "
         f"cache is the original's. Share of tokens each routed block skipped in the vLLM run: {shares or '–'}"
         + (f" (mean {statistics.mean(skipped.values()):.0%})." if skipped else ".")),
    ]
    result.raw = {"checkpoint": str(checkpoint), "transformers": speed, "vllm": served}
    return result
