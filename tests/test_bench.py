"""`llmopt bench`: the step-time fit, the bounds, the serving schedule, the report writer and the runner on tiny
inputs; one slow end-to-end `llmopt bench --quick` of the KV capacity section on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model

from llmopt.bench.bounds import ModelCost, StepCost, compute_bound, memory_bound, model_cost
from llmopt.bench.report import markdown, table, write_report
from llmopt.bench.results import Row, SectionResult, Series
from llmopt.bench.runner import run_bench, shared_machine
from llmopt.bench.sections import Section
from llmopt.bench.serving import concurrency, predicted_seconds, serving_check
from llmopt.bench.step_model import StepModel
from llmopt.bench.timing import Spread, ratio, timed_rounds
from llmopt.vllm_plugin.crossover import DEFAULT

# SmolLM2-135M-like costs: 134.5M params in bf16, 23,040 KV bytes per token; the 3 → 1 twin: 7,680.
ORIGINAL = ModelCost(params=134_515_008, matmul_params=134_000_000, bytes_per_param=2, kv_bytes_per_token=23_040,
                     attention_flops_per_context_token=4 * 30 * 9 * 64)
COMPRESSED = ModelCost(params=133_000_000, matmul_params=132_500_000, bytes_per_param=2, kv_bytes_per_token=7_680,
                       attention_flops_per_context_token=4 * 30 * 9 * 64)


def test_step_model_recovers_known_coefficients():
    truth = StepModel(overhead_s=2e-3, seconds_per_flop=1 / 50e9, seconds_per_byte=1 / 10e9)
    steps = [cost.decode(batch, context) for cost in (ORIGINAL, COMPRESSED) for batch in (1, 8, 32)
             for context in (128, 2048)] + [ORIGINAL.prefill(4, 512)]
    fitted = StepModel.fit(steps, [truth.seconds(s) for s in steps])
    for name in ("overhead_s", "seconds_per_flop", "seconds_per_byte"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)
    assert fitted.max_relative_error < 1e-9
    assert fitted.flops_per_byte == pytest.approx(5.0)


def test_step_model_never_fits_a_negative_term():
    steps = [StepCost(flops=f, bytes=b) for f, b in ((1e9, 1e8), (2e9, 1e8), (3e9, 3e8), (1e9, 4e8))]
    fitted = StepModel.fit(steps, [1e-3 + s.flops * 1e-11 for s in steps])  # no memory term at all
    assert min(fitted.overhead_s, fitted.seconds_per_flop, fitted.seconds_per_byte) >= 0
    assert fitted.seconds_per_byte == pytest.approx(0, abs=1e-15)


def test_on_machine_keeps_memory_and_sets_the_ratio():
    here = StepModel(5e-3, 1e-10, 1e-9)
    gpu = here.on_machine(300.0)
    assert (gpu.overhead_s, gpu.seconds_per_byte) == (0.0, 1e-9)
    assert gpu.flops_per_byte == pytest.approx(300.0)
    compute_only = StepModel(5e-3, 1e-10, 0.0).on_machine(300.0)
    assert compute_only.seconds_per_flop == 1e-10 and compute_only.flops_per_byte == pytest.approx(300.0)


def test_bounds_match_the_formulas():
    w, k = ORIGINAL.weight_bytes, 32 * 1024 * 23_040
    original = StepCost(flops=1e12, bytes=w + k)
    optimized = StepCost(flops=1e12, bytes=w + k / 3)
    assert memory_bound(original, optimized) == pytest.approx((w + k) / (w + k / 3))
    assert compute_bound(original, optimized) == 1.0
    step = ORIGINAL.decode(32, 1024)
    assert step.bytes == w + k
    assert step.flops == 2 * ORIGINAL.matmul_params * 32 + 4 * 30 * 9 * 64 * 32 * 1024
    assert ORIGINAL.prefill(1, 100).bytes == w + 100 * 23_040


def test_model_cost_counts_tied_weights_once():
    model = tiny_model(tie_word_embeddings=True)  # 3 layers, 8 heads, 4 KV heads of 16, vocab 97
    cost = model_cost(model)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.matmul_params == cost.params - model.model.norm.weight.numel() - 3 * 2 * 64  # norms are not matmuls
    assert cost.kv_bytes_per_token == 2 * 3 * 4 * 16 * 2
    assert cost.attention_flops_per_context_token == 4 * 3 * 8 * 16


def test_spread_and_ratio():
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert Spread.of([1.0, 2.0]).scaled(-1.0) == Spread(-1.5, -2.0, -1.0, 2)
    r = ratio([4.0, 6.0, 5.0], [1.0, 2.0])
    assert (r.median, r.low, r.high) == (5.0 / 1.5, 2.0, 6.0)
    calls = []
    times = timed_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3 and [len(t) for t in times.values()] == [2, 2]


def test_serving_concurrency_and_schedule():
    task = {"requests": 10, "prompt": 100, "output": 20}
    assert concurrency(task, {"num_blocks": 7, "block_size": 64}, max_num_seqs=16) == 3  # 2 blocks each, 1 null
    assert concurrency(task, {"num_blocks": 700, "block_size": 64}, max_num_seqs=16) == 10
    model = StepModel(1.0, 0.0, 0.0)  # one second per step, whatever it holds
    assert predicted_seconds(model, ORIGINAL, task, batch=3) == 4 * 20  # 4 waves: 1 prefill + 19 decode steps
    assert predicted_seconds(model, ORIGINAL, task, batch=10) == 20


def test_serving_check_asks_for_2x_only_where_the_model_predicts_it():
    assert serving_check(1.81, 1.79).startswith("✓") and "≥ 2×" not in serving_check(1.81, 1.79)
    assert serving_check(2.2, 2.4).startswith("✓") and "memory-bound" in serving_check(2.2, 2.4)
    assert serving_check(1.95, 2.1).startswith("✗")  # within 15% of the model, but under 2× where it predicts more
    assert serving_check(1.2, 1.79).startswith("✗ within 15% of the model (-33%)")


def test_a_section_whose_transform_is_missing_says_so():
    section = Section("x", "X", "llmopt.bench.decode", (("llmopt.nothing_here", "token teleportation"),))
    assert section.missing() == "token teleportation is not installed (no module llmopt.nothing_here)"
    unwritten = Section("y", "Y", "llmopt.bench.not_written")
    assert "no module llmopt.bench.not_written" in unwritten.missing()
    assert Section("z", "Z", "llmopt.bench.decode").missing() is None


def _sections() -> list[SectionResult]:
    decode = SectionResult("decode", "Decode", notes=["a note"], seconds=3.0)
    decode.rows.append(Row("decode, batch 1", "tokens/s", Spread.of([10.0, 11.0, 12.0]),
                           Spread.of([12.0, 13.0, 14.0]), ratio([12.0, 13.0, 14.0], [10.0, 11.0, 12.0]),
                           bound="memory ≤ 1.10×", predicted=1.15))
    decode.series.append(Series("throughput_vs_concurrency", "original", [1, 8], [10.0, 60.0]))
    capacity = SectionResult("kv-capacity", "Capacity", rows=[Row("capacity", "tokens", 100, 300, 3.0,
                                                                  check="✓ within 3%")])
    return [capacity, decode, SectionResult("routing", "Routing", skipped="token routing is not installed")]


def test_report_writer(tmp_path):
    header = {"command": "llmopt bench --quick", "quick": True, "started": "2026-11-30T00:00:00+00:00",
              "seconds": 12.0, "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5, "gpu": None},
              "versions": {"torch": "2.13.0", "vllm": None}, "load_average": [2.5, 3.0],
              "shared_machine": shared_machine(3.0, 2)}
    written = write_report(_sections(), header, tmp_path)
    assert [p.name for p in written] == ["bench.json", "bench.md", "throughput_vs_concurrency.png"]
    text = (tmp_path / "bench.md").read_text()
    assert "`llmopt bench --quick`" in text and "AMD EPYC, 2 cores" in text and "**Shared machine**" in text
    assert ("| decode | decode, batch 1 (tokens/s) | 11 (10–12) | 13 (12–14) | 1.18× (1.00×–1.40×) "
            "| memory ≤ 1.10× | 1.15× |  |") in text
    assert "| kv-capacity | capacity (tokens) | 100 | 300 | 3.00× |  |  | ✓ within 3% |" in text
    assert "Skipped: token routing is not installed" in text
    assert "vllm" not in text.split("Versions:")[1].split("\n")[0]  # absent versions are left out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["sections"][1]["rows"][0]["ratio"]["low"] == 1.0
    assert table(_sections()) in markdown(_sections(), header)
    assert shared_machine(0.4, 2) is None


def test_runner_moves_a_finished_folder_into_place(tmp_path, capsys):
    out = run_bench("smollm2-135m", tmp_path / "b", recipe=tmp_path / "kv.yaml", sections=["calibration"],
                    quick=True, argv=["bench", "--sections", "calibration"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    data = json.loads((out / "bench.json").read_text())
    assert data["command"] == "llmopt bench --sections calibration" and data["machine"]["cores"] >= 1
    assert data["versions"]["torch"] and data["started"]
    assert "calibration: skipped" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        run_bench("smollm2-135m", out, recipe=tmp_path / "kv.yaml", sections=["calibration"])


def test_cached_checkpoint_is_built_again_when_its_recipe_changes(tmp_path, monkeypatch):
    from llmopt.bench import compressed

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    built = []

    def build(model_name, recipe, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        built.append(Path(recipe).read_text())
        return 1.0

    monkeypatch.setattr(compressed, "build_optimized", build)
    recipe = tmp_path / "routing.yaml"
    recipe.write_text("routing:\n  sparsity: 0.3\n")
    first, seconds = compressed.cached_optimized("smollm2-135m", recipe)
    assert seconds == 1.0 and compressed.cached_optimized("smollm2-135m", recipe) == (first, None)
    recipe.write_text("routing:\n  sparsity: 0.15\n")
    second, seconds = compressed.cached_optimized("smollm2-135m", recipe)
    assert second != first and seconds == 1.0 and len(built) == 2


def _engine_results(tokens: int, step_s: float) -> dict:
    """What `vllm_measurements` returns for one model, made up: `step_s` per decode step per sequence."""
    decode = [{"kind": "decode", "batch": b, "prompt": p, "output": 16, "prefill_s": [0.05 * b, 0.06 * b],
               "decode_s": [15 * step_s * (1 + b / 8)] * 2}
              for b, p in ((1, 32), (1, 96), (4, 96))]
    capacity = {"tokens": tokens, "num_blocks": tokens // 128, "block_size": 128, "kv_bytes": 2**20}
    serve = {"kind": "serve", "requests": 12, "prompt": 32, "output": 64, "seconds": [10.0, 11.0]}
    return {"capacity": capacity, "decode": decode, "serving": {**capacity, "tasks": [serve]}}


def test_vllm_sections_on_made_up_measurements(tmp_path):
    """The capacity, decode and serving sections turn engine results into rows and notes (no engine here)."""
    from llmopt import KVCompressionConfig, OptimizationConfig, patch_model, save_optimized
    from llmopt.bench import decode, kv_capacity, serving
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK

    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    patch_model(model, OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=1, method="mean-pool")))
    save_optimized(model, tmp_path / "tiny-kv")
    bench = Bench(str(tmp_path / "tiny"), tmp_path / "kv.yaml", QUICK, tmp_path,
                  optimized_dir=tmp_path / "tiny-kv")
    bench.shared["vllm"] = {"original": _engine_results(512, 0.02), "optimized": _engine_results(2048, 0.019)}
    capacity = kv_capacity.run(bench)
    assert capacity.rows[1].ratio == 4.0 and capacity.rows[1].check.startswith("✓")
    assert capacity.rows[0].ratio == 4.0  # KV bytes per token: 4 → 1 KV heads
    speed = decode.run(bench)
    assert len(speed.rows) == 3 and all(r.predicted > 0 for r in speed.rows)
    assert speed.rows[0].ratio.median == pytest.approx(0.02 / 0.019)
    assert any("bandwidth bound" in note for note in speed.notes)
    serve = serving.run(bench)
    assert serve.rows[0].bound == "concurrency 3 → 12" and serve.rows[0].ratio.median == 1.0
    assert {s.plot for s in speed.series + serve.series} == {"throughput_vs_concurrency", "speed_vs_context"}


def test_vllm_in_float32_doubles_the_bytes_and_leaves_the_gpu_prediction_in_bf16(tmp_path, monkeypatch):
    """Where vLLM runs in float32 (a CPU without bf16 units), the engines are asked for it, the KV budget and the
    costs count 4 bytes a value, and the GPU prediction (bf16 there) comes out as from bf16 measurements."""
    from llmopt import KVCompressionConfig, OptimizationConfig, patch_model, save_optimized
    from llmopt.bench import decode, vllm_runs
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK

    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    patch_model(model, OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=1, method="mean-pool")))
    save_optimized(model, tmp_path / "tiny-kv")
    jobs = []

    def engine(job, _log):
        jobs.append(job)
        made_up = _engine_results(512 if Path(job["model"]).name == "tiny" else 2048, 0.02)
        return {**made_up["capacity"], "tasks": made_up["decode"] + made_up["serving"]["tasks"]}

    monkeypatch.setattr(vllm_runs, "run_engine", engine)
    benches = {dtype: Bench(str(tmp_path / "tiny"), tmp_path / "kv.yaml", QUICK, tmp_path / dtype,
                            optimized_dir=tmp_path / "tiny-kv", vllm_dtype=dtype) for dtype in ("bfloat16", "float32")}
    sections = {dtype: decode.run(bench) for dtype, bench in benches.items()}
    assert [job["dtype"] for job in jobs] == ["bfloat16"] * 2 + ["float32"] * 2
    assert jobs[2]["kv_cache_bytes"] == 2 * jobs[0]["kv_cache_bytes"]
    costs = {dtype: bench.cost(tmp_path / "tiny") for dtype, bench in benches.items()}
    assert costs["float32"].kv_bytes_per_token == 2 * costs["bfloat16"].kv_bytes_per_token
    assert costs["float32"].weight_bytes == 2 * costs["bfloat16"].weight_bytes
    assert [row.predicted for row in sections["float32"].rows] == pytest.approx(
        [row.predicted for row in sections["bfloat16"].rows])
    gpu = {dtype: decode.gpu_step_model(bench) for dtype, bench in benches.items()}
    step = {dtype: cost.decode(8, 2048) for dtype, cost in costs.items()}
    assert gpu["float32"].seconds(step["float32"]) == pytest.approx(gpu["bfloat16"].seconds(step["bfloat16"]))


def test_routing_section_times_a_routed_checkpoint(tmp_path, monkeypatch):
    import torch

    from llmopt import OptimizationConfig, TokenRoutingConfig, patch_model, save_optimized
    from llmopt.bench import prompts, routing, vllm_engine
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK

    model = tiny_model(max_position_embeddings=2048)
    config = TokenRoutingConfig(method="random", allocation="uniform", training=None, adapter_rank=0)
    patch_model(model, OptimizationConfig(routing=config))
    save_optimized(model, tmp_path / "tiny-routed")
    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(prompts, "heldout_tokens",
                        lambda _tokenizer, length: torch.randint(1, 97, (1, length), generator=generator))
    jobs = []

    def engine(job, _log):  # vLLM's results made up: the routed model prefills in half the time, decodes even
        jobs.append(job)
        prefill = [1.0, 1.0] if job["model"].endswith("tiny-routed") else [2.0, 2.0]
        return {"tasks": [{**task, "prefill_s": prefill, "decode_s": [3.1, 3.1]} for task in job["tasks"]]}

    monkeypatch.setattr(vllm_engine, "run_engine", engine)
    monkeypatch.setattr(Bench, "original", lambda _self: tmp_path / "original")
    bench = Bench("tiny", tmp_path / "kv.yaml", QUICK, tmp_path)
    bench.shared["checkpoint:routing-30.yaml"] = tmp_path / "tiny-routed"
    prefill, *decode, vllm_prefill, vllm_batch_1, vllm_batch_4 = routing.run(bench).rows
    assert "prefill, 1024 tokens" in prefill.claim and prefill.ratio.median > 0
    assert [row.claim for row in decode] == ["transformers greedy decode, batch 1",
                                             "transformers greedy decode, batch 4"]
    assert [(task["batch"], task["prompt"], task["text"]) for task in jobs[0]["tasks"]] == [
        (1, 1024, True), (1, 128, True), (4, 128, True)]
    assert vllm_prefill.claim == "vLLM prefill, 1024 tokens, batch 1" and vllm_prefill.ratio.median == 2.0
    assert vllm_prefill.bound == prefill.bound and vllm_prefill.bound.startswith("skipped block FLOPs")
    assert vllm_batch_4.claim == "vLLM greedy decode, batch 4, after 128-token prompts"
    assert vllm_batch_1.ratio.median == 1.0


def test_throughput_section_compares_every_checkpoint_with_the_original(tmp_path, monkeypatch):
    """The vLLM engine's results made up: one text load per model, all in one run."""
    from llmopt.bench import throughput
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK

    seconds = {"original": [5.0, 5.5], "kv": [5.0, 5.0], "routing": [4.0, 4.4], "sparse": [5.5, 5.5],
               "kv+routing+sparse": [4.2, 4.2]}
    engines = []

    def engine(job, _log):
        engines.append(job)
        name = job["model"]
        task = {**job["tasks"][0], "seconds": seconds[name]}
        if name == "routing":
            task["skipped_share"] = {"1": 0.3, "2": 0.5}
        return {"tasks": [task]}

    monkeypatch.setattr(throughput, "run_engine", engine)
    monkeypatch.setattr(throughput, "models", lambda _bench: {name: name for name in seconds})
    result = throughput.run(Bench("tiny", tmp_path / "kv.yaml", QUICK, tmp_path))
    assert [job["tasks"][0]["kind"] for job in engines] == ["text"] * 5
    rows = {(row.claim.split(":")[0], row.unit): row for row in result.rows}
    assert len(rows) == 8 and rows["routing", "requests/s"].ratio.median == pytest.approx(5.25 / 4.2)
    assert rows["routing", "output tokens/s"].optimized.median == pytest.approx((8 * 32 / 4.0 + 8 * 32 / 4.4) / 2)
    assert rows["sparse", "requests/s"].ratio.median < 1
    assert "40% of the routed blocks' tokens skipped" in result.notes[-1]


