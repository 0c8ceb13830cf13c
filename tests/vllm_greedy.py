"""Greedy tokens from vLLM for a saved model: `python vllm_greedy.py MODEL_DIR PROMPTS_JSON` prints JSON.

A script of its own because vLLM starts its workers with spawn (the entry point needs `__main__`).
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    print("GREEDY" + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
