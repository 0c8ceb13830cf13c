"""vLLM measurements in a process of their own: ``python -m llmopt.bench.vllm_engine JOB_JSON`` prints one line
``RESULT <json>``. vLLM starts its workers with spawn, so an engine never runs inside the bench's own process.

A job names a model, its KV cache space and a list of tasks; decode and serve tasks use random prompt tokens (the
weights' values do not matter for speed), text tasks held-out text (a routed model's speed depends on what it
reads); every task uses ``ignore_eos`` (lengths are exact), and prefix caching is off so that repeats do not reuse
each other's prompts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

MARKER = "RESULT "


def run_engine(job: dict, log: Path, timeout: float = 3600) -> dict:
    """Run `job` in a fresh Python process (its vLLM log goes to `log`); returns the parsed result."""
    env = dict(os.environ)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # `apply_model` reads a routed model's counts from the worker
    if job.get("kv_space_gib") is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(job["kv_space_gib"])
    else:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the job's kv_cache_bytes decides
    with log.open("a") as stream:
        returncode, stdout = run_process_group([sys.executable, "-m", "llmopt.bench.vllm_engine", json.dumps(job)],
                                               env, stream, timeout)
        stream.write(stdout)  # vLLM logs to stdout too
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if returncode or not lines:
        raise RuntimeError(f"the vLLM engine for {job['model']} failed (exit {returncode}); see {log}")
    return json.loads(lines[-1][len(MARKER):])


def run_process_group(command: list[str], env: dict, stderr: IO[str], timeout: float) -> tuple[int, str]:
    """(exit code, stdout) of `command`, started in a process group of its own. A timeout or an interrupt kills
    the whole group: vLLM's engine core and workers are the job's children, and a killed job alone would leave them
    running, slowing every later measurement."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, stdout


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(count)]


def _generate(llm, prompts: list[dict], max_tokens: int) -> tuple[float, list]:
    """(wall seconds, outputs) of one `generate` of exactly `max_tokens` tokens per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return seconds, outputs


def _decode(llm, task: dict, vocab: int) -> dict:
    """Prefill and decode seconds of `batch` prompts generating `output` tokens, from the engine's own per-request
    timestamps: prefill from the first scheduling to the last first token, decode from there to the last token
    (``output - 1`` steps of the whole batch). Random prompts, or held-out text where the task sets ``text``."""
    prefill, decode = [], []
    for round_ in range(task["warmup"] + task["repeats"]):
        prompts = (_heldout(llm, task["batch"], task["prompt"]) if task.get("text")
                   else _prompts(task["batch"], task["prompt"], vocab, seed=round_))
        _, outputs = _generate(llm, prompts, task["output"])
        stats = [o.metrics for o in outputs]
        first_tokens = max(s.first_token_ts for s in stats)
        if round_ >= task["warmup"]:
            prefill.append(first_tokens - min(s.scheduled_ts for s in stats))
            decode.append(max(s.last_token_ts for s in stats) - first_tokens)
    return {"prefill_s": prefill, "decode_s": decode}


def _serve(llm, task: dict, vocab: int) -> dict:
    """Seconds to finish `requests` requests submitted at once (offline throughput, as `vllm bench throughput`)."""
    seconds = [_generate(llm, _prompts(task["requests"], task["prompt"], vocab, seed=100 + r), task["output"])[0]
               for r in range(task["repeats"])]
    return {"seconds": seconds}


def _heldout(llm, count: int, length: int) -> list[dict]:
    """`count` prompts of `length` tokens of held-out Wikipedia, one after the other."""
    from transformers import AutoTokenizer

    from llmopt.bench.prompts import heldout_tokens

    ids = heldout_tokens(AutoTokenizer.from_pretrained(llm.llm_engine.model_config.model), count * length)[0]
    return [{"prompt_token_ids": ids[i * length:(i + 1) * length].tolist()} for i in range(count)]


def _text(llm, task: dict, vocab: int) -> dict:
    """`_serve` on prompts of held-out Wikipedia text (what a routed model's decisions depend on), the same
    prompts in every repeat; for a routed model also the share of tokens each routed block skipped."""
    from operator import methodcaller

    from llmopt.vllm_plugin import ROUTED_ARCHITECTURE

    prompts = _heldout(llm, task["requests"], task["prompt"])
    result: dict = {"seconds": [_generate(llm, prompts, task["output"])[0] for _ in range(task["repeats"])]}
    if llm.llm_engine.model_config.architectures == [ROUTED_ARCHITECTURE]:
        counts = llm.apply_model(methodcaller("routing_counts"))[0]
        result["skipped_share"] = {block: round(1 - kept / seen, 4) for block, (seen, kept) in counts.items()}
    return result


def main() -> None:
    from vllm import LLM

    job = json.loads(sys.argv[1])
    options = {"kv_cache_memory_bytes": job["kv_cache_bytes"]} if job.get("kv_cache_bytes") else {}
    llm = LLM(model=job["model"], dtype=job["dtype"], enforce_eager=True, enable_prefix_caching=False,
              max_model_len=job["max_model_len"], max_num_seqs=job["max_num_seqs"], seed=0,
              disable_log_stats=False, **options)  # the stats carry each request's token timestamps
    cache = llm.llm_engine.vllm_config.cache_config
    vocab = llm.llm_engine.model_config.get_vocab_size()
    result: dict = {"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                    "tokens": cache.num_gpu_blocks * cache.block_size, "tasks": []}
    for seed in range(3):  # the first calls of a fresh engine are slow (allocation, oneDNN kernel selection)
        _generate(llm, _prompts(4, 64, vocab, seed=1000 + seed), 8)
    for task in job["tasks"]:
        run = {"decode": _decode, "serve": _serve, "text": _text}[task["kind"]]
        result["tasks"].append({**task, **run(llm, task, vocab)})
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
