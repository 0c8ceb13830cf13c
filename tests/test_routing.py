"""Token routing: the gathered layer against a slow masked reference, generate() with the KV cache, training,
allocation, costs, and save → load_optimized."""

import copy
import json

import pytest
import torch
from tiny_models import TINY, tiny_model

from llmopt import OptimizationConfig, TokenRoutingConfig, load_optimized, patch_model, save_optimized
from llmopt.arch.adapter import UnsupportedModelError
from llmopt.checkpoint import CheckpointError
from llmopt.config import ConfigError
from llmopt.distill import kl_divergence
from llmopt.routing import layer as routed_layer
from llmopt.routing.adapters import Moments, fit_adapters
from llmopt.routing.allocation import greedy_allocation, shortgpt_blocks, uniform_allocation
from llmopt.routing.config import RouterTrainingConfig
from llmopt.routing.flops import block_flops, skipped
from llmopt.routing.train import blocks_swapped, train_router
from llmopt.routing.transform import TokenRouting, install

SPARSITY = torch.tensor([0.0, 0.5, 0.4])  # per block of the 3-block tiny model


def routed(method="random", sparsity=SPARSITY, adapter_rank=0, **overrides):
    """A tiny model routed by a baseline rule; with adapters, random ones (nonzero, so that they show)."""
    model = tiny_model(**overrides)
    router = install(model, TokenRoutingConfig(method=method, allocation="uniform", training=None,
                                               adapter_rank=adapter_rank))
    router.block_sparsity.copy_(sparsity)
    if adapter_rank:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in (router.adapter_down, router.adapter_up, router.adapter_bias):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model, router


def masked_reference(keeps: dict[int, torch.Tensor], router=None, **overrides):
    """The original model where block l's output is replaced by its input (plus `router`'s skip adapter) for the
    tokens `keeps[l]` skips: every token still computes everything, the residual pass-through is explicit."""
    model = tiny_model(**overrides)
    for index, layer in enumerate(model.model.layers):
        if index in keeps:
            def skip(module, args, kwargs, output, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                if router is not None:
                    hidden = hidden + router.skip_update(index, module.input_layernorm(hidden))
                return torch.where(keeps[index][..., None], output, hidden)

            layer.register_forward_hook(skip, with_kwargs=True)
    return model


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_keeping_every_token_gives_the_original_logits(token_windows_tiny):
    ids = token_windows_tiny[:3]
    model, router = routed(sparsity=torch.zeros(3))
    torch.testing.assert_close(logits(model, ids), logits(tiny_model(), ids), rtol=0, atol=0)
    router.block_sparsity.copy_(SPARSITY)
    with router.disabled():
        torch.testing.assert_close(logits(model, ids), logits(tiny_model(), ids), rtol=0, atol=0)


def test_a_step_whose_tokens_all_run_takes_the_stock_layer(token_windows_tiny, monkeypatch):
    """Where every token of a step runs a routed block (a decode step that keeps its token), the block is the stock
    layer: no gathers, and the original's logits exactly."""
    ids = token_windows_tiny[:2, :24]
    model, router = routed()
    router.threshold.fill_(float("-inf"))  # every score passes

    def gathered(*_args, **_kwargs):
        raise AssertionError("the gathered path ran")

    monkeypatch.setattr(routed_layer.RoutedLlamaDecoderLayer, "_gathered", gathered)
    with router.recording() as records:
        torch.testing.assert_close(logits(model, ids), logits(tiny_model(), ids), rtol=0, atol=0)
    assert {record.index for record in records} == {1, 2} and all(record.keep.all() for record in records)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("adapter_rank", [0, 4], ids=["pass-through", "adapters"])
@pytest.mark.parametrize("query_chunk", [256, 5], ids=["one-chunk", "chunked"])
def test_gathered_layer_equals_the_masked_reference(token_windows_tiny, implementation, padded, adapter_rank,
                                                    query_chunk, monkeypatch):
    monkeypatch.setattr(routed_layer, "QUERY_CHUNK", query_chunk)
    ids = token_windows_tiny[:3, :40]
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :9] = 0
        mask[2, :3] = 0
    model, router = routed(adapter_rank=adapter_rank, attn_implementation=implementation)
    with router.recording() as records:
        ours = logits(model, ids, attention_mask=mask)
    keeps = {record.index: record.keep for record in records}
    assert set(keeps) == {1, 2} and 0.3 < 1 - keeps[1].float().mean() < 0.7
    reference = logits(masked_reference(keeps, router if adapter_rank else None, attn_implementation=implementation),
                       ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-4, atol=1e-4)
    assert (ours[real] - logits(tiny_model(), ids, attention_mask=mask)[real]).abs().max() > 1e-2


