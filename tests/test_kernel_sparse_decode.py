"""Sparse decode attention: the torch reference against dense SDPA; the Triton kernel against the reference on
contiguous and paged caches (CPU interpreter here, a real GPU where there is one); argument errors; an sm_90
compile check."""

import math

import pytest
import torch
import torch.nn.functional as F
from triton_harness import H100_SHARED_BYTES, gpu_capability_at_least, run_interpreted, sm90_shared_memory

from llmopt.triton_kernels.launch import interpreted as interpreted_kernel
from llmopt.triton_kernels.sparse_decode import kernel as compiled_kernel
from llmopt.triton_kernels.sparse_decode import naive_sparse_decode_attention

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of the output's max abs
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 silently wrong: bf16 only on a GPU
# (batch, heads, kv_heads, seqlens, dim, page_size): GQA 4:2 with D = 60, 6:1 with D = 80, partial last pages
SHAPES = {"4:2": (3, 4, 2, [150, 37, 100], 60, 16), "6:1": (2, 6, 1, [200, 65], 80, 32)}
GARBAGE = 1e4  # cache slots past a sequence: finite (the reference multiplies them by 0), loud if ever read


def contiguous_case(batch: int, heads: int, kv_heads: int, seqlens: list[int], dim: int, page_size: int,
                    dtype: torch.dtype, seed: int) -> dict:
    """Keyword arguments of one call on a contiguous cache ``[B, Hkv, max(seqlens), D]``: each KV head selects
    its sequence's last page (the new token) and each other page with probability 1/2, in shuffled order;
    unused slots hold -1."""
    generator = torch.Generator().manual_seed(seed)
    length, pages = max(seqlens), math.ceil(max(seqlens) / page_size)
    q = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=generator).to(dtype) for _ in range(2))
    indices = torch.full((batch, kv_heads, pages), -1, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b, seqlen in enumerate(seqlens):
        k[b, :, seqlen:] = v[b, :, seqlen:] = GARBAGE
        for h in range(kv_heads):
            chosen = torch.rand(pages, generator=generator) < 0.5
            chosen[(seqlen - 1) // page_size] = True
            picked = chosen.nonzero().flatten().int()
            counts[b, h] = len(picked)
            indices[b, h, :len(picked)] = picked[torch.randperm(len(picked), generator=generator)]
    return {"q": q, "k_cache": k, "v_cache": v, "page_indices": indices, "page_counts": counts,
            "page_size": page_size, "cache_seqlens": torch.tensor(seqlens, dtype=torch.int32)}


def paged(case: dict, spare_pages: int, seed: int) -> dict:
    """The same call on a paged cache: the pages at shuffled physical pages among spare ones (left as
    garbage), block-table entries past a sequence's pages set to -1."""
    k, v, page_size = case["k_cache"], case["v_cache"], case["page_size"]
    (batch, kv_heads, length, dim), max_pages = k.shape, math.ceil(k.shape[2] / page_size)
    generator = torch.Generator().manual_seed(seed)
    table = torch.randperm(batch * max_pages + spare_pages, generator=generator)[:batch * max_pages]
    table = table.view(batch, max_pages).int()
    caches = []
    for cache in (k, v):
        logical = F.pad(cache, (0, 0, 0, max_pages * page_size - length), value=GARBAGE)
        logical = logical.view(batch, kv_heads, max_pages, page_size, dim).transpose(1, 2).flatten(0, 1)
        physical = torch.full((len(logical) + spare_pages, kv_heads, page_size, dim), GARBAGE, dtype=k.dtype)
        physical[table.flatten().long()] = logical
        caches.append(physical)
    for b, seqlen in enumerate(case["cache_seqlens"].tolist()):
        table[b, math.ceil(seqlen / page_size):] = -1
    return case | {"k_cache": caches[0], "v_cache": caches[1], "block_table": table}


def no_key_case() -> dict:
    """KV head 0 of sequence 0 selects nothing, of sequence 1 only a page past its end: no key for them."""
    case = contiguous_case(2, 4, 2, [100, 20], 32, 16, torch.float16, seed=7)
    counts, indices = case["page_counts"].clone(), case["page_indices"].clone()
    counts[0, 0], counts[1, 0], indices[1, 0, 0] = 0, 1, 5
    return case | {"page_counts": counts, "page_indices": indices}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_naive_full_selection_is_dense_attention_over_valid_tokens():
    case = contiguous_case(3, 4, 2, [150, 37, 100], 60, 16, torch.float32, seed=0)
    pages = case["page_indices"].shape[-1]
    case |= {"page_indices": torch.arange(pages, dtype=torch.int32).expand(3, 2, pages).contiguous(),
             "page_counts": torch.full((3, 2), pages, dtype=torch.int32)}
    keys, values = (case[name].repeat_interleave(2, 1) for name in ("k_cache", "v_cache"))
    valid = torch.arange(150) < case["cache_seqlens"][:, None, None, None]
    dense = F.scaled_dot_product_attention(case["q"][:, :, None], keys, values, attn_mask=valid)[:, :, 0]
    assert relative_error(naive_sparse_decode_attention(**case), dense) < 1e-5


def test_naive_paged_cache_equals_contiguous_cache():
    case = contiguous_case(3, 4, 2, [150, 37, 100], 60, 16, torch.float32, seed=1)
    out = naive_sparse_decode_attention(**paged(case, spare_pages=5, seed=1))
    assert relative_error(out, naive_sparse_decode_attention(**case)) < 1e-6


def interpreter_cases() -> dict[str, dict]:
    cases = {"no-key": no_key_case()}
    for dtype in CPU_DTYPES:
        for name, shape in SHAPES.items():
            contiguous = contiguous_case(*shape, dtype, seed=2)
            cases[f"contiguous-{name}-{dtype}"] = contiguous
            cases[f"paged-{name}-{dtype}"] = paged(contiguous, spare_pages=4, seed=3)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict, dict]:
    """(inputs, outputs) of every interpreter case, run in one worker process."""
    cases = interpreter_cases()
    return cases, run_interpreted("llmopt.triton_kernels.sparse_decode.kernel", "sparse_decode_attention", cases,
                                  tmp_path_factory.mktemp("interpreter"))


def check_against_naive(interpreted: tuple[dict, dict], name: str) -> torch.Tensor:
    """The kernel's output of case ``name``, once checked to be fully written and to match the reference."""
    call, out = interpreted[0][name], interpreted[1][name]
    assert out.dtype == call["q"].dtype and torch.isfinite(out).all()
    assert relative_error(out, naive_sparse_decode_attention(**call)) < TOLERANCE[out.dtype]
    return out


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_triton_matches_naive(interpreted, layout, shape, dtype):
    check_against_naive(interpreted, f"{layout}-{shape}-{dtype}")


def test_triton_heads_that_see_no_key_are_zero(interpreted):
    out = check_against_naive(interpreted, "no-key")
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))


