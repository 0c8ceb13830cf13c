"""Wall-clock of a routed checkpoint against itself with routing switched off, in one process, alternating runs
(router overhead included): prefill of one long prompt, and greedy decode tokens per second.

``python -m llmopt.routing.bench CHECKPOINT [--length 2048] [--repeats 3] [--decode-batches 1 8]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn

from llmopt.routing.router import TokenRouter


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


@torch.no_grad()
def prefill_seconds(model: nn.Module, router: TokenRouter, ids: torch.Tensor, repeats: int) -> dict:
    """Seconds of each forward over ``ids [1, length]``, routed and dense, alternating, and the ratio of their
    medians."""
    routed, dense = [], []
    model(ids[:, :64])  # warm-up
    for _ in range(repeats):
        routed.append(_timed(lambda: model(ids, use_cache=False)))
        with router.disabled():
            dense.append(_timed(lambda: model(ids, use_cache=False)))
    return {"routed": routed, "dense": dense, "speedup": statistics.median(dense) / statistics.median(routed)}


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, router: TokenRouter, ids: torch.Tensor,
                             new_tokens: int) -> dict[str, float]:
    """Greedy decode of `new_tokens` after the prompts ``ids [batch, length]``, prefill excluded (timed apart)."""
    options = {"do_sample": False, "pad_token_id": 0, "use_cache": True}
    result = {}
    for name, scope in (("routed", contextlib.nullcontext), ("dense", router.disabled)):
        with scope():
            prefill = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **options))
            total = _timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                  **options))
        result[f"{name}_tokens_per_s"] = ids.shape[0] * (new_tokens - 1) / max(total - prefill, 1e-9)
    result["speedup"] = result["routed_tokens_per_s"] / result["dense_tokens_per_s"]
    return result


def main() -> None:
    from llmopt.checkpoint import load_optimized
    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows
    from llmopt.record import read_record
    from llmopt.routing.transform import TokenRouting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tokenizer = load_optimized(args.checkpoint)
    router = model.model.token_router
    text = corpus_split("wikipedia", "heldout")
    prompt = token_windows(text, tokenizer, args.length, 1)
    results: dict = {"threads": torch.get_num_threads(),
                     "prompt_costs": TokenRouting().cost(model, read_record(model).get("routing"), prompt),
                     "prefill": prefill_seconds(model, router, prompt, args.repeats)}
    for batch in args.decode_batches:
        prompts = token_windows(text, tokenizer, 128, batch)
        results[f"decode_batch{batch}"] = decode_tokens_per_second(model, router, prompts, args.new_tokens)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