def test_ftp_features_hand_on_the_attention_mass_of_the_queries_that_ran(token_windows_tiny):
    """The routed block's own eager attention (kept queries only) gives the next block's attention-mass feature:
    it equals the mass in the masked reference's attention weights, rows of skipped queries removed."""
    ids = token_windows_tiny[:2, :40]
    model = tiny_model(attn_implementation="eager")
    router = install(model, TokenRoutingConfig(features="ftp", allocation="uniform"))
    router.block_sparsity.copy_(SPARSITY)
    handed, remember = {}, router.remember_attention

    def watched(index, probabilities, length):
        handed[index] = probabilities.detach().clone()
        remember(index, probabilities, length)

    router.remember_attention = watched
    with router.recording() as records:
        ours = logits(model, ids)
    keeps = {record.index: record.keep for record in records}
    reference = masked_reference(keeps, attn_implementation="eager")
    with torch.no_grad():
        result = reference(ids, output_attentions=True)
    torch.testing.assert_close(ours, result.logits, rtol=1e-4, atol=1e-4)
    for index in (0, 1):  # block 0 runs dense (the hook), block 1 routes (the gathered path)
        weights = result.attentions[index]
        if index in keeps:
            weights = weights * keeps[index][:, None, :, None]
        torch.testing.assert_close(handed[index].sum(2).mean(1), weights.sum(2).mean(1), rtol=1e-4, atol=1e-5)
    features = router.features(3, torch.zeros(2, 40, 64), None, torch.arange(40)[None].expand(2, -1))
    torch.testing.assert_close(features[..., 1].exp() - 1e-6, handed[2].sum(2).mean(1))  # block 2 → block 3
    assert torch.equal(features[0, :, 0], torch.arange(40).float().log1p())


def test_ftp_features_train_and_reload_on_eager_attention(token_windows_tiny, tmp_path):
    model = patch_model(tiny_model(), tiny_config(features="ftp"), calibration=token_windows_tiny)
    assert model.config._attn_implementation == "eager"
    reloaded, _ = load_optimized(save_optimized(model, tmp_path / "ftp"))
    assert reloaded.config._attn_implementation == "eager"
    ids = token_windows_tiny[:3]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


def test_skipped_tokens_are_not_computed_but_write_their_kv(token_windows_tiny):
    from transformers import DynamicCache

    ids = token_windows_tiny[:2, :32]
    model, router = routed()
    rows = []
    model.model.layers[1].mlp.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    cache = DynamicCache(config=model.config)
    with router.recording() as records, torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    keep = next(record.keep for record in records if record.index == 1)
    assert rows == [int(keep.sum())] and rows[0] < ids.numel()  # the MLP saw the kept tokens only
    reference_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        masked_reference({r.index: r.keep for r in records})(ids, past_key_values=reference_cache, use_cache=True)
    for layer in range(3):
        torch.testing.assert_close(cache.layers[layer].keys, reference_cache.layers[layer].keys)
        torch.testing.assert_close(cache.layers[layer].values, reference_cache.layers[layer].values)


def greedy(model, prompts, **kwargs):
    """Greedy continuations of each prompt alone, and of all of them batched with left padding."""
    options = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": 0, **kwargs}
    alone = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **options)[0, len(p):]
             for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    batched = model.generate(ids, attention_mask=mask, **options)[:, width:]
    return alone, batched


