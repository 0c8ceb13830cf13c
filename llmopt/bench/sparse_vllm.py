"""The sparse checkpoint in vLLM against the original, in one bench run: for each context length, one request's
prefill (prefill-heavy: the prompt is the whole context) and its greedy decode (decode-heavy: `decode_tokens` steps
at that context), from the engine's own per-request timestamps (`vllm_engine`'s decode task)."""

from __future__ import annotations

from llmopt.bench.results import Row
from llmopt.bench.timing import Spread, ratio


def runs_sparse(config, crossover, context: int) -> tuple[bool, bool]:
    """(prefill, decode): whether the plugin attends a request of `context` tokens sparsely, as its metadata
    builder decides (`llmopt.vllm_plugin.cpu_attention`): the recipe's own limits and the crossover in effect."""
    prefill = config.vllm_prefill_from if config.vllm_prefill_from is not None else crossover.prefill_from
    decode = config.vllm_decode_from if config.vllm_decode_from is not None else crossover.decode_from
    return (prefill is not None and context >= max(config.min_seq_len, prefill),
            decode is not None and context >= decode and config.decodes_sparse(context))


def vllm_rows(bench, config, operator: dict[int, dict[str, float]]) -> list[Row]:
    """Rows of vLLM prefill seconds and decode steps/s, sparse checkpoint vs original, at each context of
    `sparse_vllm_contexts`; beside each, the operator's speed-up at that length (`operator`: context → {"prefill",
    "decode"}: llmopt's attention against vLLM's kernel, where the crossover section measured it)."""
    from llmopt.bench.decode import step_seconds
    from llmopt.bench.throughput import RECIPES, checkpoint
    from llmopt.bench.vllm_engine import run_engine
    from llmopt.vllm_plugin.crossover import load_crossover

    settings, output = bench.settings, bench.settings.decode_tokens
    contexts = settings.sparse_vllm_contexts
    tasks = [{"kind": "decode", "batch": 1, "prompt": n - output, "output": output, "warmup": settings.warmup,
              "repeats": settings.repeats} for n in contexts]
    measured = {}
    for name, directory in (("original", bench.original()), ("sparse", checkpoint(bench, RECIPES["sparse"]))):
        bench.progress(f"vLLM, {name}: one request at each of {', '.join(map(str, contexts))} tokens of context")
        job = {"model": str(directory), "dtype": bench.vllm_dtype, "max_num_seqs": 1, "max_model_len": max(contexts),
               "kv_space_gib": 2, "tasks": tasks}
        measured[name] = run_engine(job, bench.log)["tasks"]
    crossover = load_crossover(bench.vllm_dtype)
    rows = []
    for n, original, sparse in zip(contexts, measured["original"], measured["sparse"], strict=True):
        prefill, decode = runs_sparse(config, crossover, n)
        bound = operator.get(n, {})
        rows.append(Row(f"vLLM prefill of {n - output} tokens, batch 1, {'sparse' if prefill else 'dense'}", "s",
                        Spread.of(original["prefill_s"]), Spread.of(sparse["prefill_s"]),
                        ratio(original["prefill_s"], sparse["prefill_s"]),
                        bound=f"attention alone {bound['prefill']:.2f}×" if "prefill" in bound else ""))
        steps = {name: [1 / s for s in step_seconds(task)] for name, task in (("original", original),
                                                                               ("sparse", sparse))}
        rows.append(Row(f"vLLM decode at {n - output}–{n} tokens of context, batch 1, "
                        f"{'sparse' if decode else 'dense'}", "steps/s", Spread.of(steps["original"]),
                        Spread.of(steps["sparse"]), ratio(steps["sparse"], steps["original"]),
                        bound=f"attention alone {bound['decode']:.2f}×" if "decode" in bound else ""))
    return rows
