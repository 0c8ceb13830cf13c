"""Every model family in the adapter registry on a tiny random multi-head model built offline from its config: the
KV fold is lossless where a group's heads are redundant, the calibrated fold beats mean-pooling, the result
saves and loads back to identical logits; families the fold refuses are refused before any work, with the reason."""

import functools
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_family_model

from llmopt import KVCompressionConfig, patch_model, save_optimized
from llmopt.arch.adapter import ADAPTERS, Projection, UnsupportedModelError, attention_shape
from llmopt.checkpoint import load_optimized
from llmopt.cli import main
from llmopt.families import families_table
from llmopt.kv.transform import KVCompression
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.sparse.transform import SparseAttention

FOLDED = [name for name, adapter in ADAPTERS.items() if KVCompression().support(adapter).applies]
REFUSED = [name for name in ADAPTERS if name not in FOLDED]
# transformers saves fused MoE experts in their per-expert form; load_optimized's strict load does not convert back
MOE_LOAD = pytest.mark.xfail(strict=True, reason="load_optimized does not convert per-expert MoE weights")
RELOADED = [pytest.param(name, marks=MOE_LOAD) if "Moe" in name or "Mixtral" in name else name for name in FOLDED]
CALIBRATION = {"calibration_tokens": 512, "seq_len": 32}
WINDOWS = torch.randint(0, 97, (16, 32), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def with_redundant_kv_heads(model):
    """`model` with the keys and values of every odd KV head copied from the head before it (queries untouched):
    merging heads in pairs then loses nothing, whatever each layer's RoPE share or layout."""
    adapter, shape = ADAPTERS[model.config.architectures[0]], attention_shape(model.config)
    d = shape.head_dim

    def paired(param):
        heads = param.detach().clone().unflatten(0, (shape.num_kv_heads // 2, 2, d))
        return heads[:, :1].expand_as(heads).flatten(0, 2).contiguous()

    with torch.no_grad():
        for attention in adapter.attention_modules(model):
            q, k, v = adapter.projections(attention, shape.num_heads, shape.num_kv_heads, d)
            k, v = (Projection(paired(p.weight), None if p.bias is None else paired(p.bias)) for p in (k, v))
            adapter.replace_projections(attention, Projection(q.weight.clone(), q.bias), k, v)
    return model


def test_the_registry_covers_at_least_fourteen_families_and_each_has_a_tiny_model():
    assert len({adapter.family for adapter in ADAPTERS.values()}) >= 14
    assert set(FAMILY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("architecture", list(ADAPTERS))
def test_q_k_v_read_from_the_weights_are_what_the_projections_compute(architecture):
    """Each layout's reading ([Q|K|V] rows, per-head [q,k,v] rows, a transposed Conv1D) against the module's output."""
    model = tiny_family_model(architecture)
    adapter, shape = ADAPTERS[architecture], attention_shape(model.config)
    attention = adapter.attention_modules(model)[0]
    x = torch.randn(5, shape.hidden_size)
    with torch.no_grad():
        outputs = adapter.split_qkv([m(x) for m in adapter.projection_modules(attention)], shape.num_heads,
                                    shape.num_kv_heads, shape.head_dim)
    for projection, output in zip(adapter.projections(attention, shape.num_heads, shape.num_kv_heads,
                                                      shape.head_dim), outputs):
        torch.testing.assert_close(torch.nn.functional.linear(x, projection.weight, projection.bias), output)


@functools.cache
def folded_twin(architecture):
    """(the twin folded 2 → 1 per group, the twin's logits on `WINDOWS[:2]` before the fold), built once."""
    model = with_redundant_kv_heads(tiny_family_model(architecture))
    expected = logits(model, WINDOWS[:2])
    patch_model(model, KVCompressionConfig(ratio=2, **CALIBRATION), calibration=WINDOWS)
    return model, expected


@pytest.mark.parametrize("architecture", FOLDED)
def test_redundant_heads_fold_losslessly(architecture):
    model, expected = folded_twin(architecture)
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(model, WINDOWS[:2]), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("architecture", RELOADED)
def test_the_folded_model_reloads_with_identical_logits(architecture, tmp_path):
    model, _ = folded_twin(architecture)
    reloaded, _ = load_optimized(save_optimized(model, tmp_path / "out"))
    assert type(reloaded) is type(model) and reloaded.config.num_key_value_heads == 2
    reloaded.set_attn_implementation(model.config._attn_implementation)
    torch.testing.assert_close(logits(reloaded, WINDOWS[:2]), logits(model, WINDOWS[:2]), atol=0, rtol=0)


@pytest.mark.parametrize("architecture", FOLDED)
def test_the_calibrated_fold_beats_mean_pooling(architecture):
    ids = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(2))
    reference = logits(tiny_family_model(architecture), ids).log_softmax(-1)
    kl = {}
    for method in ("calibrated", "mean-pool"):
        model = patch_model(tiny_family_model(architecture),
                            KVCompressionConfig(ratio=2, method=method, **CALIBRATION),
                            calibration=WINDOWS)
        out = logits(model, ids).log_softmax(-1)
        kl[method] = float((reference.exp() * (reference - out)).sum(-1).mean())
    assert kl["calibrated"] < kl["mean-pool"], kl


@pytest.mark.parametrize("architecture", REFUSED)
def test_a_refused_family_is_refused_with_its_reason_before_any_work(architecture):
    model = tiny_family_model(architecture)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    reason = KVCompression().support(ADAPTERS[architecture], model.config).reason
    assert reason
    with pytest.raises(UnsupportedModelError, match="kv: "):
        patch_model(model, KVCompressionConfig(ratio=2, **CALIBRATION), calibration=torch.zeros(1, 1, dtype=torch.long))
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


SPARSE = SparseAttention()


@pytest.mark.parametrize("architecture", list(ADAPTERS))
def test_sparse_attention_runs_where_it_applies_and_is_refused_with_the_reason_elsewhere(architecture):
    model = tiny_family_model(architecture)
    ids = torch.randint(0, 97, (1, 192), generator=torch.Generator().manual_seed(0))
    dense = logits(model, ids)
    config = SparseAttentionConfig(block_size=64, min_seq_len=128, mass=1.0)  # every block kept: dense's output
    support = SPARSE.support(ADAPTERS[architecture], model.config)
    if not support.applies:
        with pytest.raises(UnsupportedModelError, match=f"sparse: {architecture}: "):
            patch_model(model, config)
        return
    patch_model(model, config)
    torch.testing.assert_close(logits(model, ids), dense, atol=1e-5, rtol=0)
    assert model.llmopt_sparse_stats.density == 1.0  # the sparse path ran


def test_the_committed_families_table_is_the_generated_one():
    assert (Path(__file__).parents[1] / "docs" / "families.md").read_text() == families_table(markdown=True)


def test_info_says_which_transforms_apply_and_why_not(tmp_path, capsys):
    tiny_family_model("Olmo2ForCausalLM").save_pretrained(tmp_path / "olmo2")
    assert main(["info", str(tmp_path / "olmo2")]) == 0
    out = capsys.readouterr().out
    assert "family: OLMo2" in out and "kv: ✗ k_norm normalizes the whole key projection" in out
    assert "sparse: ✓" in out and "routing: ✗ the routed decoder layer" in out


def served_logprobs_match(architecture, tmp_path):
    """Fold a head_dim-32 tiny model of the family (vLLM's CPU attention needs 32, 64, 80, ...), serve it with stock
    vLLM, and check vLLM's greedy tokens and their log-probabilities against transformers on the same path."""
    import json
    import os
    import subprocess
    import sys

    model = tiny_family_model(architecture, hidden_size=128, head_dim=32)
    patch_model(model, KVCompressionConfig(ratio=2, **CALIBRATION), calibration=WINDOWS)
    path = save_optimized(model, tmp_path / architecture)
    prompts = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0)).tolist()
    spec = {"model": str(path), "engine": {"max_model_len": 256, "skip_tokenizer_init": True}, "calls": [prompts],
            "max_tokens": 8}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_generate.py")), json.dumps(spec)],
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": ""},
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))[6:])
    for prompt, tokens, served in zip(prompts, result["tokens"][0], result["logprobs"][0]):
        expected = logits(model, torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
        chosen = expected[torch.arange(len(tokens)), tokens]
        assert (expected.max(-1).values - chosen < 1e-4).all(), (tokens, expected.argmax(-1))  # greedy, ties aside
        torch.testing.assert_close(torch.tensor(served), chosen, atol=1e-4, rtol=0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("architecture", [
    "Phi3ForCausalLM",  # vLLM's own class, fused qkv_proj split by the KV-head count, partial rotary
    "PhiForCausalLM",  # vLLM's transformers backend: the HF attention with vLLM's cache, partial rotary, biases
])
def test_vllm_serves_each_distinct_path_as_transformers_computes_it(architecture, tmp_path):
    served_logprobs_match(architecture, tmp_path)
