"""KV-head compression on tiny models: exactness where exactness is possible, errors, records, reloads."""

import copy
import dataclasses
import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from llmopt import HealingConfig, KVCompressionConfig, LayerHealingConfig, OptimizationConfig, patch_model, save_optimized
from llmopt import precision
from llmopt.arch.adapter import ADAPTERS, ArchAdapter, UnsupportedModelError
from llmopt.config import ConfigError
from llmopt.patch import diagnostics
from llmopt.kv.solvers import pooling_fold
from llmopt.models.default import mha_twin
from llmopt.offload import parse_max_memory


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("objectives", [("query-weighted", "output-weighted"), ("plain", "plain")])
def test_mha_twin_compresses_back_exactly(family, objectives, token_windows_tiny):
    """The MHA twin of a GQA model holds each KV head twice: merging the copies must lose nothing."""
    gqa = tiny_model(family)
    twin, _ = mha_twin(gqa, None)
    ids = token_windows_tiny[:2]
    assert torch.allclose(logits(twin, ids), logits(gqa, ids), atol=1e-5)
    config = KVCompressionConfig(ratio=2, key_objective=objectives[0], value_objective=objectives[1],
                                 calibration_tokens=1024, seq_len=64)
    patch_model(twin, config, calibration=token_windows_tiny)
    assert twin.config.num_key_value_heads == 4 and twin.model.layers[0].self_attn.k_proj.out_features == 64
    torch.testing.assert_close(logits(twin, ids), logits(gqa, ids), atol=2e-4, rtol=0)


def test_calibrated_beats_the_baselines(token_windows_tiny):
    reference = tiny_model()
    ids = token_windows_tiny[-4:]
    target = logits(reference, ids).log_softmax(-1)
    kl = {}
    for method in ("calibrated", "mean-pool", "svd-w", "keep-one"):
        model = tiny_model()
        patch_model(model, KVCompressionConfig(num_kv_heads=1, method=method, calibration_tokens=1024, seq_len=64),
                    calibration=token_windows_tiny[:-4])
        out = logits(model, ids).log_softmax(-1)
        kl[method] = float((target.exp() * (target - out)).sum(-1).mean())
    assert kl["calibrated"] < min(kl["mean-pool"], kl["svd-w"], kl["keep-one"]), kl


def test_mean_pool_fold_averages_the_group_weights():
    model = tiny_model()
    k_before = model.model.layers[0].self_attn.k_proj.weight.detach().clone().view(4, 16, 64)
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone().view(4, 16, 64)
    patch_model(model, KVCompressionConfig(num_kv_heads=2, method="mean-pool"))
    k_after = model.model.layers[0].self_attn.k_proj.weight.view(2, 16, 64)
    v_after = model.model.layers[0].self_attn.v_proj.weight.view(2, 16, 64)
    torch.testing.assert_close(k_after, k_before.view(2, 2, 16, 64).mean(1))
    torch.testing.assert_close(v_after, v_before.view(2, 2, 16, 64).mean(1))


def test_pooling_fold_keep_one_picks_the_first_head():
    fold = pooling_fold(groups=1, g=3, head_dim=4, keep_one=True)
    assert fold.value_encoder.shape == (1, 4, 12)
    torch.testing.assert_close(fold.value_encoder[0, :, :4], torch.eye(4, dtype=torch.float64))
    assert fold.value_encoder[0, :, 4:].abs().sum() == 0


def test_generate_save_and_reload_as_a_vanilla_checkpoint(tmp_path, token_windows_tiny):
    model = tiny_model(tie_word_embeddings=True)
    patch_model(model, OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=2, calibration_tokens=1024,
                                                                 seq_len=64)), calibration=token_windows_tiny)
    prompt = token_windows_tiny[:1, :8]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    out = save_optimized(model, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_key_value_heads"] == 2
    assert set(saved["llmopt"]) == {"version", "kv"} and saved["llmopt"]["kv"]["num_kv_heads"] == 2
    report = json.loads((out / "llmopt_report.json").read_text())["diagnostics"]["kv"]
    assert report["num_key_value_heads"] == [4, 2] and len(report["layers"]["key_error"]) == 3
    plain = AutoModelForCausalLM.from_pretrained(out)  # no llmopt code involved
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(plain, prompt), logits(model, prompt))
    assert torch.equal(plain.generate(prompt, max_new_tokens=6, do_sample=False), generated)
    with pytest.raises(FileExistsError, match="never overwrites"):
        save_optimized(model, out)


def test_healing_lowers_the_distillation_loss(token_windows_tiny):
    model = tiny_model()
    healing = HealingConfig(steps=30, learning_rate=3e-3, seq_len=32, batch_size=4, tokens=512, warmup_steps=2)
    patch_model(model, KVCompressionConfig(num_kv_heads=1, method="mean-pool", healing=healing),
                calibration=token_windows_tiny)
    healing = diagnostics(model)["kv"]["healing"]
    curve = healing["curve"]
    assert len(curve) == 30 and healing["steps"] == 30 and healing["tokens"] == 30 * 4 * 64  # windows given as tensors keep their length
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5, curve
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen


