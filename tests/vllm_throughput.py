"""vLLM offline throughput of one checkpoint: `python vllm_throughput.py MODEL_DIR [options]` prints one
``THROUGHPUT`` JSON line.

Prompts are consecutive windows of held-out Wikipedia text (the model's tokenizer), all submitted at once;
every request generates exactly ``--max-tokens`` tokens (greedy, EOS ignored). Chunked prefill is on. One warm-up
request runs first; the timed `generate` holds all the others. For a routed checkpoint the result also has the
share of tokens each routed block skipped (read from the worker). Compare checkpoints in one run, never across
runs. A script of its own because vLLM starts its workers with spawn.
"""

import argparse
import json
import time
from operator import methodcaller


def prompts(model: str, count: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from llmopt.data.corpora import corpus_split

    ids = AutoTokenizer.from_pretrained(model)(" ".join(corpus_split("wikipedia", "heldout"))).input_ids
    if len(ids) < count * length:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from llmopt.vllm_plugin import ROUTED_ARCHITECTURE

    requests = prompts(args.model, args.requests + 1, args.prompt_tokens)
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, enforce_eager=args.enforce_eager,
              enable_chunked_prefill=True, max_model_len=args.prompt_tokens + args.max_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": requests[0]}], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in requests[1:]], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    result = {"model": args.model, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
              "max_tokens": args.max_tokens, "dtype": args.dtype, "enforce_eager": args.enforce_eager,
              "seconds": round(seconds, 2), "requests_per_s": round(args.requests / seconds, 3),
              "output_tokens_per_s": round(generated / seconds, 2),
              "total_tokens_per_s": round((generated + args.requests * args.prompt_tokens) / seconds, 2)}
    if llm.llm_engine.model_config.architectures == [ROUTED_ARCHITECTURE]:
        counts = llm.apply_model(methodcaller("routing_counts"))[0]
        result["skipped_share"] = {block: round(1 - kept / seen, 4) for block, (seen, kept) in counts.items()}
    print("THROUGHPUT" + json.dumps(result))


if __name__ == "__main__":
    main()