@pytest.mark.parametrize("method, sparsity, adapter_rank", [
    ("random", SPARSITY, 0), ("static", SPARSITY, 0), ("shortgpt", torch.tensor([0.0, 1.0, 0.0]), 0),
    ("random", SPARSITY, 4), ("shortgpt", torch.tensor([0.0, 1.0, 0.0]), 4)])
def test_generate_with_cache_matches_recomputation_and_batching(method, sparsity, adapter_rank, monkeypatch):
    monkeypatch.setattr(routed_layer, "QUERY_CHUNK", 4)  # prefill attends in chunks, the cached steps after the cache
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=generator) for n in (7, 12, 3)]
    model, _ = routed(method, sparsity, adapter_rank)
    cached, batched = greedy(model, prompts)
    recomputed, _ = greedy(model, prompts, use_cache=False)
    dense, _ = greedy(tiny_model(), prompts)
    for ours, again, together in zip(cached, recomputed, batched):
        assert torch.equal(ours, again) and torch.equal(ours, together)
    assert any(not torch.equal(a, b) for a, b in zip(cached, dense))  # routing changed something


def tiny_config(**overrides) -> TokenRoutingConfig:
    training = RouterTrainingConfig(steps=6, seq_len=64, tokens=512, batch_size=2, warmup_steps=1,
                                    precision="float32", guide_steps=8, router_learning_rate=1e-3)
    return TokenRoutingConfig(**{"sparsity": 0.3, "seq_len": 64, "calibration_tokens": 512, "adapter_rank": 8,
                                 "training": training, **overrides})


@pytest.fixture(scope="module")
def trained(token_windows_tiny):
    model = tiny_model()
    before = {name: p.clone() for name, p in model.named_parameters()}
    patch_model(model, tiny_config(), calibration=token_windows_tiny)
    return model, before


def test_training_moves_only_the_router_and_holds_the_rate(trained, token_windows_tiny):
    model, before = trained
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    details = model.llmopt_diagnostics["routing"]
    assert all(details[f"guide_{n}"]["steps"] == 8 and len(details[f"guide_{n}"]["curve"]) == 8 for n in (1, 2))
    assert details["training"]["steps"] == 6 and len(details["training"]["curve"]) == 6
    blocks = details["blocks"]
    assert blocks["target_sparsity"][0] == 0.0 and blocks["achieved_sparsity"][0] == 0.0
    for target, achieved in zip(blocks["target_sparsity"], blocks["achieved_sparsity"]):
        assert abs(target - achieved) < 0.05
    cost = TokenRouting().cost(model, tiny_config(), token_windows_tiny[:4])
    assert 0.2 < cost["flops_skipped"] < 0.4 and cost["token_sparsity"] > cost["flops_skipped"]


def test_learned_routing_generates_deterministically(trained):
    model, _ = trained
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, TINY["vocab_size"], (n,), generator=generator) for n in (9, 4)]
    first, batched = greedy(model, prompts)
    again, _ = greedy(model, prompts)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(len(t) == 8 for t in batched)