def test_sparse_checkpoint_in_vllm_is_timed_against_the_original_at_each_context(tmp_path, monkeypatch):
    """The vLLM engine's results made up: prefill seconds and decode steps per second of both models at each
    context, as ratios, each saying whether the plugin attends that context sparsely and the operator's bound."""
    from llmopt.bench import throughput, vllm_engine, vllm_loads
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK
    from llmopt.sparse.config import SparseAttentionConfig

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))  # no calibration: the built-in crossover
    jobs = []

    def engine(job, _log):
        jobs.append(job)
        prefill, decode = {"original": ([2.0, 2.0], [3.1, 3.1]), "sparse": ([1.0, 1.0, 4.0], [6.2, 6.2, 9.3])}[
            Path(job["model"]).name]
        return {"tasks": [{**task, "prefill_s": prefill, "decode_s": decode} for task in job["tasks"]]}

    monkeypatch.setattr(vllm_engine, "run_engine", engine)
    bench = Bench("tiny", tmp_path / "kv.yaml", dataclasses.replace(QUICK, sparse_vllm_contexts=(2048, 8192)),
                  tmp_path)
    monkeypatch.setattr(Bench, "original", lambda _self: tmp_path / "original")
    bench.shared[f"checkpoint:{throughput.RECIPES['sparse']}"] = tmp_path / "sparse"
    config = SparseAttentionConfig(decode_pages=64, vllm_decode_from=8176)
    rows = vllm_loads.sparse_rows(bench, config, {8192: {"prefill": 1.9, "decode": 0.6}})
    assert [task["prompt"] for task in jobs[0]["tasks"]] == [2016, 8160] and jobs[0]["max_model_len"] == 8192
    assert [job["model"] for job in jobs] == [str(tmp_path / "original"), str(tmp_path / "sparse")]
    assert [row.claim for row in rows] == [
        "vLLM prefill of 2016 tokens, batch 1, dense", "vLLM decode at 2016–2048 tokens of context, batch 1, dense",
        "vLLM prefill of 8160 tokens, batch 1, sparse",
        "vLLM decode at 8160–8192 tokens of context, batch 1, partly sparse"]
    assert [row.bound for row in rows] == ["", "", "attention alone 1.90×", "attention alone 0.60×"]
    assert rows[0].ratio.median == pytest.approx(2.0) and rows[1].ratio.median == pytest.approx(0.5)
    assert vllm_loads.runs_sparse(dataclasses.replace(config, vllm_prefill_from=2048), DEFAULT, 2048)[0]
    assert not vllm_loads.runs_sparse(config, DEFAULT, DEFAULT.prefill_from - 1)[0]  # the built-in crossover


