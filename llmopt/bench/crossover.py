"""The dense/sparse crossover inside vLLM: llmopt's sparse paths against vLLM's own C++ CPU attention kernel, on
this machine, at a few context lengths; the lengths from which sparse wins are stored for the plugin
(`llmopt.vllm_plugin.crossover`).

q/k/v come from layers of the default model on held-out Wikipedia (the selector picks the density it picks in
use), written into a paged cache by vLLM's own kernel, in the dtype vLLM serves in and with the threads its
worker gets (vLLM keeps one core of the machine for its scheduler: one thread on 2 cores). Prefill: the whole prompt as
one chunk, vLLM's kernel against `paged_sparse_prefill` (selection included). Decode: one query at the end of the
context, `DECODE_STEPS` steps, vLLM's kernel against `paged_sparse_decode` with its page bounds kept (as in
serving, where each bound is computed once). The two take turns in every round; times are summed over the layers.
"""

from __future__ import annotations

import math
import os

import torch

from llmopt.bench.prompts import heldout_tokens
from llmopt.bench.results import Row, SectionResult
from llmopt.bench.sparse_attention import capture_qkv
from llmopt.bench.timing import Spread, ratio, timed_rounds

BLOCK_SIZE = 128  # vLLM's CPU block size
DECODE_STEPS = 10