def test_scores_without_autograd_fold_the_standardization_and_follow_the_weights(trained):
    router = copy.deepcopy(trained[0].model.token_router)
    generator = torch.Generator().manual_seed(6)
    hidden, previous, normed = (torch.randn(2, 7, TINY["hidden_size"], generator=generator) for _ in range(3))
    positions = torch.arange(7)[None]

    def scores(index: int, before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(training path: features, standardization, MLP; inference: the folded first layer), with the previous
        block's input `before` or without it (the update feature is zero)."""
        router._previous = None if before is None else (index - 1, before)
        with torch.enable_grad():
            reference = router.score(index, hidden, normed, positions).detach()
        with torch.no_grad():
            return reference, router.score(index, hidden, normed, positions)

    for index in (1, 2):
        for before in (previous, None):
            reference, folded = scores(index, before)
            assert torch.allclose(folded, reference, rtol=1e-5, atol=1e-5)
    unchanged = scores(1, previous)[1]
    with torch.no_grad():
        router.mlp[0].weight.mul_(1.5)
        router.feature_std[1] *= 2
    reference, folded = scores(1, previous)
    assert torch.allclose(folded, reference, rtol=1e-5, atol=1e-5) and not torch.allclose(folded, unchanged)


def test_round_trip_restores_the_routed_model(trained, tmp_path, token_windows_tiny):
    model, _ = trained
    out = save_optimized(model, tmp_path / "routed")
    record = json.loads((out / "config.json").read_text())["llmopt"]
    assert record["routing"]["sparsity"] == 0.3 and "blocks" not in record["routing"]
    reloaded, _ = load_optimized(out)
    ids = token_windows_tiny[:3]
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    data = json.loads((out / "config.json").read_text())
    data["llmopt"]["routing"]["router"] = "per-block-linear"
    (out / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing model.token_router.linear"):
        load_optimized(out)


def test_load_model_restores_a_routed_checkpoint_not_its_dense_architecture(trained, tmp_path, token_windows_tiny):
    from transformers import AutoTokenizer

    from llmopt.models import load_model, resolve_model

    model, _ = trained
    out = save_optimized(model, tmp_path / "routed", AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")))
    reloaded, tokenizer = load_model(str(out))
    ids = token_windows_tiny[:3]
    assert tokenizer is not None and hasattr(reloaded.model, "token_router")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="with routing: it loads whole into memory"):
        load_model(str(out), max_memory={"cpu": "300MiB"}, offload_folder=str(tmp_path / "offload"))


@pytest.mark.parametrize("name", ["shortgpt", "static", "random", "uniform"])
def test_baselines_run_through_the_same_code(name, token_windows_tiny):
    config = TokenRouting().baselines(tiny_config())[name]
    model = patch_model(tiny_model(), config, calibration=token_windows_tiny)
    cost = TokenRouting().cost(model, config, token_windows_tiny[:4])
    assert 0.2 < cost["flops_skipped"] < 0.4, cost
    if name == "shortgpt":
        assert model.llmopt_diagnostics["routing"]["blocks"]["target_sparsity"].count(1.0) == 1


def test_reduced_rank_fit_recovers_a_low_rank_map():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 12, generator=generator, dtype=torch.float64) + 0.5
    planted = torch.randn(12, 2, generator=generator, dtype=torch.float64) @ \
        torch.randn(2, 12, generator=generator, dtype=torch.float64)
    bias = torch.randn(12, generator=generator, dtype=torch.float64)
    moments = Moments(12)
    for chunk_x in x.split(1000):
        moments.add(chunk_x, chunk_x @ planted + bias)
    down, up, fitted_bias = moments.solve(rank=2)
    assert down.shape == (12, 2) and up.shape == (2, 12)
    prediction = x @ down @ up + fitted_bias
    assert ((prediction - (x @ planted + bias)).norm() / (x @ planted).norm()).item() < 0.02


def kl_to_dense(model, router, ids):
    with torch.no_grad(), router.disabled():
        dense = model(ids).logits
    return kl_divergence(logits(model, ids), dense).item()


def test_fitted_then_distilled_adapters_lower_the_error(token_windows_tiny):
    model, router = routed("random", adapter_rank=8)
    for param in (router.adapter_down, router.adapter_up, router.adapter_bias):
        param.data.zero_()
    ids = token_windows_tiny[:16]
    passing = kl_to_dense(model, router, ids)
    counts = fit_adapters(model, router, ids)
    assert counts[0] == 0 and counts[1] > counts[2] > 0  # block 1 skips 50%, block 2 40%
    fitted = kl_to_dense(model, router, ids)
    training = RouterTrainingConfig(steps=20, seq_len=64, tokens=1024, batch_size=4, warmup_steps=1,
                                    learning_rate=1e-3, precision="float32")
    result = train_router(model, router, ids, training)
    distilled = kl_to_dense(model, router, ids)
    assert result["steps"] == 20 and distilled < fitted < passing, (passing, fitted, distilled)


def test_finetuning_trains_the_named_block_weights_against_the_blocks_as_they_were(token_windows_tiny):
    model, router = routed("random", adapter_rank=8)
    fit_adapters(model, router, token_windows_tiny[:16])
    before = {name: p.clone() for name, p in model.named_parameters()}
    original = tiny_model()  # the same weights: the dense teacher
    with torch.no_grad():
        dense = original(token_windows_tiny[:16]).logits
    start = kl_divergence(logits(model, token_windows_tiny[:16]), dense).item()
    training = RouterTrainingConfig(steps=20, seq_len=64, tokens=1024, batch_size=4, warmup_steps=1,
                                    learning_rate=1e-3, precision="float32", finetune=["mlp", "norms"],
                                    finetune_learning_rate=1e-3)
    train_router(model, router, token_windows_tiny[:16], training)
    moved = {name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])}
    assert moved and all(".mlp." in n or "layernorm" in n or "token_router.adapter" in n for n in moved), moved
    assert any(".mlp." in n for n in moved) and any("layernorm" in n for n in moved)
    assert kl_divergence(logits(model, token_windows_tiny[:16]), dense).item() < start
    # the teacher: the blocks as they were, swapped in with the router off; the trained blocks come back after
    frozen, trained = original.model.layers, model.model.layers
    with torch.no_grad(), blocks_swapped(model, frozen, router):
        assert torch.allclose(model(token_windows_tiny[:4]).logits, dense[:4], atol=1e-5)
    assert model.model.layers is trained


