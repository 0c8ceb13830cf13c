"""The dense/sparse crossover in vLLM: where it is found from measurements, how it is stored and read back, and
the bench's timing of vLLM's own CPU kernel (real attention, checked against SDPA)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llmopt.config import ConfigError
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.vllm_plugin.crossover import DEFAULT, Crossover, crossing, load_crossover, save_crossover


def test_crossing_interpolates_between_the_last_loss_and_the_first_win():
    assert crossing([(2048, 0.5), (4096, 1.5)]) == 3072
    assert crossing([(2048, 0.8), (4096, 0.9), (8192, 1.1)]) == 6144
    assert crossing([(1024, 1.2), (2048, 1.4)]) == 1024  # wins everywhere measured: from the shortest
    assert crossing([(2048, 1.2), (4096, 0.9), (8192, 1.3)]) == 5120  # a loss in between moves it past that loss
    assert crossing([(2048, 1.2), (4096, 0.99)]) is None  # loses at the longest: never
    assert crossing([]) is None


def test_a_calibration_holds_only_for_the_machine_and_dtype_it_was_measured_on(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    assert load_crossover("bfloat16") == DEFAULT  # no file
    path = save_crossover(Crossover(3000, None, "this bench"), "bfloat16", {"2048": {"dense_prefill": [1.0]}})
    assert path.parent == tmp_path
    loaded = load_crossover("bfloat16")
    assert (loaded.prefill_from, loaded.decode_from) == (3000, None) and str(path) in loaded.source
    assert load_crossover("float32") == DEFAULT
    stored = json.loads(path.read_text())
    stored["machine"]["cpu"] = "another CPU"
    path.write_text(json.dumps(stored))
    assert load_crossover("bfloat16") == DEFAULT
    path.write_text("{ not json")
    assert load_crossover("bfloat16") == DEFAULT


def test_the_recipe_can_set_the_crossover_and_is_told_what_a_bad_one_means():
    assert SparseAttentionConfig(vllm_prefill_from=4096, vllm_decode_from=6144).vllm_decode_from == 6144
    with pytest.raises(ConfigError, match="sparse.vllm_prefill_from must be a number of context tokens"):
        SparseAttentionConfig(vllm_prefill_from=0)


@pytest.mark.parametrize("query_len", [1, 200])
def test_the_bench_times_vllms_kernel_computing_real_attention(query_len):
    pytest.importorskip("vllm")
    from llmopt.bench.crossover import paged, vllm_attention

    generator = torch.Generator().manual_seed(0)
    heads, hkv, length, d = 4, 2, 300, 32
    q, k, v = (torch.randn(h, length, d, generator=generator) for h in (heads, hkv, hkv))
    cache, table = paged(k, v, "vec")
    out = torch.full((query_len, heads, d), float("nan"))
    vllm_attention("vec", cache, table, length, query_len, q.transpose(0, 1), d ** -0.5)(
        q[:, -query_len:].transpose(0, 1).contiguous(), out)
    mask = torch.ones(query_len, length, dtype=torch.bool).tril(length - query_len)
    expected = F.scaled_dot_product_attention(q[None, :, -query_len:], k[None], v[None], attn_mask=mask,
                                              enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_the_bench_times_both_paths_at_a_length():
    pytest.importorskip("vllm")
    from llmopt.bench.crossover import time_length

    generator = torch.Generator().manual_seed(0)
    qkv = [(torch.randn(1, 4, 512, 32, generator=generator), torch.randn(1, 2, 512, 32, generator=generator),
            torch.randn(1, 2, 512, 32, generator=generator))]
    config = SparseAttentionConfig(block_size=32, mass=0.5, min_seq_len=128, decode_pages=4)
    times = time_length(qkv, config, torch.float32, "vec", repeats=2, warmup=1)
    assert {name: len(times[name]) for name in ("dense_prefill", "sparse_prefill", "dense_decode", "sparse_decode")} \
        == dict.fromkeys(("dense_prefill", "sparse_prefill", "dense_decode", "sparse_decode"), 2)
    assert times["pages_read"] == pytest.approx(6 / 32)
