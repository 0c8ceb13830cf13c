"""llmopt's vLLM plugin on vllm-cpu: registration, the paged-cache reader, `llmopt serve`'s checks, and the real
engine: a plain model served exactly as without the plugin, sparse and routed checkpoints matching transformers
through chunked prefill, batching (and, sparse, the prefix cache) and tensor parallelism, and the OpenAI server
under 128 concurrent requests with bad ones and clients that hang up."""

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from llmopt.checkpoint import load_optimized, save_optimized
from llmopt.cli import main
from llmopt.config import OptimizationConfig
from llmopt.kv.config import KVCompressionConfig
from llmopt.patch import patch_model
from llmopt.routing.config import RouterTrainingConfig, TokenRoutingConfig
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.sparse.selection import select_blocks
from llmopt.vllm_plugin.sparse_chunk import sparse_chunk_attention

# CPU attention supports head sizes 32, 64, 80, ...: the tiny Llama gets head_dim 32 (SmolLM2: 64)
SHAPE = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024}
# sparse wherever the recipe allows it, whatever crossover this machine calibrated (tests of the crossover: the
# sparse checkpoint served dense below it, tests/test_crossover.py)
SPARSE = SparseAttentionConfig(block_size=32, mass=0.3, min_seq_len=128, vllm_prefill_from=1, vllm_decode_from=1)
# chunks of 256 tokens start on sparse block boundaries, so chunked prefill must reproduce the one-pass prefill
ENGINE = {"max_model_len": 600, "max_num_batched_tokens": 256, "skip_tokenizer_init": True,
          "enable_prefix_caching": True}
# learned routers with skip adapters (every part of the real ones), two steps of each training stage: the
# logic, not the quality
ROUTING = TokenRoutingConfig(sparsity=0.3, seq_len=64, calibration_tokens=512, adapter_rank=8,
                             training=RouterTrainingConfig(steps=2, seq_len=64, tokens=256, batch_size=2,
                                                           warmup_steps=1, precision="float32", guide_steps=2,
                                                           router_learning_rate=1e-3))


def vllm_generate(model: Path, calls: list, plugins: str, max_tokens: int = 8, routing_counts: bool = False,
                  engine: dict | None = None, env: dict | None = None) -> dict:
    spec = {"model": str(model), "engine": {**ENGINE, **(engine or {})}, "calls": calls, "max_tokens": max_tokens,
            "routing_counts": routing_counts}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": plugins,
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1" if routing_counts else "0", **(env or {})}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_generate.py")), json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[6:])


@pytest.fixture(scope="module")
def prompts() -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randint(0, 97, (length,), generator=generator).tolist()
            for name, length in (("long", 512), ("long_b", 416), ("short", 64))}


def greedy(model, ids: list[int], n: int = 8) -> list[int]:
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def test_register_is_idempotent_and_replaces_cpu_attention(monkeypatch):
    pytest.importorskip("vllm")
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import llmopt.vllm_plugin as plugin

    monkeypatch.setattr(plugin, "_registered", False)
    try:
        plugin.register()
        monkeypatch.setattr(plugin, "_registered", False)  # a second process-level call finds it registered
        plugin.register()
        assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.CPU_ATTENTION
        assert AttentionBackendEnum.CPU_ATTN.get_class().get_name() == "CPU_ATTN"
        assert plugin.ROUTED_ARCHITECTURE in ModelRegistry.get_supported_archs()
    finally:
        AttentionBackendEnum.CPU_ATTN.clear_override()
        ModelRegistry.models.pop(plugin.ROUTED_ARCHITECTURE, None)


