"""Block-sparse attention: the torch path against dense masked attention, the selector's invariants, the model
integration on a tiny Llama (generate, fallbacks, save/load), and one perplexity check on the real model."""

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from llmopt.checkpoint import load_optimized, save_optimized
from llmopt.config import ConfigError
from llmopt.patch import patch_model
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.sparse.decode import page_bounds, select_pages, sparse_decode_torch, summarize
from llmopt.sparse.selection import block_masks, crossed_blocks, select_blocks, to_indices
from llmopt.sparse.torch_attention import sparse_attention_torch
from llmopt.sparse.transform import SparseAttention

# relative error; fp16 is computed in fp32 then rounded, bf16 computed in bf16
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


def random_selection(b: int, hkv: int, lq: int, lk: int, bs: int, density: float, generator: torch.Generator):
    """A random causal selection that keeps the sink and the diagonal band: (kv_num_blocks, kv_indices, keep),
    the selected blocks of each row in random order."""
    config = SparseAttentionConfig(block_size=bs, mass=density)
    causal, forced = block_masks(lq, lk, config, torch.device("cpu"))
    keep = (torch.rand(b, hkv, *causal.shape, generator=generator) < density) & causal | forced
    kv_num_blocks, kv_indices = to_indices(keep)
    valid = torch.arange(kv_indices.shape[-1]) < kv_num_blocks[..., None]
    shuffle = torch.rand(kv_indices.shape, generator=generator).masked_fill(~valid, 2.0).argsort(-1)
    return kv_num_blocks, kv_indices.gather(-1, shuffle), keep  # the valid entries in random order


def dense_reference(q, k, v, keep, bs):
    """fp32 SDPA under the boolean mask the block selection ``keep [B, Hkv, Qb, Kb]`` allows, causal."""
    lq, lk, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    mask = keep.repeat_interleave(bs, 2)[:, :, :lq].repeat_interleave(bs, 3)[..., :lk]
    causal = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
    mask = (mask & causal).repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                          v.float().repeat_interleave(g, 1), attn_mask=mask)


def relative_error(output, reference):
    return ((output.float() - reference).norm() / reference.norm()).item()