def test_sparse_section_times_the_whole_sparse_model_against_the_original_in_transformers(monkeypatch):
    import torch

    from llmopt import patch_model
    from llmopt.bench import sparse_attention
    from llmopt.bench.settings import QUICK
    from llmopt.sparse.config import SparseAttentionConfig

    generator = torch.Generator().manual_seed(0)
    monkeypatch.setattr(sparse_attention, "heldout_tokens",
                        lambda _tokenizer, length: torch.randint(1, 97, (1, length), generator=generator))
    model = tiny_model()
    config = SparseAttentionConfig(block_size=16, mass=0.5, min_seq_len=48, decode_pages=2, decode_max_density=1.0)
    settings = dataclasses.replace(QUICK, sparse_generate=100, decode_tokens=6, repeats=2)
    rows, agreement = sparse_attention.generate_rows(model, None, config, settings)
    assert [row.claim for row in rows] == ["whole model in transformers, prefill of 100 tokens",
                                           "whole model in transformers, greedy decode after it, batch 1, "
                                           "pages read 0.57"]
    assert [row.original.samples for row in rows] == [2, 2] and all(row.ratio.median > 0 for row in rows)
    assert "of 6 equal the dense model's" in agreement
    assert not hasattr(model, "llmopt_sparse_stats")  # the original stays dense; a patched copy ran sparse
    speed = sparse_attention.generate_speed({"sparse": patch_model(model, config)}, torch.randint(1, 97, (1, 100)),
                                            6, repeats=1, warmup=0)
    assert len(speed["sparse"]["tokens"]) == 6 and model.llmopt_sparse_stats.calls["torch-decode"] == 3 * 5


