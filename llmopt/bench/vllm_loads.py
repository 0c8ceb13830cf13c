"""An optimized checkpoint in vLLM against the original, in one bench run: loads of `batch` requests of `prompt`
tokens, each then generating `decode_tokens`, timed from the engine's own per-request timestamps
(`vllm_engine`'s decode task): the prefill (prefill-heavy loads) and the greedy decode steps after it
(decode-heavy loads). Used by the sparse checkpoint (contexts of 2k-8k) and the routed one (batch 1-32)."""

from __future__ import annotations

from pathlib import Path

from llmopt.bench.results import Row
from llmopt.bench.timing import Spread, ratio


def measure_loads(bench, checkpoint: Path, loads: list[tuple[int, int]], text: bool = False) -> list[dict]:
    """Per load (batch, prompt): ``{"original": task, "optimized": task}``, each the engine's result of it
    (``prefill_s``, ``decode_s``); one engine per model. `text`: held-out text prompts (what a routed model's
    decisions depend on), else random tokens."""
    from llmopt.bench.vllm_engine import run_engine

    settings = bench.settings
    tasks = [{"kind": "decode", "batch": batch, "prompt": prompt, "output": settings.decode_tokens, "text": text,
              "warmup": settings.warmup, "repeats": settings.repeats} for batch, prompt in loads]
    measured = {}
    for role, directory in (("original", bench.original()), ("optimized", checkpoint)):
        bench.progress(f"vLLM, {role} ({directory.name}): {len(loads)} loads of (batch, prompt) {loads}")
        job = {"model": str(directory), "dtype": bench.vllm_dtype, "kv_space_gib": 2,
               "max_num_seqs": max(batch for batch, _ in loads),
               "max_model_len": max(prompt for _, prompt in loads) + settings.decode_tokens, "tasks": tasks}
        measured[role] = run_engine(job, bench.log)["tasks"]
    return [{"original": original, "optimized": optimized}
            for original, optimized in zip(measured["original"], measured["optimized"], strict=True)]


def prefill_row(claim: str, load: dict, bound: str = "") -> Row:
    """Seconds of the load's prefill, original over optimized."""
    original, optimized = load["original"]["prefill_s"], load["optimized"]["prefill_s"]
    return Row(claim, "s", Spread.of(original), Spread.of(optimized), ratio(original, optimized), bound=bound)


def decode_row(claim: str, load: dict, bound: str = "") -> Row:
    """Decode steps per second of the whole batch, optimized over original."""
    from llmopt.bench.decode import step_seconds

    original, optimized = ([1 / s for s in step_seconds(load[role])] for role in ("original", "optimized"))
    return Row(claim, "steps/s", Spread.of(original), Spread.of(optimized), ratio(optimized, original), bound=bound)


def runs_sparse(config, crossover, context: int) -> tuple[bool, bool]:
    """(prefill, decode): whether the plugin attends a request of `context` tokens sparsely, as its metadata
    builder decides (`llmopt.vllm_plugin.cpu_attention`): the recipe's own limits and the crossover in effect."""
    prefill = config.vllm_prefill_from if config.vllm_prefill_from is not None else crossover.prefill_from
    decode = config.vllm_decode_from if config.vllm_decode_from is not None else crossover.decode_from
    return (prefill is not None and context >= max(config.min_seq_len, prefill),
            decode is not None and context >= decode and config.decodes_sparse(context))


def sparse_rows(bench, config, operator: dict[int, dict[str, float]]) -> list[Row]:
    """The sparse checkpoint's prefill and decode rows at each context of `sparse_vllm_contexts` (one request);
    beside each, the operator's speed-up at that length (`operator`: context → {"prefill", "decode"}: llmopt's
    attention against vLLM's kernel, where the crossover section measured it)."""
    from llmopt.bench.throughput import RECIPES, checkpoint
    from llmopt.vllm_plugin.crossover import load_crossover

    output, contexts = bench.settings.decode_tokens, bench.settings.sparse_vllm_contexts
    loads = measure_loads(bench, checkpoint(bench, RECIPES["sparse"]), [(1, n - output) for n in contexts])
    crossover = load_crossover(bench.vllm_dtype)
    rows = []
    for n, load in zip(contexts, loads, strict=True):
        prompt = n - output
        prefill = runs_sparse(config, crossover, prompt)[0]
        decode = {runs_sparse(config, crossover, context)[1] for context in (prompt + 1, n)}
        bound = {kind: f"attention alone {speedup:.2f}×" for kind, speedup in operator.get(n, {}).items()}
        rows += [prefill_row(f"vLLM prefill of {prompt} tokens, batch 1, {'sparse' if prefill else 'dense'}",
                             load, bound.get("prefill", "")),
                 decode_row(f"vLLM decode at {prompt}–{n} tokens of context, batch 1, "
                            f"{DECODE_LABELS[frozenset(decode)]}", load, bound.get("decode", ""))]
    return rows


DECODE_LABELS = {frozenset({True}): "sparse", frozenset({False}): "dense", frozenset({True, False}): "partly sparse"}