def arguments(**changes) -> dict:
    return contiguous_case(2, 4, 2, [40, 33], 32, 16, torch.float32, seed=8) | changes


@pytest.mark.parametrize("changes, message", [
    ({"page_indices": torch.zeros(2, 2, 3, dtype=torch.int64)}, "page_indices must be int32"),
    ({"page_counts": torch.zeros(2, 4, dtype=torch.int32)}, r"page_counts must have shape \[2, 2\]"),
    ({"cache_seqlens": torch.zeros(2)}, "cache_seqlens must be int32"),
    ({"q": torch.zeros(2, 3, 32)}, r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ({"q": torch.zeros(2, 4, 1, 32)}, r"q must be \[B, H, D\]"),
    ({"v_cache": torch.zeros(2, 2, 39, 32)}, r"k_cache, v_cache one \[B, Hkv, Lmax, D\] shape"),
    ({"q": torch.zeros(2, 4, 32, dtype=torch.float16)}, "share one dtype"),
    ({"page_size": 24}, "page_size must be one of"),
    ({"block_table": torch.zeros(2, 3, dtype=torch.int32)}, r"holds page_size \(16\) tokens a page, got 40"),
])
def test_bad_arguments_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        compiled_kernel.sparse_decode_attention(**arguments(**changes))


@pytest.mark.skipif(interpreted_kernel(compiled_kernel._sparse_decode_kernel),
                    reason="TRITON_INTERPRET is set for the whole run")
def test_compiled_kernel_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        compiled_kernel.sparse_decode_attention(**arguments())


def test_kernel_compiles_for_sm90_within_shared_memory():
    """The largest tile (128-token pages, D 128, 8 query heads per KV head) compiled for H100 without a GPU,
    for both cache layouts: catches compile errors and a launch config that would overflow shared memory."""
    variants = {}
    for dtype in ("fp16", "bf16", "fp32"):
        for paged in (False, True):
            constexprs = {"GROUP": 8, "BLOCK_G": 16, "BLOCK_D": 128, "PAGE_SIZE": 128, "PAGED": paged,
                          "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            if not paged:
                constexprs["table_ptr"] = None  # what the launcher passes for a contiguous cache
            variants[dtype + ("-paged" if paged else "-contiguous")] = {
                "dtype": dtype, "constexprs": constexprs, "options": compiled_kernel._LAUNCH_OPTIONS}
    shared = sm90_shared_memory("llmopt.triton_kernels.sparse_decode.kernel", "_sparse_decode_kernel",
                                {"pages_ptr": "*i32", "counts_ptr": "*i32", "seqlens_ptr": "*i32",
                                 "table_ptr": "*i32"}, variants)
    assert len(shared) == 6
    assert all(0 < used <= H100_SHARED_BYTES for used in shared.values()), shared


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_capability_at_least(8), reason="needs a CUDA GPU of capability 8.0+ (bf16 MMA)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_triton_on_gpu_matches_naive(layout, dtype):
    case = contiguous_case(4, 32, 8, [3000, 1, 2049, 777], 128, 64, dtype, seed=9)
    if layout == "paged":
        case = paged(case, spare_pages=7, seed=10)
    case = {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in case.items()}
    out = compiled_kernel.sparse_decode_attention(**case)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, naive_sparse_decode_attention(**case)) < TOLERANCE[dtype]
