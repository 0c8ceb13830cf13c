"""Block-sparse prefill attention: the torch reference against dense SDPA; the Triton kernel against the
reference on odd shapes (CPU interpreter here, a real GPU where there is one); argument errors; an sm_90
compile check."""

import math

import pytest
import torch
import torch.nn.functional as F
from triton_harness import H100_SHARED_BYTES, gpu_capability_at_least, run_interpreted, sm90_shared_memory

from llmopt.triton_kernels.block_sparse_attention import kernel as compiled_kernel
from llmopt.triton_kernels.block_sparse_attention import naive_block_sparse_attention
from llmopt.triton_kernels.launch import interpreted as interpreted_kernel

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of the output's max abs
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter gets bf16 silently wrong: bf16 only on a GPU
# (batch, heads, kv_heads, q_len, kv_len, dim, block): GQA 4:2 and 6:1, D = 60 and 80, a later prefill chunk
SHAPES = [(1, 4, 2, 200, 200, 60, 64), (1, 6, 1, 200, 200, 80, 32), (2, 4, 2, 72, 200, 64, 32),
          (1, 2, 2, 45, 45, 16, 16)]
KV_LENS = torch.tensor([150, 71, 128], dtype=torch.int32)


def qkv(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, dim: int, dtype: torch.dtype,
        generator: torch.Generator, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    shapes = [(batch, heads, q_len, dim), (batch, kv_heads, kv_len, dim), (batch, kv_heads, kv_len, dim)]
    return tuple(torch.randn(shape, generator=generator).to(device, dtype) for shape in shapes)


def random_selection(batch: int, kv_heads: int, q_len: int, kv_len: int, block: int, extra: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) in shuffled order: the key blocks holding each query block's own positions,
    plus each other block (causally empty ones too) with probability ``extra``; unused slots hold -1."""
    q_blocks, kv_blocks = math.ceil(q_len / block), math.ceil(kv_len / block)
    num = torch.zeros(batch, kv_heads, q_blocks, dtype=torch.int32)
    indices = torch.full((batch, kv_heads, q_blocks, kv_blocks), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            for m in range(q_blocks):
                first, last = kv_len - q_len + m * block, kv_len - q_len + min(q_len, (m + 1) * block) - 1
                chosen = torch.rand(kv_blocks, generator=generator) < extra
                chosen[first // block:last // block + 1] = True
                picked = chosen.nonzero().flatten().int()
                num[b, h, m] = len(picked)
                indices[b, h, m, :len(picked)] = picked[torch.randperm(len(picked), generator=generator)]
    return num, indices


def full_selection(batch: int, kv_heads: int, q_len: int, kv_len: int,
                   block: int) -> tuple[torch.Tensor, torch.Tensor]:
    q_blocks, kv_blocks = math.ceil(q_len / block), math.ceil(kv_len / block)
    num = torch.full((batch, kv_heads, q_blocks), kv_blocks, dtype=torch.int32)
    return num, torch.arange(kv_blocks, dtype=torch.int32).expand(batch, kv_heads, q_blocks, kv_blocks)


def dense_mask(num: torch.Tensor, indices: torch.Tensor, q_len: int, kv_len: int, block: int,
               group: int) -> torch.Tensor:
    """``[B, H, Lq, Lk]`` selected and causal, built block by block (not the reference's way)."""
    batch, kv_heads, q_blocks = num.shape
    mask = torch.zeros(batch, kv_heads, q_blocks * block, kv_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(kv_heads):
            for m in range(q_blocks):
                for n in indices[b, h, m, :num[b, h, m]].tolist():
                    mask[b, h, m * block:(m + 1) * block, n * block:(n + 1) * block] = True
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return (mask[:, :, :q_len] & causal).repeat_interleave(group, 1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_naive_full_selection_is_dense_causal_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = qkv(2, 4, 2, 200, 200, 60, torch.float32, generator)
    out = naive_block_sparse_attention(q, k, v, *full_selection(2, 2, 200, 200, 64), block_size=64)
    assert relative_error(out, sdpa(q, k, v, None)) < 1e-5


def test_naive_chunk_with_full_selection_is_dense_attention():
    generator = torch.Generator().manual_seed(1)
    q, k, v = qkv(1, 6, 1, 90, 200, 32, torch.float32, generator)
    out = naive_block_sparse_attention(q, k, v, *full_selection(1, 1, 90, 200, 32), block_size=32)
    causal = torch.ones(90, 200, dtype=torch.bool).tril(200 - 90)
    assert relative_error(out, sdpa(q, k, v, causal)) < 1e-5


def test_naive_random_selection_is_masked_dense_attention():
    generator = torch.Generator().manual_seed(2)
    q, k, v = qkv(2, 4, 2, 150, 230, 60, torch.float32, generator)
    num, indices = random_selection(2, 2, 150, 230, 32, 0.3, generator)
    out = naive_block_sparse_attention(q, k, v, num, indices, block_size=32)
    assert relative_error(out, sdpa(q, k, v, dense_mask(num, indices, 150, 230, 32, group=2))) < 1e-5


def random_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int, **extra) -> dict:
    """Keyword arguments of one call: random q, k, v and a random selection holding the diagonal blocks."""
    batch, heads, kv_heads, q_len, kv_len, dim, block = shape
    generator = torch.Generator().manual_seed(seed)
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype, generator)
    num, indices = random_selection(batch, kv_heads, q_len, kv_len, block, 0.4, generator)
    return {"q": q, "k": k, "v": v, "kv_num_blocks": num, "kv_indices": indices, "block_size": block} | extra


def no_key_case() -> dict:
    """Query block 0 reads only a causally empty block, query block 1 nothing: rows 0-63 see no key."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = qkv(1, 2, 1, 100, 100, 32, torch.float16, generator)
    num = torch.tensor([[[1, 0, 1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[3, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [3, 0, 0, 0]]]], dtype=torch.int32)
    return {"q": q, "k": k, "v": v, "kv_num_blocks": num, "kv_indices": indices, "block_size": 32}


def poisoned(case: dict) -> dict:
    """The same call with huge keys and values past kv_lens, which must not change the output."""
    k, v = case["k"].clone(), case["v"].clone()
    for b, length in enumerate(case["kv_lens"].tolist()):
        k[b, :, length:] = v[b, :, length:] = 1e4
    return case | {"k": k, "v": v}


def strided(case: dict) -> dict:
    """The same call with q, k, v as transposed views of ``[B, L, H, D]`` tensors (as in transformers)."""
    return case | {name: case[name].transpose(1, 2).contiguous().transpose(1, 2) for name in ("q", "k", "v")}


def case_id(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    return "x".join(map(str, shape)) + f"-{dtype}"


def interpreter_cases() -> dict[str, dict]:
    cases = {"no-key": no_key_case(), "strided": strided(random_case(SHAPES[0], torch.float16, seed=6))}
    for dtype in CPU_DTYPES:
        for shape in SHAPES:
            cases[case_id(shape, dtype)] = random_case(shape, dtype, seed=3, scale=0.1)
        padded = random_case((3, 4, 2, 100, 150, 60, 32), dtype, seed=4, kv_lens=KV_LENS)
        cases[f"padded-{dtype}"], cases[f"padded-poisoned-{dtype}"] = padded, poisoned(padded)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict, dict]:
    """(inputs, outputs) of every interpreter case, run in one worker process."""
    cases = interpreter_cases()
    return cases, run_interpreted("llmopt.triton_kernels.block_sparse_attention.kernel", "block_sparse_attention", cases,
                                  tmp_path_factory.mktemp("interpreter"))


def check_against_naive(interpreted: tuple[dict, dict], name: str) -> torch.Tensor:
    """The kernel's output of case ``name``, once checked to be fully written and to match the reference."""
    call, out = interpreted[0][name], interpreted[1][name]
    assert out.dtype == call["q"].dtype and torch.isfinite(out).all()
    assert relative_error(out, naive_block_sparse_attention(**call)) < TOLERANCE[out.dtype]
    return out


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_triton_matches_naive(interpreted, shape, dtype):
    check_against_naive(interpreted, case_id(shape, dtype))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_triton_padded_batch_masks_keys_past_kv_lens(interpreted, dtype):
    out = check_against_naive(interpreted, f"padded-{dtype}")
    assert torch.equal(out, interpreted[1][f"padded-poisoned-{dtype}"])


def test_triton_reads_strided_views(interpreted):
    assert not interpreted[0]["strided"]["q"].is_contiguous()
    check_against_naive(interpreted, "strided")


def test_triton_rows_that_see_no_key_are_zero(interpreted):
    out = check_against_naive(interpreted, "no-key")
    assert torch.equal(out[:, :, :64], torch.zeros_like(out[:, :, :64]))


def arguments(**changes) -> dict:
    q, k, v = torch.zeros(1, 4, 100, 32), torch.zeros(1, 2, 100, 32), torch.zeros(1, 2, 100, 32)
    num, indices = full_selection(1, 2, 100, 100, 32)
    return {"q": q, "k": k, "v": v, "kv_num_blocks": num, "kv_indices": indices, "block_size": 32} | changes


@pytest.mark.parametrize("changes, message", [
    ({"kv_indices": torch.zeros(1, 2, 4, 4, dtype=torch.int64)}, "kv_indices must be int32"),
    ({"kv_num_blocks": torch.zeros(1, 2, 3, dtype=torch.int32)}, r"kv_num_blocks must have shape \[1, 2, 4"),
    ({"q": torch.zeros(1, 3, 100, 32)}, r"query heads \(3\) must be a multiple of KV heads \(2\)"),
    ({"v": torch.zeros(1, 2, 90, 32)}, r"k, v one \[B, Hkv, Lk, D\] shape"),
    ({"q": torch.zeros(1, 4, 100, 32, dtype=torch.float16)}, "share one dtype"),
    ({"q": torch.zeros(1, 4, 101, 32)}, r"Lq \(101\) cannot exceed Lk \(100\)"),
    ({"q": torch.zeros(1, 4, 100, 8), "k": torch.zeros(1, 2, 100, 8), "v": torch.zeros(1, 2, 100, 8)},
     r"head dim must be in \[16, 128\]"),
    ({"block_size": 48}, "block_size must be one of"),
    ({"kv_lens": torch.zeros(2, dtype=torch.int32)}, r"kv_lens must have shape \[1\]"),
])
def test_bad_arguments_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        compiled_kernel.block_sparse_attention(**arguments(**changes))


@pytest.mark.skipif(interpreted_kernel(compiled_kernel._block_sparse_attention_kernel),
                    reason="TRITON_INTERPRET is set for the whole run")
def test_compiled_kernel_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        compiled_kernel.block_sparse_attention(**arguments())


def test_kernel_compiles_for_sm90_within_shared_memory():
    """The largest tile (block 128, D 128) compiled for H100 without a GPU, with and without kv_lens: catches
    compile errors and a launch config that would overflow shared memory. fp32 has the largest tiles (one
    variant: it compiles slowly)."""
    variants = {}
    for dtype, itemsize, has_kv_lens in [("fp16", 2, False), ("fp16", 2, True), ("bf16", 2, False),
                                         ("bf16", 2, True), ("fp32", 4, False)]:
        constexprs = {"GROUP": 4, "BLOCK": 128, "BLOCK_D": 128, "HAS_KV_LENS": has_kv_lens,
                      "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        if not has_kv_lens:
            constexprs["kv_lens_ptr"] = None  # what the launcher passes without kv_lens
        variants[dtype + ("-kv_lens" if has_kv_lens else "")] = {
            "dtype": dtype, "constexprs": constexprs, "options": compiled_kernel._launch_options(128, 128, itemsize)}
    shared = sm90_shared_memory("llmopt.triton_kernels.block_sparse_attention.kernel",
                                "_block_sparse_attention_kernel",
                                {"num_blocks_ptr": "*i32", "indices_ptr": "*i32", "kv_lens_ptr": "*i32"}, variants)
    assert set(shared) == {"fp16", "fp16-kv_lens", "bf16", "bf16-kv_lens", "fp32"}
    assert all(0 < used <= H100_SHARED_BYTES for used in shared.values()), shared


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_capability_at_least(8), reason="needs a CUDA GPU of capability 8.0+ (bf16 MMA)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000, 128, 128), (1, 6, 1, 300, 1100, 80, 64)],
                         ids=lambda shape: "x".join(map(str, shape)))
def test_triton_on_gpu_matches_naive(shape, dtype):
    batch, heads, kv_heads, q_len, kv_len, dim, block = shape
    generator = torch.Generator().manual_seed(6)
    q, k, v = qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype, generator, device="cuda")
    num, indices = (t.cuda() for t in random_selection(batch, kv_heads, q_len, kv_len, block, 0.3, generator))
    out = compiled_kernel.block_sparse_attention(q, k, v, num, indices, block_size=block)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = naive_block_sparse_attention(q, k, v, num, indices, block_size=block)
    assert relative_error(out, ref) < TOLERANCE[dtype]
