from pathlib import Path

import pytest

from llmopt import HealingConfig, KVCompressionConfig, OptimizationConfig, SparseAttentionConfig, TokenRoutingConfig
from llmopt.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

EXAMPLES = [
    OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=1)),
    OptimizationConfig(kv=KVCompressionConfig(ratio=3, method="mean-pool", healing=HealingConfig(steps=5, minutes=1))),
    OptimizationConfig(routing=TokenRoutingConfig(sparsity=0.3, dense_blocks=[0, 1])),
    OptimizationConfig(sparse=SparseAttentionConfig(block_size=128, mass=0.9)),
    OptimizationConfig(kv=KVCompressionConfig(num_kv_heads=2), routing=TokenRoutingConfig(),
                       sparse=SparseAttentionConfig()),
]


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: "+".join(c.transforms))
def test_yaml_round_trip(config, tmp_path):
    path = tmp_path / "recipe.yaml"
    config.to_yaml(path)
    assert OptimizationConfig.from_yaml(path) == config


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    assert OptimizationConfig.from_yaml(recipe).transforms


@pytest.mark.parametrize("data, message", [
    ({"kv": {"num_kv_heads": 1, "num_kv_head": 2}}, "unknown key(s) num_kv_head"),
    ({"kv": {"num_kv_heads": 1, "method": "avg"}}, "kv.method = 'avg' is not one of"),
    ({"kv": {"num_kv_heads": 1, "ratio": 3}}, "exactly one of num_kv_heads and ratio"),
    ({"kv": {"num_kv_heads": "one"}}, "kv.num_kv_heads must be int"),
    ({"kv": {"num_kv_heads": 1, "healing": {"steps": 0}}}, "healing.steps must be positive"),
    ({"kv": {"num_kv_heads": 1, "healing": {"step": 3}}}, "unknown key(s) step in kv.healing."),
    ({"routing": {"sparsity": 1.5}}, "routing.sparsity must be in (0, 1)"),
    ({"sparse": {"mass": 0}}, "sparse.mass must be in (0, 1]"),
    ({}, "names no transform"),
    ({"kv": {"num_kv_heads": 1}, "version": 9}, "config version 9 is not supported"),
    ({"quantize": {}}, "unknown key(s) quantize in the config: no such transform; available: kv, routing, sparse"),
    ([1, 2], "expected a mapping with transform keys"),
])
def test_bad_configs_name_the_field(data, message):
    with pytest.raises(ConfigError, match=None) as error:
        OptimizationConfig.from_dict(data)
    assert message in str(error.value)


def test_ratio_must_divide_kv_heads():
    config = KVCompressionConfig(ratio=2)
    assert config.target_kv_heads(4) == 2
    with pytest.raises(ConfigError, match="does not divide the model's 3 KV heads"):
        config.target_kv_heads(3)


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("kv:\n  num_kv_heads: 1\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) colour"):
        OptimizationConfig.from_yaml(path)
    path.write_text("kv:\n  num_kv_heads: 1\n   method: [mean-pool\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        OptimizationConfig.from_yaml(path)


def test_transforms_run_in_stage_order_whatever_the_recipe_order():
    config = OptimizationConfig.from_dict({"sparse": {}, "kv": {"num_kv_heads": 1}})
    assert list(config.transforms) == ["kv", "sparse"]