@pytest.mark.parametrize("native, computed", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_precision_trains_in_bf16_only_where_the_device_has_bf16_units(monkeypatch, token_windows_tiny,
                                                                             native, computed):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    model, seen = tiny_model(), []
    model.register_forward_hook(lambda module, args, output: seen.append(output.logits.dtype))
    healing = HealingConfig(steps=2, seq_len=32, batch_size=4, tokens=512, warmup_steps=1)
    patch_model(model, KVCompressionConfig(num_kv_heads=1, method="mean-pool", healing=healing),
                calibration=token_windows_tiny)
    assert diagnostics(model)["kv"]["healing"]["precision"] == str(computed).removeprefix("torch.")
    assert set(seen) == {computed}  # teacher and student, both steps


def test_a_step_budget_reproduces_the_same_healed_model(token_windows_tiny):
    healing = HealingConfig(steps=8, learning_rate=3e-3, seq_len=32, batch_size=4, tokens=512, warmup_steps=2)
    states = []
    for _ in range(2):
        model = tiny_model()
        config = KVCompressionConfig(num_kv_heads=1, calibration_tokens=512, seq_len=32, healing=healing)
        patch_model(model, config, calibration=token_windows_tiny)
        states.append(model.state_dict())
        assert diagnostics(model)["kv"]["healing"]["steps"] == 8
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_a_cached_teacher_heals_the_same_model_with_fewer_teacher_passes(token_windows_tiny):
    """8 steps of 4 windows over 8 windows see each window 4 times: with the cache the teacher's decoder runs on the
    first pass only (2 of its 8 batches), and the healed weights are the uncached run's."""
    states, passes = [], []
    for cache in (False, True):
        model, calls = tiny_model(), []
        model.model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        healing = HealingConfig(steps=8, learning_rate=3e-3, seq_len=32, batch_size=4, tokens=512, warmup_steps=2,
                                cache_teacher=cache)
        patch_model(model, KVCompressionConfig(num_kv_heads=1, method="mean-pool", healing=healing),
                    calibration=token_windows_tiny[:8])
        states.append(model.state_dict())
        passes.append(len(calls))
    assert passes[0] - passes[1] == 8 - 2, passes
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


@pytest.mark.parametrize("config, error, message", [
    (KVCompressionConfig(num_kv_heads=3), ConfigError, "do not divide the model's 4 KV heads; choose one of [1, 2]"),
    (KVCompressionConfig(num_kv_heads=4), ConfigError, "already has 4 KV heads"),
    (KVCompressionConfig(num_kv_heads=2, tensor_parallel_size=3), ConfigError, "tensor_parallel_size=3"),
])
def test_unservable_head_counts_are_refused(config, error, message):
    model = tiny_model()
    before = model.model.layers[0].self_attn.k_proj.weight.clone()
    with pytest.raises(error) as raised:
        patch_model(model, config, calibration=torch.zeros(64, 64, dtype=torch.long))
    assert message in str(raised.value)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, before)  # nothing touched


def test_tensor_parallel_beyond_kv_heads_warns():
    with pytest.warns(UserWarning, match="replicates each KV head on 2 GPUs"):
        patch_model(tiny_model(), KVCompressionConfig(num_kv_heads=2, method="mean-pool", tensor_parallel_size=4))


def test_short_calibration_text_is_refused(token_windows_tiny):
    model = tiny_model()
    with pytest.raises(ValueError, match="gives 512 tokens; this transform needs 1024"):
        patch_model(model, KVCompressionConfig(num_kv_heads=2, calibration_tokens=1024, seq_len=64),
                    calibration=token_windows_tiny[:8])
    with pytest.raises(ValueError, match="pass calibration="):
        patch_model(model, KVCompressionConfig(num_kv_heads=2))


def test_an_unknown_architecture_is_refused_naming_the_supported_ones():
    model = tiny_model()
    model.config.architectures = ["InternLM2ForCausalLM"]
    with pytest.raises(UnsupportedModelError, match="supported: .*LlamaForCausalLM, MistralForCausalLM"):
        patch_model(model, KVCompressionConfig(num_kv_heads=2, method="mean-pool"))


def test_a_rope_layout_that_cannot_be_folded_is_refused(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "LlamaForCausalLM", ArchAdapter(rope_layout="interleaved"))
    model = tiny_model()
    with pytest.raises(UnsupportedModelError, match="pairs RoPE dimensions as 'interleaved'"):
        patch_model(model, KVCompressionConfig(num_kv_heads=2, method="mean-pool"))