def qkv(b, h, hkv, lq, lk, d, dtype, generator):
    q = torch.randn(b, h, lq, d, generator=generator) * 2
    k = torch.randn(b, hkv, lk, d, generator=generator) * 2
    v = torch.randn(b, hkv, lk, d, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = [  # (B, H, Hkv, Lq, Lk, D, block): odd lengths, head_dim 60, GQA 4:2 and 6:1, chunks Lq < Lk
    (1, 4, 2, 100, 100, 60, 16),
    (2, 6, 1, 77, 77, 32, 16),
    (1, 4, 2, 40, 130, 60, 32),
    (1, 6, 1, 33, 97, 16, 16),
    (2, 8, 4, 128, 128, 16, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_matches_dense_masked_attention(shape, dtype):
    b, h, hkv, lq, lk, d, bs = shape
    generator = torch.Generator().manual_seed(0)
    q, k, v = qkv(b, h, hkv, lq, lk, d, dtype, generator)
    kv_num_blocks, kv_indices, keep = random_selection(b, hkv, lq, lk, bs, 0.5, generator)
    output = sparse_attention_torch(q, k, v, kv_num_blocks, kv_indices, block_size=bs)
    assert output.dtype == dtype and output.shape == q.shape
    assert relative_error(output, dense_reference(q, k, v, keep, bs)) < TOLERANCE[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_full_selection_equals_dense_causal_sdpa(shape):
    b, h, hkv, lq, lk, d, bs = shape
    q, k, v = qkv(b, h, hkv, lq, lk, d, torch.float32, torch.Generator().manual_seed(1))
    selection = select_blocks(q, k, SparseAttentionConfig(block_size=bs, mass=1.0))
    assert selection.density == 1.0
    output = sparse_attention_torch(q, k, v, selection.kv_num_blocks, selection.kv_indices, block_size=bs)
    causal = torch.arange(lk)[None, :] <= (lk - lq + torch.arange(lq))[:, None]
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    assert relative_error(output, reference) < TOLERANCE[torch.float32]


def test_torch_path_on_random_shapes_and_densities():
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(30):
        hkv, groups, bs = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4]), rng.choice([16, 32])
        lk = rng.randint(2, 150)
        lq = rng.randint(1, lk)
        q, k, v = qkv(rng.randint(1, 2), hkv * groups, hkv, lq, lk, rng.choice([16, 60]), torch.float32, generator)
        kv_num_blocks, kv_indices, keep = random_selection(q.shape[0], hkv, lq, lk, bs, rng.random(), generator)
        output = sparse_attention_torch(q, k, v, kv_num_blocks, kv_indices, block_size=bs)
        assert relative_error(output, dense_reference(q, k, v, keep, bs)) < TOLERANCE[torch.float32], (lq, lk, bs)


def test_unselected_blocks_are_never_read():
    q, k, v = qkv(1, 4, 2, 32, 130, 16, torch.float32, torch.Generator().manual_seed(3))
    keep = torch.zeros(1, 2, 2, 9, dtype=torch.bool)
    keep[..., [0, 6, 7, 8]] = True  # the sink, block 6 and the diagonal band; blocks 1-5 skipped
    kv_num_blocks, kv_indices = to_indices(keep)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 16:96], poisoned_v[:, :, 16:96] = float("nan"), float("nan")
    output = sparse_attention_torch(q, poisoned_k, poisoned_v, kv_num_blocks, kv_indices, block_size=16)
    assert relative_error(output, dense_reference(q, k, v, keep, 16)) < TOLERANCE[torch.float32]


def peaked_qkv(lq=200, lk=200, h=4, hkv=2, d=16, seed=0):
    """Keys with a few strong directions, so attention concentrates and the selection has something to find."""
    return qkv(1, h, hkv, lq, lk, d, torch.float32, torch.Generator().manual_seed(seed))


def test_selection_keeps_sink_and_diagonal_and_shares_per_group():
    q, k, _ = peaked_qkv(lq=90, lk=200)
    config = SparseAttentionConfig(block_size=16, mass=0.3)
    selection = select_blocks(q, k, config)
    kb = math.ceil(200 / 16)
    keep = torch.zeros(*selection.kv_num_blocks.shape, kb, dtype=torch.bool)
    for index in torch.nonzero(torch.ones_like(selection.kv_num_blocks)):
        b, h, j = index.tolist()
        keep[b, h, j, selection.kv_indices[b, h, j, :selection.kv_num_blocks[b, h, j]].long()] = True
    causal, forced = block_masks(90, 200, config, torch.device("cpu"))
    assert keep.shape[1] == 2  # one selection per KV head
    assert (keep | ~forced).all() and not (keep & ~causal).any()
    assert selection.density < 1.0
    swapped = q[:, [1, 0, 3, 2]]  # query heads swapped within their groups: the same selection
    assert torch.equal(select_blocks(swapped, k, config).kv_indices, selection.kv_indices)


def test_density_falls_with_mass_and_mass_one_keeps_every_causal_block():
    q, k, _ = peaked_qkv()
    densities = [select_blocks(q, k, SparseAttentionConfig(block_size=16, mass=m)).density
                 for m in (0.2, 0.5, 0.8, 0.95, 1.0)]
    assert densities == sorted(densities) and densities[0] < densities[-1] == 1.0


@pytest.mark.parametrize("lq, lk, bs", [(64, 64, 16), (48, 100, 16), (96, 130, 32), (32, 77, 16)])
def test_columns_and_diagonals_become_the_blocks_they_cross(lq, lk, bs):
    generator = torch.Generator().manual_seed(lk)
    columns, offsets = torch.rand(2, 1, 2, lk, generator=generator) < 0.04
    positions = lk - lq + torch.arange(lq)
    key = torch.arange(lk)
    tokens = columns[..., None, :] | offsets[..., (positions[:, None] - key).clamp(min=0)]  # [1, 2, Lq, Lk]
    tokens &= key <= positions[:, None]
    expected = tokens.unflatten(2, (lq // bs, bs)).any(3)
    expected = F.pad(expected, (0, -lk % bs)).unflatten(3, (-1, bs)).any(4)
    causal, forced = block_masks(lq, lk, SparseAttentionConfig(block_size=bs), torch.device("cpu"))
    crossed = crossed_blocks(columns, offsets, lq, bs) & causal
    assert expected.any() and torch.equal(crossed | forced, expected | forced)


def vertical_and_slash_qkv(length=160, slash=50, column=20):
    """One-hot keys (head dim = length), so each query attends exactly the keys its query points at: KV head 0
    attends key `column` and the key `slash` positions back (a vertical and a slash: the query rows of a block
    attend different key blocks, which a few sampled rows misread); KV head 1 attends key `column` only (every row
    alike, which the estimate reads right)."""
    position = torch.arange(length)
    k = torch.eye(length).expand(1, 2, length, length) * 30
    q = torch.zeros(1, 2, length, length)
    q[:, :, position >= column, column] = 30
    earlier = position >= slash
    q[0, 0, position[earlier], position[earlier] - slash] = 30
    return q, k, torch.randn(1, 2, length, length, generator=torch.Generator().manual_seed(0))


def test_a_vertical_slash_head_takes_vertical_slash_and_a_well_estimated_head_block_top_mass():
    q, k, v = vertical_and_slash_qkv()
    config = SparseAttentionConfig(block_size=16, mass=0.95)
    selection = select_blocks(q, k, config)
    assert selection.vertical_slash.tolist() == [[True, False]]
    block_only = select_blocks(q, k, dataclasses.replace(config, pattern_threshold=1.0))
    assert not block_only.vertical_slash.any()
    assert torch.equal(selection.kv_indices[0, 1], block_only.kv_indices[0, 1])  # head 1 unchanged
    output = sparse_attention_torch(q, k, v, selection.kv_num_blocks, selection.kv_indices, block_size=16)
    keep = torch.zeros(1, 2, 10, 10, dtype=torch.bool)
    for h, j in torch.nonzero(torch.ones(2, 10)).tolist():
        keep[0, h, j, selection.kv_indices[0, h, j, :selection.kv_num_blocks[0, h, j]].long()] = True
    assert relative_error(output, dense_reference(q, k, v, keep, 16)) < TOLERANCE[torch.float32]
    # the selection holds what each head attends: sparse equals dense attention, without every block
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert relative_error(output, dense) < 1e-4 and selection.density < 1.0


def test_pattern_threshold_zero_makes_every_head_vertical_slash():
    q, k, _ = peaked_qkv()
    selection = select_blocks(q, k, SparseAttentionConfig(block_size=16, mass=0.5, pattern_threshold=0.0))
    assert selection.vertical_slash.all()
    with pytest.raises(ConfigError, match="sparse.pattern_threshold"):
        SparseAttentionConfig(pattern_threshold=1.5)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="sparse.mass"):
        SparseAttentionConfig(mass=0.0)
    with pytest.raises(ConfigError, match="sparse.min_seq_len"):
        SparseAttentionConfig(min_seq_len=1)


TINY_SPARSE = SparseAttentionConfig(block_size=16, mass=0.5, min_seq_len=48)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 97, (1, 100), generator=torch.Generator().manual_seed(2))


def test_mass_one_generates_the_dense_greedy_tokens(prompt):
    dense, sparse = tiny_model(), tiny_model()
    patch_model(sparse, SparseAttentionConfig(block_size=16, mass=1.0, min_seq_len=48))
    assert sparse.config._attn_implementation == "llmopt_sparse" and dense.config._attn_implementation == "sdpa"
    expected = dense.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    stats = sparse.llmopt_sparse_stats
    assert stats.calls["torch"] == 3 and stats.calls["dense"] == 3 * 5  # prefill sparse, decode steps dense


def test_transposed_keys_without_a_cache_give_the_same_logits(prompt):
    """transformers hands the backend transposed K/V views; without a cache nothing makes them contiguous."""
    model = patch_model(tiny_model(), TINY_SPARSE)
    batch = torch.cat([prompt[:, :96], prompt[:, 4:]])  # a multiple of the block size: no padding copy
    with torch.no_grad():
        cached, uncached = model(batch).logits, model(batch, use_cache=False).logits
    assert model.llmopt_sparse_stats.calls == {"torch": 6} and torch.allclose(uncached, cached, atol=1e-5)


def test_sparse_model_runs_sparse_on_long_prompts_and_dense_on_short_ones(prompt):
    model = patch_model(tiny_model(), TINY_SPARSE)
    stats = model.llmopt_sparse_stats
    with torch.no_grad():
        model(prompt[:, :40])
        assert stats.calls == {"dense": 3} and stats.density is None
        model(prompt)
    assert stats.calls == {"dense": 3, "torch": 3} and 0.0 < stats.density < 1.0
    padded = torch.ones(2, 100, dtype=torch.long)
    padded[1, :10] = 0
    with torch.no_grad():
        model(prompt.repeat(2, 1), attention_mask=padded)
    assert stats.calls["dense"] == 6
    assert list(stats.layer_densities) == [0, 1, 2] and stats.selected_heads == 3 * 4  # 4 KV heads per layer
    transform = SparseAttention()
    cost = transform.cost(model, TINY_SPARSE, prompt)
    assert 0.0 < cost["attention_density"] < 1.0 and 0.0 <= cost["vertical_slash_heads"] <= 1.0
    assert len(cost["attention_density_by_layer"].split()) == 3
    assert transform.baselines(TINY_SPARSE)["dense"].mass == 1.0


def test_save_and_load_optimized_gives_identical_logits(prompt, tmp_path):
    model = patch_model(tiny_model(), TINY_SPARSE)
    save_optimized(model, tmp_path / "sparse")
    loaded, _ = load_optimized(tmp_path / "sparse")
    assert loaded.config._attn_implementation == "llmopt_sparse"
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    assert loaded.llmopt_sparse_stats.calls == {"torch": 3}


@pytest.mark.slow
def test_real_model_keeps_perplexity_on_a_long_heldout_prompt():
    from llmopt.data.corpora import corpus_split
    from llmopt.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer("\n\n".join(corpus_split("wikipedia", "heldout")), return_tensors="pt").input_ids[:, :2048]
    with torch.no_grad():
        dense = model(ids, labels=ids).loss.exp().item()
        patch_model(model, SparseAttentionConfig(mass=0.95))
        sparse = model(ids, labels=ids).loss.exp().item()
    density = model.llmopt_sparse_stats.density
    assert model.llmopt_sparse_stats.calls == {"torch": 30}
    assert density < 0.9 and sparse / dense < 1.03, (dense, sparse, density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b, h, hkv, length, d, page", [(1, 4, 2, 200, 60, 16), (2, 6, 1, 131, 32, 32),
                                                    (2, 3, 3, 128, 16, 32)])
