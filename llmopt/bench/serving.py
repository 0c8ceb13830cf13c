"""Serving at a fixed KV cache budget: the same KV bytes for both models, small enough that the original is
memory-limited (it fits fewer concurrent sequences), measured as requests/s and output tokens/s, beside what the
step-time model predicts for that load here and on a GPU's bandwidth-to-compute ratio."""

from __future__ import annotations

import math

from llmopt.bench.bounds import ModelCost
from llmopt.bench.decode import GPU, costs, fitted_step_model, gpu_step_model
from llmopt.bench.results import Row, SectionResult, Series
from llmopt.bench.step_model import StepModel
from llmopt.bench.timing import Spread, ratio
from llmopt.bench.vllm_runs import ROLES, vllm_measurements

TOLERANCE = 0.15


def concurrency(task: dict, capacity: dict, max_num_seqs: int) -> int:
    """Sequences that fit at once: whole KV blocks for prompt + output each, at most `max_num_seqs`. vLLM keeps
    one block aside (its null block)."""
    blocks_per_sequence = math.ceil((task["prompt"] + task["output"]) / capacity["block_size"])
    return max(1, min(task["requests"], max_num_seqs, (capacity["num_blocks"] - 1) // blocks_per_sequence))


def predicted_seconds(model: StepModel, cost: ModelCost, task: dict, batch: int) -> float:
    """Waves of `batch` sequences: each a prefill of their prompts, then ``output - 1`` decode steps at the mean
    context (vLLM admits new requests as others finish; with equal lengths that is the same schedule)."""
    seconds, left = 0.0, task["requests"]
    while left:
        wave = min(batch, left)
        step = cost.decode(wave, task["prompt"] + task["output"] // 2)
        seconds += model.seconds(cost.prefill(wave, task["prompt"])) + (task["output"] - 1) * model.seconds(step)
        left -= wave
    return seconds


def serving_check(measured: float, predicted: float) -> str:
    """Measured within `TOLERANCE` of the step model's prediction, and ≥ 2× wherever the model predicts the
    memory-bound regime: a step time that grows so much slower than its batch that the compressed model's larger
    concurrency buys at least 2× (memory traffic dominating the original's step is not enough: the compressed
    model's step, at 3× the sequences, may already be arithmetic-bound, and a last partial wave leaves slots
    idle, both of which the model counts)."""
    within = abs(measured / predicted - 1) <= TOLERANCE
    memory_bound = predicted >= 2
    passed = within and (measured >= 2 or not memory_bound)
    return (f"{'✓' if passed else '✗'} within {TOLERANCE:.0%} of the model ({measured / predicted - 1:+.0%})"
            + (", ≥ 2× (the model predicts the memory-bound regime)" if memory_bound else ""))


def run(bench) -> SectionResult:
    measured, cost, model = vllm_measurements(bench), costs(bench), fitted_step_model(bench)
    gpu = gpu_step_model(bench)
    result = SectionResult("serving", "Serving at a fixed KV cache budget")
    budget = measured["original"]["serving"]["kv_bytes"]
    points: dict[str, list[tuple[int, float]]] = {role: [] for role in ROLES}
    for index, original in enumerate(measured["original"]["serving"]["tasks"]):
        tasks = {role: measured[role]["serving"]["tasks"][index] for role in ROLES}
        batch = {role: concurrency(tasks[role], measured[role]["serving"], bench.settings.max_num_seqs)
                 for role in ROLES}
        seconds = {role: tasks[role]["seconds"] for role in ROLES}
        speedup = ratio(seconds["original"], seconds["optimized"])
        predicted = {name: predicted_seconds(m, cost["original"], original, batch["original"])
                     / predicted_seconds(m, cost["optimized"], original, batch["optimized"])
                     for name, m in (("here", model), ("gpu", gpu))}
        steps = {role: cost[role].decode(batch[role], original["prompt"] + original["output"] // 2) for role in ROLES}
        memory_share = {(role, name): step.bytes * m.seconds_per_byte / m.seconds(step)
                        for role, step in steps.items() for name, m in (("here", model), ("gpu", gpu))}
        load = f"{original['requests']} × {original['prompt']}+{original['output']} tokens"
        rates = {role: [original["requests"] / s for s in seconds[role]] for role in ROLES}
        tokens = {role: [original["requests"] * original["output"] / s for s in seconds[role]] for role in ROLES}
        result.rows += [
            Row(f"requests/s, {load}", "req/s", Spread.of(rates["original"]), Spread.of(rates["optimized"]),
                speedup, bound=f"concurrency {batch['original']} → {batch['optimized']}",
                predicted=predicted["here"],
                check=serving_check(speedup.median, predicted["here"])),
            Row(f"output tokens/s, {load}", "tokens/s", Spread.of(tokens["original"]), Spread.of(tokens["optimized"]),
                ratio(tokens["optimized"], tokens["original"]), predicted=predicted["here"]),
        ]
        for role in ROLES:
            points[role].append((batch[role], Spread.of(tokens[role]).median))
        result.notes.append(
            f"{load}: the budget fits {batch['original']} original and {batch['optimized']} compressed sequences. "
            f"Memory traffic is {memory_share['original', 'here']:.0%} of the original's modelled decode step "
            f"and {memory_share['optimized', 'here']:.0%} of the compressed model's here, "
            f"{memory_share['original', 'gpu']:.0%} and {memory_share['optimized', 'gpu']:.0%} at {GPU[0]}'s "
            f"FLOPs per byte; the model predicts {predicted['here']:.2f}× "
            f"here (measured {speedup.median:.2f}×) and {predicted['gpu']:.2f}× there. More sequences per step only "
            "pay where a step's time grows slower than its batch: where reading weights and KV, not arithmetic "
            "per sequence, dominates.")
    for role in ROLES:
        result.series.append(Series("throughput_vs_concurrency", f"vLLM serving, {role} (fixed KV budget)",
                                    [x for x, _ in points[role]], [y for _, y in points[role]]))
    result.notes.append(f"Fixed KV budget: {budget:,} bytes ({budget / 2**20:.1f} MiB) of {bench.vllm_dtype} KV "
                        f"cache for both models; capacity {measured['original']['serving']['tokens']:,} vs "
                        f"{measured['optimized']['serving']['tokens']:,} tokens. All requests are submitted at "
                        "once (offline throughput); ranges pair the extreme repeats.")
    result.raw = {"kv_budget_bytes": budget, "vllm": {role: measured[role]["serving"] for role in ROLES}}
    return result
