"""KV heads per layer: each layer its own count, recorded, rebuilt by load_optimized, costed as the sum of layers;
and the accuracy budget that chooses the counts."""

import dataclasses
import json

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from llmopt import HealingConfig, KVCompressionConfig, OptimizationConfig, load_optimized, patch_model, save_optimized
from llmopt.budget import Ladder, greedy_path, longest_within
from llmopt.calibrate import recipe_baselines, with_budget
from llmopt.config import ConfigError
from llmopt.costs import model_costs
from llmopt.patch import diagnostics
from llmopt.routing.config import TokenRoutingConfig


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def kv_heads(model) -> list[int]:
    return [layer.self_attn.k_proj.out_features // 16 for layer in model.model.layers]


def test_per_layer_counts_are_recorded_costed_and_reloaded_strictly(tmp_path, token_windows_tiny):
    model = tiny_model(tie_word_embeddings=True)  # 3 layers of 4 KV heads, head_dim 16
    patch_model(model, KVCompressionConfig(num_kv_heads=[2, 4, 1], calibration_tokens=1024, seq_len=64),
                calibration=token_windows_tiny)
    assert kv_heads(model) == [2, 4, 1]
    assert model_costs(model)["kv_bytes_per_token"] == (2 + 4 + 1) * 2 * 16 * 2
    prompt = token_windows_tiny[:1, :8]
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    out = save_optimized(model, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_key_value_heads"] == 4 and saved["llmopt"]["kv"]["num_kv_heads"] == [2, 4, 1]
    loaded, _ = load_optimized(out)
    assert kv_heads(loaded) == [2, 4, 1]
    torch.testing.assert_close(logits(loaded, prompt), logits(model, prompt))
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), generated)


def test_a_uniform_list_is_a_vanilla_checkpoint(tmp_path, token_windows_tiny):
    model = tiny_model()
    patch_model(model, KVCompressionConfig(num_kv_heads=[2, 2, 2], method="mean-pool"))
    out = save_optimized(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    plain = AutoModelForCausalLM.from_pretrained(out)  # no llmopt code involved
    torch.testing.assert_close(logits(plain, token_windows_tiny[:2]), logits(model, token_windows_tiny[:2]))


@pytest.mark.parametrize("counts, message", [
    ([3, 4, 3], "layers [0, 2] ask for [3, 3] KV heads, which do not divide the model's 4 KV heads; choose one of "
                "[1, 2] or 4"),
    ([4, 4, 4], "already has 4 KV heads"),
    ([2, 2], "lists 2 counts; the model has 3 layers"),
])
def test_per_layer_counts_that_cannot_be_served_are_refused(counts, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        patch_model(tiny_model(), KVCompressionConfig(num_kv_heads=counts, method="mean-pool"))


def test_a_per_layer_recipe_round_trips_and_a_budget_needs_a_transform_that_takes_one(tmp_path):
    recipe = OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=[1, 3, 1]))
    recipe.to_yaml(tmp_path / "r.yaml")
    assert OptimizationConfig.from_yaml(tmp_path / "r.yaml") == recipe
    assert with_budget(recipe, None) is recipe
    assert with_budget(OptimizationConfig(kv=KVCompressionConfig(ratio=3)), 0.05).get("kv").max_loss == 0.05
    budgeted = with_budget(recipe.replace("kv", KVCompressionConfig(num_kv_heads=1)), 0.05)
    assert recipe_baselines(budgeted, ["mean-pool"])["mean-pool"].get("kv").max_loss is None  # uniform baselines
    with pytest.raises(ConfigError, match=r"none of the recipe's transforms \(routing\) takes an accuracy budget"):
        with_budget(OptimizationConfig(routing=TokenRoutingConfig()), 0.05)


def test_config_refuses_bad_counts_and_a_budget_with_a_list():
    with pytest.raises(ConfigError, match="positive integers"):
        KVCompressionConfig(num_kv_heads=[2, 0, 1])
    with pytest.raises(ConfigError, match="max_loss chooses the per-layer counts itself"):
        KVCompressionConfig(num_kv_heads=[2, 1, 1], max_loss=0.1)


def test_greedy_path_spends_where_the_loss_per_saving_is_least():
    ladders = [Ladder((0.0, 2.0), (0.0, 1.0)), Ladder((0.0,), (0.0,)), Ladder((0.0, 1.0, 2.0), (0.0, 0.1, 3.0))]
    assert list(greedy_path(ladders)) == [[0, 0, 1], [1, 0, 1], [1, 0, 2]]
    path = [[step] for step in range(10)]
    step, measured = longest_within(path, lambda rungs: rungs[0] * 0.1, 0.45)
    assert step == 4 and len(measured) <= 5
    with pytest.raises(ConfigError, match="already loses 0.5000"):
        longest_within(path, lambda rungs: 0.5 + rungs[0], 0.1)