def test_sparse_decode_matches_the_naive_reference_over_the_selected_pages(b, h, hkv, length, d, page, dtype):
    from llmopt.triton_kernels.sparse_decode.naive import naive_sparse_decode_attention

    generator = torch.Generator().manual_seed(length)
    q, k, v = (x[:, :, -1] if i == 0 else x for i, x in enumerate(qkv(b, h, hkv, 1, length, d, dtype, generator)))
    indices, counts = select_pages(q, summarize(k, page, None), length, page, pages=2)
    assert indices.shape[-1] == 1 + 2 + (1 if length % page else 0)  # sink, the best two, the partial page
    expected = naive_sparse_decode_attention(q, k, v, indices, counts, page_size=page,
                                             cache_seqlens=torch.full((b,), length))
    output = sparse_decode_torch(q, k, v, indices, page)
    assert output.dtype == dtype and relative_error(output, expected.float()) < TOLERANCE[dtype]


def test_page_selection_finds_the_page_with_the_key_the_query_points_at():
    generator = torch.Generator().manual_seed(0)
    q, k, _ = qkv(1, 2, 1, 1, 256, 32, torch.float32, generator)
    q = q[:, :, -1]
    k[0, 0, 150] = q[0].sum(0) * 10  # page 9 of 16 holds a key both query heads score far above the rest
    summary = summarize(k, 16, None)
    indices, _ = select_pages(q, summary, 256, 16, pages=2)
    assert indices[0, 0].tolist() == [0, 9, 15]  # the sink, the page and the newest; no partial page at 256
    grown = summarize(torch.cat([k, k[:, :, :40]], 2), 16, summary)  # decoding on: two more full pages
    assert torch.equal(grown.boxes, summarize(torch.cat([k, k[:, :, :40]], 2), 16, None).boxes) and grown.pages == 18


