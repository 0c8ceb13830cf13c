"""vLLM decode throughput, original vs KV-compressed, at batch 1 and at KV-heavy loads, beside the two bounds
(memory traffic and compute) and the prediction of the step-time model fitted on this machine's measured steps."""

from __future__ import annotations

import statistics

from llmopt.bench.bounds import ModelCost, StepCost, compute_bound, memory_bound
from llmopt.bench.results import Row, SectionResult, Series
from llmopt.bench.step_model import StepModel
from llmopt.bench.timing import Spread, ratio
from llmopt.bench.vllm_runs import ROLES, vllm_measurements

# NVIDIA's H100 SXM spec sheet: 989 TFLOP/s dense bf16 tensor-core arithmetic over 3.35 TB/s of HBM3.
GPU = ("an H100 SXM (989 TFLOP/s bf16 / 3.35 TB/s, spec)", 989e12 / 3.35e12)


def step_seconds(task: dict) -> list[float]:
    """Seconds per decode step of each repeat."""
    return [seconds / (task["output"] - 1) for seconds in task["decode_s"]]


def decode_step(cost: ModelCost, task: dict) -> StepCost:
    """The average decode step of a task: context grows from the prompt to prompt + output."""
    return cost.decode(task["batch"], task["prompt"] + task["output"] // 2)


def costs(bench) -> dict[str, ModelCost]:
    return {"original": bench.cost(bench.original()), "optimized": bench.cost(bench.optimized())}


def fitted_step_model(bench) -> StepModel:
    """The step-time model fitted on every measured step of both models (prefill passes and decode steps)."""
    if "step_model" not in bench.shared:
        measured, cost = vllm_measurements(bench), costs(bench)
        steps, seconds = [], []
        for role in ROLES:
            for task in measured[role]["decode"]:
                steps += [decode_step(cost[role], task), cost[role].prefill(task["batch"], task["prompt"])]
                seconds += [statistics.median(step_seconds(task)), statistics.median(task["prefill_s"])]
        bench.shared["step_model"] = StepModel.fit(steps, seconds)
    return bench.shared["step_model"]


def gpu_step_model(bench) -> StepModel:
    """The fitted model at the GPU's FLOPs per byte, the GPU running bf16: where vLLM runs in float32 here, each
    byte counted moves as half a byte there."""
    return fitted_step_model(bench).on_machine(GPU[1] * 2 / bench.bytes_per_value)


def predicted_ratio(model: StepModel, original: StepCost, optimized: StepCost) -> float:
    return model.seconds(original) / model.seconds(optimized)


def run(bench) -> SectionResult:
    measured, cost, model = vllm_measurements(bench), costs(bench), fitted_step_model(bench)
    gpu = gpu_step_model(bench)
    result = SectionResult("decode", "vLLM decode throughput, original vs KV-compressed")
    throughput: dict[str, list[tuple[dict, list[float]]]] = {role: [] for role in ROLES}
    gaps, on_gpu = [], []
    for original, optimized in zip(measured["original"]["decode"], measured["optimized"]["decode"], strict=True):
        for role, task in (("original", original), ("optimized", optimized)):
            throughput[role].append((task, [task["batch"] / s for s in step_seconds(task)]))
        steps = decode_step(cost["original"], original), decode_step(cost["optimized"], optimized)
        bound_memory, bound_compute = memory_bound(*steps), compute_bound(*steps)
        load = f"batch {original['batch']}, context {original['prompt']}+{original['output']}"
        result.rows.append(Row(f"decode, {load}", "tokens/s", Spread.of(throughput["original"][-1][1]),
                               Spread.of(throughput["optimized"][-1][1]),
                               ratio(throughput["optimized"][-1][1], throughput["original"][-1][1]),
                               bound=f"memory ≤ {bound_memory:.2f}×, compute {bound_compute:.2f}×",
                               predicted=predicted_ratio(model, *steps)))
        memory_share = steps[0].bytes * model.seconds_per_byte / model.seconds(steps[0])
        kv_share = (steps[0].bytes - cost["original"].weight_bytes) / steps[0].bytes
        gaps.append(f"{load}: KV is {kv_share:.0%} of the bytes a step moves, and memory traffic is "
                    f"{memory_share:.0%} of the original's modelled step time here, so at most that share can "
                    f"shrink: the model predicts {predicted_ratio(model, *steps):.2f}× against the "
                    f"{bound_memory:.2f}× bandwidth bound.")
        on_gpu.append(f"{load}: {predicted_ratio(gpu, *steps):.2f}× (memory bound {bound_memory:.2f}×)")
    result.notes += [
        (f"Step-time model, fitted by non-negative least squares on {4 * len(measured['original']['decode'])} "
         f"measured steps (prefill passes and decode steps of both models): {model.overhead_s * 1e3:.1f} ms per "
         f"step + FLOPs / {_rate(model.seconds_per_flop, 'FLOP/s')} + bytes / {_rate(model.seconds_per_byte, 'B/s')}"
         f"; worst relative error on its own points {model.max_relative_error:.0%}."),
        _ridge(model),
        *gaps,
        ("Why the measured ratio stays under the bandwidth bound: the bound assumes a step is nothing but memory "
        "traffic; fewer KV heads leave the FLOPs (the query heads all still attend) and the fixed per-step "
        "overhead (scheduling, sampling, Python) unchanged, and on a CPU those dominate."),
        f"The model rescaled to the FLOPs per byte of {GPU[0]}, without the overhead, predicts: "
        + "; ".join(on_gpu) + ".",
    ]
    longest = max(task["prompt"] for task, _ in throughput["original"])
    for role in ROLES:
        at_longest = [(t["batch"], statistics.median(v)) for t, v in throughput[role] if t["prompt"] == longest]
        batch_one = [(t["prompt"] + t["output"] // 2, statistics.median(v)) for t, v in throughput[role]
                     if t["batch"] == 1]
        for plot, label, points in (("throughput_vs_concurrency", f"vLLM decode, {role}, prompt {longest}",
                                     at_longest), ("speed_vs_context", f"vLLM decode, {role}, batch 1", batch_one)):
            if len(points) > 1:
                result.series.append(Series(plot, label, [x for x, _ in points], [y for _, y in points]))
    result.raw = {"step_model": vars(model), "gpu_flops_per_byte": GPU[1], "vllm": measured}
    return result


def _rate(seconds_per_unit: float, unit: str) -> str:
    return f"{1 / seconds_per_unit / 1e9:.3g} G{unit}" if seconds_per_unit else f"∞ {unit} (no such term fitted)"


def _ridge(model: StepModel) -> str:
    if model.seconds_per_byte and model.seconds_per_flop:
        return (f"This machine does {model.flops_per_byte:.3g} FLOPs in the time it moves one byte; {GPU[0]} does "
                f"{GPU[1]:.0f}.")
    return ("The fit found no separate memory term: the weights are read every step, so their traffic cannot be "
            "told apart from the fixed per-step cost, and these loads move too little KV to measure the rest (the "
            "full run's 2k-context loads do). Memory shares below are therefore lower bounds.")