def paged_cache(k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block_size: int, num_blocks: int,
                cache: torch.Tensor | None = None, isa: str = "vec") -> torch.Tensor:
    """k/v ``[L, Hkv, D]`` written by vLLM's CPU kernel into the blocks `blocks` of a (new) paged cache."""
    from vllm import _custom_ops as ops

    hkv, d = k.shape[1:]
    if cache is None:
        cache = torch.zeros(num_blocks, hkv, block_size, 2 * d, dtype=k.dtype)
    key_cache, value_cache = cache.view(num_blocks, hkv, 2 * block_size, d).chunk(2, dim=2)
    positions = torch.arange(len(k))
    slots = blocks[positions // block_size].long() * block_size + positions % block_size
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("isa, head_size", [("vec", 64), ("vec16", 80)])
def test_gather_kv_reads_back_what_vllms_cpu_kernel_wrote(isa, head_size, dtype):
    pytest.importorskip("vllm")
    from llmopt.vllm_plugin.paged_kv import LAYOUT_ISAS, gather_kv

    assert isa in LAYOUT_ISAS
    num_blocks, hkv, block_size, seq_len = 6, 2, 32, 70
    k, v = torch.randn(2, seq_len, hkv, head_size).to(dtype)
    blocks = torch.tensor([4, 1, 3, 0], dtype=torch.int32)  # the request's blocks, out of order
    cache = paged_cache(k, v, blocks, block_size, num_blocks, isa=isa)
    read_k, read_v = gather_kv(cache, blocks, seq_len)
    assert torch.equal(read_k[0].transpose(0, 1), k) and torch.equal(read_v[0].transpose(0, 1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_sparse_decode_attends_the_pages_transformers_chooses_and_forgets_rewritten_pages(dtype):
    pytest.importorskip("vllm")
    from llmopt.sparse.decode import select_pages, sparse_decode_torch, summarize
    from llmopt.vllm_plugin.paged_decode import PagedKeyBounds, paged_sparse_decode

    generator = torch.Generator().manual_seed(0)
    hkv, h, d, block_size, page, pages, num_blocks = 2, 4, 64, 64, 16, 2, 12
    lengths = [200, 129, 160]  # a partial last page, a single token on it, none
    tables = torch.tensor([[3, 7, 0, 9], [5, 1, 11, 2], [8, 4, 10, 6]], dtype=torch.int32)
    keys = [torch.randn(n, hkv, d, generator=generator).to(dtype) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=generator).to(dtype) for n in lengths]
    q = torch.randn(3, h, d, generator=generator).to(dtype)

    def expected(i: int) -> torch.Tensor:
        k, v = keys[i].transpose(0, 1)[None], values[i].transpose(0, 1)[None]
        indices, _ = select_pages(q[i:i + 1], summarize(k, page, None), lengths[i], page, pages)
        return sparse_decode_torch(q[i:i + 1], k, v, indices, page, d ** -0.5)[0]

    cache = None
    for k, v, table in zip(keys, values, tables):
        cache = paged_cache(k, v, table, block_size, num_blocks, cache)
    bounds = PagedKeyBounds(cache, page)
    seq_lens = torch.tensor(lengths)
    got = paged_sparse_decode(q, cache, tables, seq_lens, bounds, pages, d ** -0.5)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for i in range(3):
        torch.testing.assert_close(got[i], expected(i), **tolerance)
    # request 1's blocks go to a new request (vLLM freed them): the written slots invalidate their pages
    keys[1] = torch.randn(lengths[1], hkv, d, generator=generator).to(dtype) * 3
    values[1] = torch.randn(lengths[1], hkv, d, generator=generator).to(dtype)
    paged_cache(keys[1], values[1], tables[1], block_size, num_blocks, cache)
    positions = torch.arange(lengths[1])
    stale = paged_sparse_decode(q, cache, tables, seq_lens, bounds, pages, d ** -0.5)
    bounds.invalidate(tables[1][positions // block_size].long() * block_size + positions % block_size)
    fresh = paged_sparse_decode(q, cache, tables, seq_lens, bounds, pages, d ** -0.5)
    torch.testing.assert_close(fresh[1], expected(1), **tolerance)
    assert not torch.allclose(stale[1], fresh[1], rtol=1e-3, atol=1e-3)  # stale bounds chose other pages
    torch.testing.assert_close(fresh[[0, 2]], got[[0, 2]], rtol=0, atol=0)


def write_config(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_serve_refuses_before_starting_vllm(tmp_path, capsys, monkeypatch):
    pytest.importorskip("vllm")
    from llmopt.vllm_plugin import settings

    routed = write_config(tmp_path / "routed", {"llmopt": {"version": 2, "routing": {}}})
    with monkeypatch.context() as gpu:
        gpu.setattr(settings, "cpu_build", lambda: False)  # routing runs on vLLM's CPU attention backend only
        assert main(["serve", str(routed)]) == 2
    assert ("uses routing, which needs llmopt's vLLM plugin, and the plugin cannot serve it on this GPU build"
            in capsys.readouterr().err)
    ftp = write_config(tmp_path / "ftp", {"llmopt": {"version": 2, "routing": {"features": "ftp"}}})
    assert main(["serve", str(ftp)]) == 2
    assert "routing on FTP features (attention mass: vLLM's attention kernels" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "no model" in capsys.readouterr().err
    broken = write_config(tmp_path / "broken", {})
    (broken / "config.json").write_text("{ not json")
    assert main(["serve", str(broken)]) == 2
    assert "config.json is corrupt (not JSON" in capsys.readouterr().err
    sparse = write_config(tmp_path / "sparse", {"llmopt": {"version": 2, "sparse": {}}})
    split = write_config(tmp_path / "split", {"model_type": "llama", "num_attention_heads": 4,
                                              "num_key_value_heads": 1, "llmopt": {"version": 2, "sparse": {}}})
    assert main(["serve", str(split), "--tensor-parallel-size", "2"]) == 2
    assert "a layer with 1 KV head(s) would split each head's query group" in capsys.readouterr().err
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    assert main(["serve", str(sparse)]) == 2
    assert "VLLM_PLUGINS='lora_filesystem_resolver' must name llmopt" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "vllm", None)  # what find_spec reports when vLLM is not installed
    assert main(["serve", str(sparse)]) == 2
    assert "vLLM is not installed in this environment" in capsys.readouterr().err


@pytest.mark.parametrize("native, dtype", [(False, "float32"), (True, "auto")])
def test_serve_on_a_cpu_without_bf16_units_asks_vllm_for_float32(tmp_path, monkeypatch, native, dtype):
    pytest.importorskip("vllm")
    from llmopt import precision
    from llmopt.vllm_plugin import settings

    monkeypatch.setattr(settings, "cpu_build", lambda: True)
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    started = []
    monkeypatch.setattr(os, "execve", lambda path, command, env: started.append(command))
    plain = tmp_path / "plain"
    tiny_model(**SHAPE).save_pretrained(plain)  # a complete checkpoint: serve checks its weights before vLLM starts
    assert main(["serve", str(plain)]) == 0
    assert started[0][started[0].index("--dtype") + 1] == dtype
    assert main(["serve", str(plain), "--dtype", "bfloat16"]) == 0  # the user's choice wins
    assert started[1][started[1].index("--dtype") + 1] == "bfloat16"


def test_cpu_defaults_size_the_kv_cache_and_keep_what_the_user_set():
    pytest.importorskip("vllm")
    from llmopt.vllm_plugin.settings import cpu_defaults

    assert 1 <= int(cpu_defaults({})["VLLM_CPU_KVCACHE_SPACE"]) <= 16
    assert cpu_defaults({"VLLM_CPU_KVCACHE_SPACE": "3"}) == {}


def test_tensor_parallel_workers_get_a_cpu_group_each_where_numa_nodes_are_fewer(monkeypatch):
    from llmopt.vllm_plugin import settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    monkeypatch.setattr(settings, "numa_nodes", lambda: 1)
    kept = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert settings.cpu_defaults(kept, 2) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3,4"}
    assert settings.cpu_defaults(kept, 1) == {}  # vLLM's own binding
    assert settings.cpu_defaults({**kept, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}, 2) == {}
    monkeypatch.setattr(settings, "numa_nodes", lambda: 2)
    assert settings.cpu_defaults(kept, 2) == {}  # a node per worker: vLLM binds them itself
    assert [settings.tensor_parallel_size(args) for args in (
        [], ["--enforce-eager"], ["--tensor-parallel-size", "2"], ["--tensor-parallel-size=4"], ["-tp", "2"])] == [
        1, 1, 2, 4, 2]


@pytest.mark.vllm
@pytest.mark.slow
def test_a_kv_compressed_checkpoint_under_tensor_parallelism_2_generates_as_one_process(tmp_path, prompts):
    model = patch_model(tiny_model(**{**SHAPE, "num_key_value_heads": 4}), KVCompressionConfig(num_kv_heads=2,
                                                                                                method="mean-pool"))
    path = save_optimized(model, tmp_path / "kv")
    calls = [[prompts["long"], prompts["short"]]]
    assert tensor_parallel_2(path, calls)["tokens"] == vllm_generate(path, calls, "llmopt")["tokens"]


def tensor_parallel_2(path: Path, calls: list, **options) -> dict:
    """`vllm_generate` with two workers, bound as llmopt serve binds them where the machine has fewer NUMA nodes
    than workers (vLLM refuses otherwise)."""
    from llmopt.vllm_plugin.settings import cpu_defaults

    engine = {"tensor_parallel_size": 2, **options.pop("engine", {})}
    return vllm_generate(path, calls, "llmopt", engine=engine, env=cpu_defaults({"VLLM_CPU_KVCACHE_SPACE": "1"}, 2),
                         **options)


@pytest.mark.vllm
@pytest.mark.slow
def test_sparse_checkpoint_under_tensor_parallelism_2_gives_the_greedy_tokens_of_transformers(tmp_path, prompts):
    """Each worker attends its own heads sparsely: the pages it chooses per KV head are those of one process."""
    sparse = patch_model(tiny_model(**SHAPE), dataclasses.replace(SPARSE, decode_pages=2, decode_max_density=1.0))
    expected = [greedy(sparse, prompts["long"]), greedy(sparse, prompts["short"])]
    assert expected[0] != greedy(tiny_model(**SHAPE), prompts["long"])
    path = save_optimized(sparse, tmp_path / "sparse")
    assert tensor_parallel_2(path, [[prompts["long"], prompts["short"]]])["tokens"] == [expected]


@pytest.mark.vllm
@pytest.mark.slow
def test_plain_model_is_served_exactly_as_without_the_plugin(tmp_path, prompts):
    path = tmp_path / "plain"
    tiny_model(**SHAPE).save_pretrained(path)
    calls = [[prompts["long"]], [prompts["short"]], [prompts["long"]]]  # one request a call: the same steps
    without, with_plugin = vllm_generate(path, calls, ""), vllm_generate(path, calls, "llmopt")
    assert without["backend"].startswith("vllm.") and with_plugin["backend"].startswith("llmopt.")
    assert with_plugin["tokens"] == without["tokens"]
    assert with_plugin["logprobs"] == without["logprobs"]  # bit for bit: the same kernel ran


@pytest.mark.vllm
@pytest.mark.slow
def test_sparse_checkpoint_gives_the_greedy_tokens_of_the_sparse_model_in_transformers(tmp_path, prompts):
    """Sparse prefill and sparse decode (the sink, 2 more pages of 16 keys and the partial one, per KV head) as
    transformers runs them."""
    dense, prefill_only = tiny_model(**SHAPE), patch_model(tiny_model(**SHAPE), SPARSE)
    sparse = patch_model(tiny_model(**SHAPE), dataclasses.replace(SPARSE, decode_pages=2, decode_max_density=1.0))
    expected = {name: greedy(sparse, ids) for name, ids in prompts.items()}
    assert sparse.llmopt_sparse_stats.calls["torch-decode"] > 0
    assert expected["long"] != greedy(dense, prompts["long"])  # sparse attention changes these outputs ...
    assert expected["long_b"] != greedy(dense, prompts["long_b"])
    assert expected["short"] == greedy(dense, prompts["short"])  # ... and not those of a short prompt
    assert expected["long"] != greedy(prefill_only, prompts["long"])  # sparse decode changes them too
    path = save_optimized(sparse, tmp_path / "sparse")
    # the long prompt in two chunks; again, from the prefix cache; a long prompt whose second chunk shares a step
    # with a short (dense) prompt. Chunks start on block boundaries however the requests reach the scheduler: a
    # request added while the first one runs would shift the chunks of a long prompt behind it.
    result = vllm_generate(path, [[prompts["long"]], [prompts["long"]], [prompts["long_b"], prompts["short"]]],
                           "llmopt")
    assert result["tokens"] == [[expected["long"]], [expected["long"]], [expected["long_b"], expected["short"]]]
    assert result["cached"][1][0] >= 256, result["cached"]


@pytest.mark.vllm
@pytest.mark.slow
def test_sparse_checkpoint_runs_vllms_dense_kernel_below_the_crossover(tmp_path, prompts, monkeypatch):
    """No calibration on this machine and none in the recipe: the built-in crossover holds, under which the long
    prompts' prefill and decode run vLLM's own kernel (the tiny model's contexts are far below it)."""
    from llmopt.vllm_plugin.crossover import DEFAULT

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    config = dataclasses.replace(SPARSE, decode_pages=2, decode_max_density=1.0, vllm_prefill_from=None,
                                 vllm_decode_from=None)
    assert all(length is None or length > len(prompts["long"]) + 8
               for length in (DEFAULT.prefill_from, DEFAULT.decode_from))
    dense = tiny_model(**SHAPE)
    expected = [greedy(dense, prompts["long"]), greedy(dense, prompts["long_b"])]
    path = save_optimized(patch_model(tiny_model(**SHAPE), config), tmp_path / "sparse")
    assert vllm_generate(path, [[prompts["long"], prompts["long_b"]]], "llmopt")["tokens"] == [expected]


@pytest.mark.vllm
@pytest.mark.slow
def test_per_layer_kv_checkpoint_gives_the_greedy_tokens_of_transformers_in_a_per_layer_cache(tmp_path, prompts):
    model = patch_model(tiny_model(**SHAPE), KVCompressionConfig(num_kv_heads=[1, 2, 1], method="mean-pool"))
    expected = {name: greedy(model, ids) for name, ids in prompts.items()}
    path = save_optimized(model, tmp_path / "kv")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlmoptKVLlamaForCausalLM"]
    result = vllm_generate(path, [[prompts["long"]], [prompts["long_b"], prompts["short"]]], "llmopt")
    assert result["tokens"] == [[expected["long"]], [expected["long_b"], expected["short"]]]
    # VLLM_CPU_KVCACHE_SPACE=1 GiB of float32 K and V: 1 + 2 + 1 heads of 32, not 3 layers of 2 heads
    bytes_per_token = (1 + 2 + 1) * 2 * 32 * 4
    assert 0 <= 2**30 / bytes_per_token - result["capacity_tokens"] < 2 * 128, result["capacity_tokens"]


def kept_counts(records) -> dict[str, list[int]]:
    """Per routed block (its index as a string, as JSON has it): [tokens routed, tokens kept] over `records`."""
    counts: dict[str, list[int]] = {}
    for record in records:
        seen_kept = counts.setdefault(str(record.index), [0, 0])
        seen_kept[0] += record.keep.numel()
        seen_kept[1] += int(record.keep.sum())
    return counts


def routed_model(calibration: torch.Tensor, kv: KVCompressionConfig | None = None, sparse: bool = False):
    recipe = OptimizationConfig(routing=ROUTING, **({"kv": kv} if kv else {}), **({"sparse": SPARSE} if sparse else {}))
    return patch_model(tiny_model(**SHAPE), recipe, calibration=calibration)


def test_routed_checkpoint_names_the_plugins_architecture_and_still_loads_in_transformers(tmp_path,
                                                                                         token_windows_tiny):
    routed = routed_model(token_windows_tiny)
    path = save_optimized(routed, tmp_path / "routed")
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlmoptLlamaForCausalLM"]
    assert config["llmopt"]["architectures"] == ["LlamaForCausalLM"]
    reloaded, _ = load_optimized(path)
    assert reloaded.config.architectures == ["LlamaForCausalLM"]
    ids = token_windows_tiny[:2]
    torch.testing.assert_close(reloaded(ids).logits, routed(ids).logits, rtol=0, atol=0)
    again = json.loads((save_optimized(reloaded, tmp_path / "again") / "config.json").read_text())
    assert again["architectures"] == config["architectures"] and again["llmopt"] == config["llmopt"]
    plain = save_optimized(patch_model(tiny_model(**SHAPE), SPARSE), tmp_path / "sparse")
    assert json.loads((plain / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kv, sparse, eager", [
    (None, False, True), (KVCompressionConfig(num_kv_heads=1, method="mean-pool"), False, False),
    (KVCompressionConfig(num_kv_heads=1, method="mean-pool"), True, True)],
    ids=["routing", "kv+routing-default-mode", "kv+routing+sparse"])
def test_routed_checkpoint_gives_the_greedy_tokens_and_skips_of_the_routed_model_in_transformers(
        tmp_path, prompts, token_windows_tiny, kv, sparse, eager):
    """Eager, in vLLM's default mode (compilation on: the routed model stays eager, but vLLM's layers switch
    to their native torch implementations, e.g. a rotary embedding that is not in place), and composed with
    sparse attention (the blocks that run dense use it; a routed block's kept tokens attend densely)."""
    routed = routed_model(token_windows_tiny, kv, sparse)
    router = routed.model.token_router
    with router.recording() as records:
        expected = {name: greedy(routed, ids) for name, ids in prompts.items()}
    if sparse:  # the long prompts engaged sparse attention in the blocks that ran dense
        assert routed.llmopt_sparse_stats.calls.get("torch", 0) > 0 and routed.llmopt_sparse_stats.density < 0.9
    dense = tiny_model(**SHAPE)
    assert any(tokens != greedy(dense, prompts[name]) for name, tokens in expected.items())
    counts = kept_counts(records)  # each prompt's prefill and 7 decode steps, as vLLM runs them
    assert counts and all(0 < kept < seen for seen, kept in counts.values())  # every routed block skips some
    path = save_optimized(routed, tmp_path / "routed")
    # the long prompt alone, in two chunks (the second attends to the first's KV, skipped tokens' included); then
    # two prompts in one batch, decode steps and prefill chunks sharing steps
    result = vllm_generate(path, [[prompts["long"]], [prompts["long_b"], prompts["short"]]], "llmopt",
                           routing_counts=True, engine={"enforce_eager": eager})
    assert result["tokens"] == [[expected["long"]], [expected["long_b"], expected["short"]]]
    # the rows vLLM ran through each routed block's attention and MLP: exactly those transformers kept
    assert result["routing_counts"] == [counts]


@pytest.mark.vllm
@pytest.mark.slow
def test_composed_checkpoint_under_tensor_parallelism_2_routes_as_one_process(tmp_path, prompts,
                                                                              token_windows_tiny):
    """KV heads per layer, token routing and sparse attention in one checkpoint, split over two workers: the
    greedy tokens of transformers, and both workers run exactly the rows transformers kept in each routed block.
    (With fewer KV heads than workers in a layer, a sparse checkpoint is refused: `split_query_groups`.)"""
    recipe = OptimizationConfig(routing=ROUTING, kv=KVCompressionConfig(num_kv_heads=[2, 4, 2], method="mean-pool"),
                                sparse=SPARSE)
    routed = patch_model(tiny_model(**{**SHAPE, "num_key_value_heads": 4}), recipe, calibration=token_windows_tiny)
    with routed.model.token_router.recording() as records:
        expected = [greedy(routed, prompts["long"]), greedy(routed, prompts["short"])]
    path = save_optimized(routed, tmp_path / "composed")
    result = tensor_parallel_2(path, [[prompts["long"], prompts["short"]]], routing_counts=True)
    assert result["tokens"] == [expected]
    assert result["routing_counts"] == [kept_counts(records)] * 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_until_serving(server: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise AssertionError(f"no answer from {url} in {timeout} s:\n{log.read_text()[-4000:]}")


def status_of(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def hang_up_mid_stream(port: int, body: dict) -> bytes:
    """Ask for a streamed completion, read its first event, then close the connection: a client that goes away."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    first = connection.getresponse().readline()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    return first


def engine_metric(base: str, name: str) -> float:
    """vLLM's Prometheus metric `name`, summed over its series."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + "{", name + " ")))


@pytest.mark.vllm
@pytest.mark.slow
def test_llmopt_serve_answers_128_concurrent_requests_among_bad_ones_and_clients_that_hang_up(tmp_path):
    """128 good requests at once, with 16 bad ones (too long, unknown model, negative max_tokens, broken JSON)
    and 16 streamed ones whose clients close the connection after the first token: each good answer equals
    the same request sent alone, each bad one gets its 4xx, and the hung-up requests leave the engine."""
    from llmopt.models import resolve_model

    model = resolve_model("smollm2-135m")  # provisioned before the server's clock starts
    port, log = free_port(), tmp_path / "server.log"
    # as a user calls it: the venv's script, no activated environment
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "VLLM_CPU_KVCACHE_SPACE")},
           "PATH": "/usr/bin:/bin"}
    command = [str(Path(sys.executable).with_name("llmopt")), "serve", "smollm2-135m", "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    completions = f"{base}/v1/completions"
    try:
        wait_until_serving(server, f"{base}/health", log)

        def complete(prompt: str) -> tuple[str, int]:
            answer = post(completions, {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0})
            return answer["choices"][0]["text"], answer["usage"]["completion_tokens"]

        good = {"model": model, "prompt": "Once upon a time", "max_tokens": 8}
        bad = [({**good, "prompt": "word " * 600}, 400), ({**good, "model": "no-such-model"}, 404),
               ({**good, "max_tokens": -1}, 400), (b'{"model": "', 400)] * 4
        questions = [f"Once upon a time, in a land with {i + 2} castles," for i in range(128)]
        with ThreadPoolExecutor(160) as pool:
            refused = [pool.submit(status_of, completions, body if isinstance(body, bytes) else
                                   json.dumps(body).encode()) for body, _ in bad]
            hung_up = [pool.submit(hang_up_mid_stream, port, {**good, "prompt": question, "max_tokens": 256,
                                                              "ignore_eos": True}) for question in questions[:16]]
            answers = list(pool.map(complete, questions))
        assert [future.result() for future in refused] == [code for _, code in bad]
        assert all(future.result().startswith(b"data: ") for future in hung_up)
        assert all(text for text, _ in answers) and answers == [complete(question) for question in questions]

        def in_engine() -> float:
            return sum(engine_metric(base, f"vllm:num_requests_{state}") for state in ("running", "waiting"))

        deadline = time.monotonic() + 60
        while in_engine() and time.monotonic() < deadline:
            time.sleep(1)
        assert in_engine() == 0, "requests whose clients hung up are still in the engine"
        # stopped when their clients left, not run to their 256 tokens for nobody
        generated = engine_metric(base, "vllm:generation_tokens_total") - 2 * sum(n for _, n in answers)
        assert 0 < generated < len(hung_up) * 256 / 2, generated
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert "CPU defaults VLLM_CPU_KVCACHE_SPACE=" in log.read_text()


@pytest.mark.vllm
@pytest.mark.slow
def test_llmopt_serve_stops_on_sigterm_and_leaves_no_engine_process(tmp_path):
    import psutil
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from llmopt.models.default import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("smollm2-135m"))
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=64, vocab_size=len(tokenizer),
                         architectures=["LlamaForCausalLM"])
    model = save_optimized(AutoModelForCausalLM.from_config(config), tmp_path / "tiny", tokenizer)
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "llmopt.cli", "serve", str(model), "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "256"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                  env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/health", log)
        engine = psutil.Process(server.pid).children(recursive=True)
        assert engine, "vLLM's API server started no engine process: nothing to check"
        server.send_signal(signal.SIGTERM)  # as `kill PID` or a supervisor stops it: the server alone
        assert server.wait(timeout=120) in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()[-4000:]
        _, alive = psutil.wait_procs(engine, timeout=30)
        assert not alive, f"orphaned after SIGTERM: {[(p.pid, p.name()) for p in alive]}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left in its group, so no later test is slowed


@pytest.mark.parametrize("split", [256, 200])
def test_a_chunk_attends_as_in_the_one_pass_prefill(split):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 512, 32, generator=generator) * 3
    k, v = torch.randn(2, 1, 2, 512, 32, generator=generator)
    whole = sparse_chunk_attention(q, k, v, SPARSE, 32 ** -0.5)
    chunk = sparse_chunk_attention(q[:, :, split:], k, v, SPARSE, 32 ** -0.5)
    # from the first block boundary of the chunk on, every query block is the one-pass prefill's
    boundary = -(-split // 32) * 32
    torch.testing.assert_close(chunk[:, :, boundary - split:], whole[:, :, boundary:], rtol=1e-5, atol=1e-5)
    assert select_blocks(q, k, SPARSE, 32 ** -0.5).density < 0.8  # a real selection, not every block