def test_layer_healing_lowers_each_layers_error_and_the_logit_divergence_on_its_windows(token_windows_tiny):
    original = tiny_model()
    fold = KVCompressionConfig(num_kv_heads=1, calibration_tokens=1024, seq_len=64)
    folded = patch_model(copy.deepcopy(original), fold, calibration=token_windows_tiny)
    healed = patch_model(copy.deepcopy(original), dataclasses.replace(
        fold, layer_healing=LayerHealingConfig(epochs=2, learning_rate=3e-4)), calibration=token_windows_tiny)
    layers = diagnostics(healed)["kv"]["layers"]
    assert all(last < first for first, last in zip(layers["healing_error_first"], layers["healing_error_last"]))
    # Random tokens on a random model: the fit windows are where a gain must show (held-out gains: the real model).
    windows = token_windows_tiny[:8]
    reference = logits(original, windows).log_softmax(-1)

    def kl(model):
        return (reference.exp() * (reference - logits(model, windows).log_softmax(-1))).sum(-1).mean()

    assert kl(healed) < 0.8 * kl(folded), (kl(healed), kl(folded))


@pytest.mark.parametrize("method, layer_healing", [("calibrated", None), ("mean-pool", None),
                                                    ("calibrated", LayerHealingConfig(epochs=1))])
def test_an_offloaded_model_is_folded_layer_by_layer_into_the_in_memory_result(tmp_path, token_windows_tiny, method,
                                                                               layer_healing):
    source = tiny_model(num_hidden_layers=4)
    source.save_pretrained(tmp_path / "source")
    weights = (tmp_path / "source" / "model.safetensors").read_bytes()
    config = KVCompressionConfig(num_kv_heads=1, method=method, calibration_tokens=1024, seq_len=64,
                                 layer_healing=layer_healing)
    in_memory = patch_model(copy.deepcopy(source), config, calibration=token_windows_tiny)
    budget = int(0.4 * sum(p.numel() * p.element_size() for p in source.parameters()))
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "source", device_map="auto",
                                                     max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    assert "disk" in set(offloaded.hf_device_map.values())
    patch_model(offloaded, config, calibration=token_windows_tiny)
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # written back, not kept in memory
    torch.testing.assert_close(logits(offloaded, token_windows_tiny[:2]), logits(in_memory, token_windows_tiny[:2]))
    saved = AutoModelForCausalLM.from_pretrained(save_optimized(offloaded, tmp_path / "out"))
    expected = in_memory.state_dict()
    assert saved.state_dict().keys() == expected.keys()
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    assert (tmp_path / "source" / "model.safetensors").read_bytes() == weights  # the user's model is only read


def test_end_to_end_healing_of_an_offloaded_model_is_refused(tmp_path, token_windows_tiny):
    tiny_model().save_pretrained(tmp_path / "source")
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "source", device_map="auto",
                                                     max_memory={"cpu": 20_000}, offload_folder=tmp_path / "offload")
    config = KVCompressionConfig(num_kv_heads=1, healing=HealingConfig(steps=2, seq_len=32, tokens=512))
    with pytest.raises(ConfigError, match="needs it in memory"):
        patch_model(offloaded, config, calibration=token_windows_tiny)


def test_max_memory_is_parsed_or_refused_with_the_expected_form():
    assert parse_max_memory("0=20GiB, cpu=300MiB") == {0: "20GiB", "cpu": "300MiB"}
    for text in ("", "cpu", "cpu300MiB", "=1GiB"):
        with pytest.raises(ValueError, match="cpu=300MiB"):
            parse_max_memory(text)


def test_baselines_of_a_healed_recipe_are_plain_folds():
    from llmopt.kv.transform import KVCompression

    config = KVCompressionConfig(num_kv_heads=1, layer_healing=LayerHealingConfig(), healing=HealingConfig())
    baselines = KVCompression().baselines(config)
    assert set(baselines) == {"mean-pool", "svd-w", "keep-one"}
    assert all(b.layer_healing is None and b.healing is None for b in baselines.values())


def test_report_steps_measure_the_model_after_that_many_steps(token_windows_tiny):
    healing = HealingConfig(steps=6, seq_len=32, batch_size=4, tokens=512, warmup_steps=1, report_steps=[2, 5])
    seen = []

    def observe(stage, model, facts):
        seen.append((stage, len(model.llmopt_progress)))

    model = tiny_model()
    model.llmopt_progress = []
    model.register_forward_hook(lambda module, args, output: module.training and module.llmopt_progress.append(1))
    patch_model(model, KVCompressionConfig(num_kv_heads=1, method="mean-pool", healing=healing),
                calibration=token_windows_tiny, observer=observe)
    assert seen == [("kv/training-free", 0), ("kv/healed 2 steps", 2), ("kv/healed 5 steps", 5)]
    assert diagnostics(model)["kv"]["healing"]["stopped_by_minutes"] is False
    with pytest.raises(ConfigError, match="report_steps must be ascending and between 0 and steps"):
        HealingConfig(steps=6, report_steps=[6])