def test_distillation_skips_exactly_the_target_share_in_every_batch(token_windows_tiny):
    model = tiny_model()
    config = tiny_config(allocation="uniform")
    router = install(model, config)
    router.block_sparsity.copy_(SPARSITY)
    with router.recording() as records:
        train_router(model, router, token_windows_tiny[:8], config.training)
    assert len(records) == 6 * 2
    for record in records:  # the threshold is the batch's quantile; position 0 of each row always runs
        share = 1 - record.keep.double().mean().item()
        target, slack = SPARSITY[record.index].item(), (record.keep.shape[0] + 1) / record.keep.numel()
        assert target - slack - 1e-6 <= share <= target + 1e-6, (record.index, share)


def test_per_block_linear_router_trains(token_windows_tiny):
    model = patch_model(tiny_model(), tiny_config(router="per-block-linear"), calibration=token_windows_tiny)
    assert model.model.token_router.linear.abs().sum() > 0


def test_greedy_allocation_spends_the_budget_where_it_hurts_least():
    sensitivity = torch.tensor([[9.0, 9.0, 9.0], [0.1, 0.2, 0.4], [1.0, 2.0, 4.0], [0.01, 0.02, 5.0]])
    shares = greedy_allocation(sensitivity, budget=0.25, dense_blocks=[0], skipped_share=1.0, maximum=0.9,
                               levels=(0.3, 0.6, 0.9))
    assert shares[0] == 0.0
    assert sum(shares) == pytest.approx(1.0, abs=0.03)
    assert shares[1] > shares[2] and shares[3] > shares[2]
    with pytest.raises(ConfigError, match="cannot be reached"):
        greedy_allocation(sensitivity, budget=0.9, dense_blocks=[0], skipped_share=1.0, maximum=0.9,
                          levels=(0.3, 0.6, 0.9))


def test_uniform_allocation_and_shortgpt_blocks():
    assert uniform_allocation(0.3, 4, [0], 1.0, 0.9) == pytest.approx([0.0, 0.4, 0.4, 0.4])
    with pytest.raises(ConfigError, match="above max_block_sparsity"):
        uniform_allocation(0.8, 4, [0], 1.0, 0.9)
    influence = torch.tensor([0.01, 0.5, 0.02, 0.3, 0.03], dtype=torch.float64)
    assert shortgpt_blocks(influence, 0.4, [0]) == [2, 4]


