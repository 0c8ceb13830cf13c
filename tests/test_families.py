"""Every model family in the adapter registry on a tiny random multi-head model built offline from its config: the
KV fold is lossless where a group's heads are redundant, the calibrated fold beats mean-pooling, the result
saves and loads back to identical logits; families the fold refuses are refused before any work, with the reason."""

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_family_model

from llmopt import KVCompressionConfig, patch_model, save_optimized
from llmopt.arch.adapter import ADAPTERS, Projection, UnsupportedModelError, attention_shape
from llmopt.checkpoint import load_optimized
from llmopt.kv.transform import KVCompression

FOLDED = [name for name, adapter in ADAPTERS.items() if KVCompression().support(adapter).applies]
REFUSED = [name for name in ADAPTERS if name not in FOLDED]
# transformers saves fused MoE experts in their per-expert form; load_optimized's strict load does not convert back
MOE_LOAD = pytest.mark.xfail(strict=True, reason="load_optimized does not convert per-expert MoE weights")
RELOADED = [pytest.param(name, marks=MOE_LOAD) if "Moe" in name or "Mixtral" in name else name for name in FOLDED]
CALIBRATION = dict(calibration_tokens=512, seq_len=32)


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


def folded_twin(architecture, windows):
    model = with_redundant_kv_heads(tiny_family_model(architecture))
    expected = logits(model, windows[:2])
    patch_model(model, KVCompressionConfig(ratio=2, **CALIBRATION), calibration=windows)
    return model, expected


@pytest.mark.parametrize("architecture", FOLDED)
def test_redundant_heads_fold_losslessly(architecture, token_windows_tiny):
    model, expected = folded_twin(architecture, token_windows_tiny)
    assert model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(model, token_windows_tiny[:2]), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("architecture", RELOADED)
def test_the_folded_model_reloads_with_identical_logits(architecture, token_windows_tiny, tmp_path):
    model, _ = folded_twin(architecture, token_windows_tiny)
    reloaded, _ = load_optimized(save_optimized(model, tmp_path / "out"))
    assert type(reloaded) is type(model) and reloaded.config.num_key_value_heads == 2
    reloaded.set_attn_implementation(model.config._attn_implementation)
    ids = token_windows_tiny[:2]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)


@pytest.mark.parametrize("architecture", FOLDED)
def test_the_calibrated_fold_beats_mean_pooling(architecture, token_windows_tiny):
    ids = token_windows_tiny[-4:]
    reference = logits(tiny_family_model(architecture), ids).log_softmax(-1)
    kl = {}
    for method in ("calibrated", "mean-pool"):
        model = patch_model(tiny_family_model(architecture),
                            KVCompressionConfig(ratio=2, method=method, **CALIBRATION),
                            calibration=token_windows_tiny[:-4])
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