def paged(k: torch.Tensor, v: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache ``[blocks, Hkv, BLOCK_SIZE, 2·D]``, block table ``[blocks]`` int32) holding k/v ``[Hkv, L, D]``,
    written by vLLM's kernel."""
    from vllm import _custom_ops as ops

    hkv, length, d = k.shape
    blocks = math.ceil(length / BLOCK_SIZE)
    cache = torch.zeros(blocks, hkv, BLOCK_SIZE, 2 * d, dtype=k.dtype)
    key_cache, value_cache = cache.view(blocks, hkv, 2 * BLOCK_SIZE, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(), key_cache,
                                   value_cache, torch.arange(length), isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return cache, torch.arange(blocks, dtype=torch.int32)


def vllm_attention(isa: str, cache: torch.Tensor, table: torch.Tensor, length: int, query_len: int,
                   q: torch.Tensor, scale: float):
    """vLLM's CPU kernel for one request of `query_len` queries ending a `length`-token context: a function of
    the query ``[query_len, H, D]`` (like `q`) writing into `out`, the schedule built once (vLLM builds it once
    per step for all layers)."""
    from llmopt.vllm_plugin.cpu_kernel import kernel_attention, kernel_metadata

    blocks, hkv, _, two_d = cache.shape
    key_cache, value_cache = cache.view(blocks, hkv, 2 * BLOCK_SIZE, two_d // 2).chunk(2, dim=2)
    starts = torch.tensor([0, query_len], dtype=torch.int32)
    seq_lens = torch.tensor([length], dtype=torch.int32)
    metadata = kernel_metadata(q[:query_len], key_cache, starts, seq_lens, isa)

    def attend(query: torch.Tensor, out: torch.Tensor) -> None:
        kernel_attention(query, key_cache, value_cache, out, starts, seq_lens, table[None], scale, metadata)
    return attend


@torch.no_grad()
def time_length(qkv: list, config, dtype: torch.dtype, isa: str, repeats: int, warmup: int) -> dict:
    """Seconds (summed over layers) of prefill and of `DECODE_STEPS` decode steps, vLLM's kernel and llmopt's
    sparse path taking turns; the share of the cache's pages a decode step reads."""
    from llmopt.vllm_plugin.paged_decode import PagedKeyBounds, paged_sparse_decode
    from llmopt.vllm_plugin.sparse_chunk import paged_sparse_prefill

    layers = []
    for q, k, v in qkv:
        q = q[0].transpose(0, 1).to(dtype).contiguous()  # [L, H, D]
        cache, table = paged(k[0].to(dtype), v[0].to(dtype), isa)
        length, _, d = q.shape
        scale = d ** -0.5
        layers.append({"q": q, "cache": cache, "table": table, "length": length, "scale": scale,
                       "prefill": vllm_attention(isa, cache, table, length, length, q, scale),
                       "decode": vllm_attention(isa, cache, table, length, 1, q, scale),
                       "bounds": PagedKeyBounds(cache, config.decode_page_size)})
    out = torch.empty_like(layers[0]["q"])

    def dense_prefill():
        for layer in layers:
            layer["prefill"](layer["q"], out)

    def sparse_prefill():
        for layer in layers:
            paged_sparse_prefill(layer["q"], layer["cache"], layer["table"], layer["length"], config,
                                 layer["scale"])

    def dense_decode():
        for _ in range(DECODE_STEPS):
            for layer in layers:
                layer["decode"](layer["q"][-1:], out[-1:])

    def sparse_decode():
        for _ in range(DECODE_STEPS):
            for layer in layers:
                paged_sparse_decode(layer["q"][-1:], layer["cache"], layer["table"][None],
                                    torch.tensor([layer["length"]]), layer["bounds"], config.decode_pages,
                                    layer["scale"])

    times = timed_rounds({"dense_prefill": dense_prefill, "sparse_prefill": sparse_prefill}, repeats, warmup)
    if config.decode_pages:
        times |= timed_rounds({"dense_decode": dense_decode, "sparse_decode": sparse_decode}, repeats, warmup)
    read, pages = config.decode_pages_read(layers[0]["length"])
    return times | {"pages_read": min(1.0, read / pages)}


def worker_threads() -> int:
    """The OpenMP threads vLLM's CPU worker runs with on this machine: every core but the one it keeps for its
    scheduler (vLLM's automatic binding, one NUMA node, one worker)."""
    return max(1, (os.cpu_count() or 1) - 1)


def run(bench) -> SectionResult:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from llmopt import OptimizationConfig
    from llmopt.bench.throughput import RECIPES
    from llmopt.bench.vllm_loads import sparse_rows
    from llmopt.models import load_model
    from llmopt.vllm_plugin.crossover import Crossover, crossing, describe, save_crossover
    from llmopt.vllm_plugin.paged_kv import LAYOUT_ISAS

    settings = bench.settings
    config = OptimizationConfig.from_yaml(str(bench.recipe_dir / RECIPES["sparse"])).get("sparse")
    dtype = getattr(torch, bench.vllm_dtype)
    result = SectionResult("crossover", "Sparse attention in vLLM: llmopt's paths vs vLLM's CPU kernel")
    model, tokenizer = load_model(bench.model)
    isa = _get_attn_isa(dtype, BLOCK_SIZE, model.config.head_dim)
    if isa not in LAYOUT_ISAS:
        result.skipped = f"vLLM's {isa} kernel keeps a cache layout the sparse paths do not read (only {LAYOUT_ISAS})"
        return result
    layers = list(settings.sparse_layers)
    tokens = heldout_tokens(tokenizer, max(settings.crossover_lengths))
    measured, threads, saved_threads = {}, worker_threads(), torch.get_num_threads()
    for length in settings.crossover_lengths:
        bench.progress(f"crossover at {length} tokens: vLLM's kernel against the sparse paths, {threads} thread(s)")
        qkv = capture_qkv(model, tokens[:, :length], layers)
        torch.set_num_threads(threads)
        try:
            r = measured[length] = time_length(qkv, config, dtype, isa, settings.repeats, settings.warmup)
        finally:
            torch.set_num_threads(saved_threads)
        result.rows.append(Row(f"prefill attention in vLLM, {length} tokens (one chunk)", "ms",
                               Spread.of(r["dense_prefill"]).scaled(1e3), Spread.of(r["sparse_prefill"]).scaled(1e3),
                               ratio(r["dense_prefill"], r["sparse_prefill"])))
        if config.decode_pages:
            result.rows.append(Row(f"decode attention in vLLM, {length}-token context, {DECODE_STEPS} steps, "
                                   f"pages read {r['pages_read']:.2f}", "ms",
                                   Spread.of(r["dense_decode"]).scaled(1e3),
                                   Spread.of(r["sparse_decode"]).scaled(1e3),
                                   ratio(r["dense_decode"], r["sparse_decode"]),
                                   bound=f"1/pages read {1 / r['pages_read']:.2f}×"))

    operator = {n: {kind: ratio(r[f"dense_{kind}"], r[f"sparse_{kind}"]).median for kind in ("prefill", "decode")
                    if f"dense_{kind}" in r} for n, r in measured.items()}

    def speedups(kind: str) -> list[tuple[int, float]]:
        return [(n, speedup[kind]) for n, speedup in operator.items() if kind in speedup]

    crossover = Crossover(crossing(speedups("prefill")), crossing(speedups("decode")), "this bench")
    path = save_crossover(crossover, bench.vllm_dtype, measured)
    result.notes += [
        (f"vLLM's {isa} kernel in {bench.vllm_dtype} against llmopt's sparse paths (selection included), layers "
         f"{layers} of {bench.model} on held-out Wikipedia, the recipe's settings (mass {config.mass}, "
         f"{config.decode_pages} decode pages of {config.decode_page_size}); {threads} thread(s), as vLLM's worker "
         "runs; ms summed over the layers."),
        (f"Crossover stored in {path}: {describe(crossover)} (vLLM serves shorter contexts dense, even above the "
         "recipe's min_seq_len; a recipe's vllm_prefill_from / vllm_decode_from override it)."),
    ]
    result.rows += sparse_rows(bench, config, operator)
    result.notes.append(f"vLLM rows: the sparse checkpoint ({RECIPES['sparse']}) against the original, one request "
                        "at a time, prefill then greedy decode; sparse/dense says how the plugin attends that "
                        "context (the crossover above, or the recipe's own limits). The attention-alone speed-up "
                        "bounds the whole model's: the rest of the model does not change.")
    result.raw = {"isa": isa, "threads": threads, "layers": layers, "lengths": measured,
                  "crossover": vars(crossover), "file": str(path)}
    return result