def test_flops_count_attention_by_context_and_keep_kv():
    config = tiny_model().config
    flops = block_flops(config)
    width = config.hidden_size
    assert flops.kv == 2 * 2 * width * TINY["num_key_value_heads"] * TINY["head_dim"]
    keep = torch.ones(2, 8, dtype=torch.bool)
    assert skipped(flops, 3, 8, 2, {1: keep}, []) == {"token_sparsity": 0.0, "flops_skipped": 0.0}
    assert skipped(flops, 3, 8, 2, {}, [2]) == pytest.approx({"token_sparsity": 1 / 3, "flops_skipped": 1 / 3})
    late, early = keep.clone(), keep.clone()
    late[:, -1], early[:, 1] = False, False
    assert skipped(flops, 3, 8, 2, {1: late}, [])["flops_skipped"] > \
        skipped(flops, 3, 8, 2, {1: early}, [])["flops_skipped"]
    assert 0 < flops.skipped_share(8) < 1


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_non_llama_models_are_refused(family, token_windows_tiny):
    with pytest.raises(UnsupportedModelError, match="reimplements transformers' LlamaDecoderLayer"):
        patch_model(tiny_model(family), tiny_config(), calibration=token_windows_tiny)


@pytest.mark.parametrize("data, message", [
    ({"routing": {"method": "oracle"}}, "routing.method = 'oracle' is not one of"),
    ({"routing": {"allocation": "ga"}}, "routing.allocation = 'ga' is not one of"),
    ({"routing": {"training": None}}, "needs routing.training"),
    ({"routing": {"training": {"guide_steps": -1}}}, "routing.training.guide_steps must be non-negative"),
    ({"routing": {"method": "random", "adapter_rank": 0}}, "routing.training has nothing to train"),
    ({"routing": {"adapter_rank": -2}}, "routing.adapter_rank must be non-negative"),
    ({"routing": {"max_block_sparsity": 1.0}}, "routing.max_block_sparsity must be in (0, 1)"),
    ({"routing": {"training": {"finetune": ["mlp", "embeddings"]}}},
     "routing.training.finetune takes attention, mlp, norms; got embeddings"),
])
def test_bad_routing_configs_are_refused(data, message):
    with pytest.raises(ConfigError) as raised:
        OptimizationConfig.from_dict(data)
    assert message in str(raised.value)


def test_dense_blocks_outside_the_model_are_refused(token_windows_tiny):
    with pytest.raises(ConfigError, match=r"dense_blocks \[7\] are not blocks"):
        patch_model(tiny_model(), tiny_config(dense_blocks=[0, 7]), calibration=token_windows_tiny)


@pytest.mark.slow
def test_default_model_end_to_end(default_model, tmp_path):
    """Short training on SmolLM2-135M (uniform allocation: the search is covered on tiny models): the rate holds,
    save → load gives identical logits, generate works."""
    import copy

    from llmopt.data.corpora import calibration_texts

    model, tokenizer = default_model
    model = copy.deepcopy(model)
    config = TokenRoutingConfig(sparsity=0.3, allocation="uniform", calibration_tokens=1024, seq_len=128,
                                training=RouterTrainingConfig(steps=3, seq_len=128, tokens=512, batch_size=2,
                                                              warmup_steps=1))
    patch_model(model, config, tokenizer=tokenizer, calibration=calibration_texts())
    blocks = model.llmopt_diagnostics["routing"]["blocks"]
    assert blocks["target_sparsity"][0] == 0.0
    gap = [a - t for a, t in zip(blocks["achieved_sparsity"], blocks["target_sparsity"])]
    assert abs(sum(gap)) < 0.02 * len(gap)
    out = save_optimized(model, tmp_path / "routed", tokenizer)
    reloaded, _ = load_optimized(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    torch.testing.assert_close(logits(reloaded, ids.input_ids), logits(model, ids.input_ids), rtol=0, atol=0)
    generated = reloaded.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.input_ids.shape[1] + 6
    assert torch.equal(generated, model.generate(**ids, max_new_tokens=6, do_sample=False))
