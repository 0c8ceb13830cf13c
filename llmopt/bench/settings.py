"""How much a bench measures: the full run (the loads of issue 11) or `--quick` (the same sections, small loads)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """`decode_loads`: (batch, prompt tokens) of the decode measurements, each generating `decode_tokens`.
    `capacity_gib`: the KV space (``VLLM_CPU_KVCACHE_SPACE``) at which vLLM's capacity is read; None reads it at the
    serving budget from the serving engine (one engine per model). `serving_loads`: (requests, prompt, output);
    their fixed KV budget holds `serving_concurrency` sequences of the original's longest load; each is timed
    `serving_repeats` times. Routing: a prefill of `routing_prefill` tokens, greedy decode at each of
    `routing_decode_batches` (`decode_tokens` tokens after 128-token prompts), and in vLLM at each of
    `routing_vllm_batches`. `throughput_loads`: (requests,
    prompt, output) of vLLM throughput on held-out text, every checkpoint. `sparse_vllm_contexts`: the context lengths
    of vLLM's prefill and decode, the sparse checkpoint against the original, one request generating
    `decode_tokens` at a time; `sparse_generate`:
    the prompt tokens of the whole sparse model's prefill and greedy decode in transformers;
    `crossover_lengths`: the contexts at which vLLM's kernel and the sparse paths are timed against each other."""

    repeats: int
    warmup: int
    capacity_gib: int | None
    decode_loads: tuple[tuple[int, int], ...]
    decode_tokens: int
    serving_loads: tuple[tuple[int, int, int], ...]
    serving_repeats: int
    serving_concurrency: int
    max_num_seqs: int
    max_model_len: int
    sparse_lengths: tuple[int, ...]
    sparse_layers: tuple[int, ...]
    sparse_vllm_contexts: tuple[int, ...]
    sparse_generate: int
    crossover_lengths: tuple[int, ...]
    routing_prefill: int
    routing_decode_batches: tuple[int, ...]
    routing_vllm_batches: tuple[int, ...]
    throughput_loads: tuple[tuple[int, int, int], ...]
    time_calibration: bool


FULL = Settings(repeats=5, warmup=1, capacity_gib=4,
                decode_loads=((1, 512), (1, 2048), (8, 2048), (32, 2048)), decode_tokens=64,
                serving_loads=((64, 1024, 256), (64, 32, 512)), serving_repeats=3, serving_concurrency=16,
                max_num_seqs=64,
                max_model_len=4096, sparse_lengths=(4096, 8192, 16384), sparse_layers=(3, 6, 9),
                sparse_vllm_contexts=(2048, 4096, 8192), sparse_generate=8000, crossover_lengths=(2048, 4096, 8192),
                routing_prefill=2048, routing_decode_batches=(1, 8), routing_vllm_batches=(1, 8, 32),
                throughput_loads=((32, 256, 64), (4, 2048, 32)),
                time_calibration=True)

# One engine per model at the serving budget: it must also hold the largest decode load (3 sequences of one block).
# The serving load shows where the win appears on a 2-core CPU: 4 blocks of 128 tokens hold 3 original sequences
# (one block is vLLM's null block) and 11 compressed ones, whose step is still mostly memory traffic; at 5 → 17
# the compressed model's step is already half arithmetic there.
QUICK = Settings(repeats=3, warmup=1, capacity_gib=None,
                 decode_loads=((1, 32), (1, 96), (3, 96)), decode_tokens=32,
                 serving_loads=((33, 32, 96),), serving_repeats=3, serving_concurrency=4, max_num_seqs=32,
                 max_model_len=256, sparse_lengths=(1024, 2048), sparse_layers=(3,), sparse_vllm_contexts=(1024, 2048),
                 sparse_generate=1536, crossover_lengths=(1024, 2048), routing_prefill=1024,
                 routing_decode_batches=(1, 4), routing_vllm_batches=(1, 4), throughput_loads=((8, 64, 32),),
                 time_calibration=False)
