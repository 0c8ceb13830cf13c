"""Greedy generation in vLLM: `python vllm_generate.py SPEC_JSON` prints one ``RESULT`` JSON line.

SPEC: {"model": dir, "engine": {further vllm.LLM arguments; enforce_eager defaults to True}, "calls": [[prompt token ids, ...], ...],
"max_tokens": n, "routing_counts": bool}. Each call is one `generate` on the same engine, in order (so later calls
can hit the prefix cache). RESULT: per call and prompt the greedy tokens, their logprobs and the prompt tokens found
in the prefix cache; the CPU attention backend this process resolved; the KV cache capacity in tokens; with routing_counts, a routed model's
``{block: [tokens routed, tokens kept]}`` over all calls, one per worker (read from the workers: needs
VLLM_ALLOW_INSECURE_SERIALIZATION=1). A script of its own because vLLM starts its workers
with spawn (the entry point needs `__main__`).
"""

import json
import sys
from operator import methodcaller


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], dtype="float32", seed=0, **{"enforce_eager": True, **spec.get("engine", {})})
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), logprobs=0, detokenize=False)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {"tokens": [], "logprobs": [], "cached": [], "backend": AttentionBackendEnum.CPU_ATTN.get_path(),
              "capacity_tokens": cache.num_gpu_blocks * cache.block_size}
    for prompts in spec["calls"]:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        completions = [output.outputs[0] for output in outputs]
        result["tokens"].append([list(c.token_ids) for c in completions])
        result["logprobs"].append([[step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
                                   for c in completions])
        result["cached"].append([output.num_cached_tokens for output in outputs])
    if spec.get("routing_counts"):
        result["routing_counts"] = llm.apply_model(methodcaller("routing_counts"))
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    main()