def test_page_bounds_are_quests_bound_on_each_pages_best_score():
    generator = torch.Generator().manual_seed(1)
    q, k, _ = qkv(2, 6, 2, 1, 128, 32, torch.float32, generator)
    q = q[:, :, -1]
    pages = k.view(2, 2, 8, 16, 32)
    low, high = pages.amin(3)[:, :, None], pages.amax(3)[:, :, None]  # [B, Hkv, 1, P, D]
    qg = q.view(2, 2, 3, 1, 32)
    quest = torch.maximum(qg * low, qg * high).sum(-1).sum(2)  # the elementwise bound, summed over the group
    bounds = page_bounds(q, summarize(k, 16, None).boxes)
    torch.testing.assert_close(bounds, quest, rtol=1e-5, atol=1e-5)
    best = torch.einsum("bkgd,bkpsd->bkgps", q.view(2, 2, 3, 32), pages).amax(-1).sum(2)  # each head's best key
    assert (bounds >= best - 1e-5).all()


def test_sparse_decode_runs_in_generate_once_the_cache_is_long(prompt):
    config = SparseAttentionConfig(block_size=16, mass=0.5, min_seq_len=48, decode_pages=2, decode_max_density=1.0)
    model = patch_model(tiny_model(), config)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    stats = model.llmopt_sparse_stats
    assert out.shape == (1, 105) and stats.calls == {"torch": 3, "torch-decode": 3 * 4}
    assert stats.decode_density == pytest.approx(4 / 7)  # sink, newest full, best and partial of 7 pages