@pytest.fixture(scope="module")
def own_text() -> torch.Tensor:
    """``[20, 64]`` windows sampled from the tiny model itself: on its own text any change raises its perplexity
    (on random tokens a fold lowers it as often as not)."""
    torch.manual_seed(2)
    start = torch.randint(0, 97, (20, 1))
    return tiny_model().generate(start, attention_mask=torch.ones_like(start), max_new_tokens=63,
                                 min_new_tokens=63, do_sample=True, top_k=0, pad_token_id=0)


def test_an_accuracy_budget_chooses_per_layer_counts_within_it_and_verifies(tmp_path, own_text):
    config = KVCompressionConfig(num_kv_heads=1, max_loss=0.006, calibration_tokens=768, search_tokens=256,
                                 verify_tokens=256, seq_len=64)
    model = tiny_model()
    patch_model(model, config, calibration=own_text)
    budget = diagnostics(model)["kv"]["budget"]
    chosen = model.config.llmopt["kv"]["num_kv_heads"]
    assert kv_heads(model) == (chosen if isinstance(chosen, list) else [chosen] * 3)
    assert 0 < budget["search_loss"] <= 0.006 and 1.0 < budget["kv_ratio"] < 4.0
    assert min(budget["path_losses"].values()) > 0 and max(budget["path_losses"].values()) > 0.006
    assert budget["compressed_layers"] == [i for i, heads in enumerate(kv_heads(model)) if heads == 1]
    assert model.config.llmopt["kv"]["max_loss"] is None
    loaded, _ = load_optimized(save_optimized(model, tmp_path / "out"))
    torch.testing.assert_close(logits(loaded, own_text[:2]), logits(model, own_text[:2]))
    with pytest.raises(ConfigError, match=r"max_loss = 1e-05 cannot be met: the lightest setting .* already loses"):
        patch_model(tiny_model(), OptimizationConfig(kv=dataclasses.replace(config, max_loss=1e-5)),
                    calibration=own_text)


def test_the_bench_costs_a_per_layer_checkpoint_by_the_sum_of_its_layers(tmp_path):
    from llmopt.bench import kv_capacity
    from llmopt.bench.bounds import checkpoint_cost
    from llmopt.bench.runner import Bench
    from llmopt.bench.settings import QUICK

    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    patch_model(model, KVCompressionConfig(num_kv_heads=[1, 4, 1], method="mean-pool"))
    save_optimized(model, tmp_path / "kv")
    bench = Bench(str(tmp_path / "tiny"), tmp_path / "kv.yaml", QUICK, tmp_path, optimized_dir=tmp_path / "kv")
    assert kv_capacity.head_ratio(bench) == 12 / 6
    assert checkpoint_cost(tmp_path / "kv").kv_bytes_per_token == (1 + 4 + 1) * 2 * 16 * 2


def test_healing_runs_on_the_allocation_the_budget_chose(own_text):
    healing = HealingConfig(steps=2, learning_rate=1e-3, seq_len=64, batch_size=2, tokens=256, warmup_steps=1,
                            precision="float32")
    model = tiny_model()
    patch_model(model, KVCompressionConfig(num_kv_heads=1, max_loss=0.006, calibration_tokens=768,
                                           search_tokens=256, verify_tokens=256, seq_len=64, healing=healing),
                calibration=own_text)
    report = diagnostics(model)["kv"]
    assert report["healing"]["steps"] == 2
    assert [i for i, heads in enumerate(kv_heads(model)) if heads == 1] == report["budget"]["compressed_layers"]
    assert 0 < len(report["budget"]["compressed_layers"]) < 3


def test_the_frontier_tables_and_plots_per_layer_points_against_the_original(tmp_path):
    from llmopt.eval.frontier import frontier_markdown, frontier_png

    def point(layers: int, wikipedia: float, news: float) -> dict:
        return {"layers": layers, "kv_bytes_per_token": 2 * 64 * 2 * (90 - 2 * layers), "wikipedia-ppl": wikipedia,
                "news-ppl": news}

    result = {"original": point(0, 20.0, 30.0),
              "calibrated": {"points": [point(15, 24.0, 33.0), point(30, 90.0, 120.0)], "sensitivity_kl": [0.1] * 30},
              "mean-pool": {"points": [point(15, 900.0, 800.0)], "sensitivity_kl": [1.0] * 30}}
    table = frontier_markdown(result)
    assert "| ours per-layer | 15 | 15,360 | 1.50× | 24.00 (×1.200) | 33.00 (×1.100) |" in table
    assert "| ours per-layer (= uniform) | 30 | 7,680 | 3.00× |" in table
    assert "| mean-pool per-layer | 15 |" in table
    assert frontier_png(result, tmp_path / "frontier.png").stat().st_size > 10_000