def test_an_engine_job_that_times_out_takes_its_child_processes_with_it(tmp_path):
    """vLLM's engine core and workers are children of the job's process: a timeout must stop them too."""
    import os
    import time

    from llmopt.bench.vllm_engine import run_process_group

    pid_file = tmp_path / "child.pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    with (tmp_path / "log").open("w") as log, pytest.raises(subprocess.TimeoutExpired):
        run_process_group(command, dict(os.environ), log, timeout=1)
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    with (tmp_path / "log").open("w") as log:
        finished = run_process_group(["bash", "-c", "echo done; exit 3"], dict(os.environ), log, timeout=10)
    assert finished == (3, "done\n")


@pytest.mark.slow
@pytest.mark.vllm
def test_bench_quick_kv_capacity_end_to_end(tmp_path):
    """`llmopt bench --quick --sections kv-capacity` on a tiny model and its 4 → 1 KV-head twin (mean-pool: the
    weights' values do not matter for capacity): the capacity ratio is the head ratio."""
    pytest.importorskip("vllm")
    from llmopt import KVCompressionConfig, OptimizationConfig, patch_model, save_optimized
    from llmopt.models import load_model

    _, tokenizer = load_model("smollm2-135m")  # vLLM needs a tokenizer; the tiny model shares its vocabulary
    model = tiny_model(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4, head_dim=64,
                       max_position_embeddings=512)  # head_dim 64: one vLLM's CPU attention supports
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    patch_model(model, OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=1, method="mean-pool")))
    save_optimized(model, tmp_path / "tiny-kv", tokenizer)
    command = [sys.executable, "-m", "llmopt.cli", "bench", "--quick", "--sections", "kv-capacity", "--model",
               str(tmp_path / "tiny"), "--optimized", str(tmp_path / "tiny-kv"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    capacity = data["sections"][0]["rows"][1]
    assert capacity["ratio"] == pytest.approx(4.0, rel=0.03)
    assert "✓ within 3%" in capacity["check"]
    assert "| kv-capacity | vLLM KV capacity" in done.stdout