def test_decode_stays_dense_while_the_pages_read_are_too_large_a_share_of_the_cache(prompt):
    config = SparseAttentionConfig(block_size=16, mass=0.5, min_seq_len=48, decode_pages=2)  # at most 1/4 read
    # 4 pages read (sink, newest full, best, partial): sparse from 16 pages of 16 tokens, i.e. 241 tokens
    assert [config.decodes_sparse(n) for n in (240, 241, 1000)] == [False, True, True]
    assert not dataclasses.replace(config, decode_pages=0).decodes_sparse(1000)
    assert not dataclasses.replace(config, min_seq_len=2000).decodes_sparse(1000)
    model = patch_model(tiny_model(), config)
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)  # 7 pages: 4/7 would be read
    assert model.llmopt_sparse_stats.calls == {"torch": 3, "dense": 3 * 4}
    prefill_only = patch_model(tiny_model(), dataclasses.replace(config, decode_pages=0))
    assert torch.equal(out, prefill_only.generate(prompt, max_new_tokens=5, do_sample=False))
    with pytest.raises(ConfigError, match="sparse.decode_max_density"):
        SparseAttentionConfig(decode_max_density=0)
    with pytest.raises(ConfigError, match="sparse.decode_pages"):
        SparseAttentionConfig(decode_pages=-1)
    with pytest.raises(ConfigError, match="sparse.decode_page_size"):
        SparseAttentionConfig(decode_page_size=24)
    # decode pages are sized on their own: 16 keys against prefill blocks of 64
    assert SparseAttentionConfig(block_size=64, decode_pages=2).decode_pages_read(1000) == (4, 63)
