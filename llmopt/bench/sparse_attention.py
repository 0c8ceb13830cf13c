"""Sparse attention vs dense SDPA, operator level: the block selection plus the sparse kernel against dense causal
attention, on the q/k/v of real text.

q/k/v (post-RoPE) come from a few layers of the default model run on held-out Wikipedia text, so the selector
picks the density it would pick in use; lengths past the model's 8192 positions are fine for timing an operator
(RoPE extrapolates; the attention pattern is still the model's own). Dense, selection and selection + sparse take
turns within each round (each summed over the layers). The sparse path is PyTorch on CPU and the Triton kernel
when CUDA is present. Decode (when the recipe sets `decode_pages`): the last query of each layer over the whole
cache, dense SDPA against page selection (the page summaries extended by the newest page, as in generation) plus
the sparse decode, `DECODE_STEPS` steps per timing. Whole model: the original and the sparse model in transformers,
prefill of one held-out prompt and the greedy decode after it, taking turns.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.bench.prompts import heldout_tokens
from llmopt.bench.results import Row, SectionResult, Series
from llmopt.bench.timing import Spread, ratio, timed_rounds

CAPTURE = "llmopt_bench_capture"
DECODE_STEPS = 10
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Captured(Exception):
    """Stops the forward pass once the last wanted layer is captured."""


@torch.no_grad()
def capture_qkv(model, tokens: torch.Tensor, layers: list[int]) -> list[QKV]:
    """Post-RoPE (q ``[1, H, L, D]``, k, v ``[1, Hkv, L, D]``) of `layers`, running only as far as needed."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    captured: dict[int, QKV] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            captured[module.layer_idx] = (query.clone(), key.clone(), value.clone())
            if len(captured) == len(layers):
                raise _Captured
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        model(tokens)
    except _Captured:
        pass
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in layers]


@torch.no_grad()
def bench_decode(qkv: list[QKV], config, repeats: int, warmup: int) -> dict:
    """Seconds of `DECODE_STEPS` decode attentions (summed over layers): dense SDPA vs page selection + sparse
    decode; the density of the pages read."""
    from llmopt.sparse.attention import page_sparse
    from llmopt.sparse.decode import select_pages, summarize

    page, device = config.decode_page_size, qkv[0][0].device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps = [(q[:, :, -1:], k, v, summarize(k[:, :, :-page], page, None)) for q, k, v in qkv]

    def dense():
        for _ in range(DECODE_STEPS):
            for q, k, v, _ in steps:
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        synchronize()

    def sparse():
        for _ in range(DECODE_STEPS):
            for q, k, v, earlier in steps:
                indices, counts = select_pages(q[:, :, 0], summarize(k, page, earlier), k.shape[2], page,
                                               config.decode_pages)
                page_sparse(q[:, :, 0], k, v, indices, counts, page, None)
        synchronize()

    q, k, _, earlier = steps[0]
    indices, _ = select_pages(q[:, :, 0], summarize(k, page, earlier), k.shape[2], page, config.decode_pages)
    return {**timed_rounds({"dense": dense, "sparse": sparse}, repeats, warmup),
            "density": indices.shape[-1] / -(-k.shape[2] // page)}


def decode_reads(config, context: int) -> str:
    """How the sparse model's decode step over a `context`-token cache reads it, for a row's claim."""
    read, pages = config.decode_pages_read(context)
    if config.decodes_sparse(context):
        return f"pages read {read / pages:.2f}"
    return f"decodes dense ({read} of {pages} pages would be read)" if config.decode_pages else "decodes dense"


@torch.no_grad()
def generate_speed(models: dict[str, nn.Module], prompt: torch.Tensor, new_tokens: int, repeats: int,
                   warmup: int) -> dict[str, dict[str, list]]:
    """Per model, taking turns each round: seconds of the prefill of ``prompt [1, L]`` (``"prefill"``), greedy
    decode tokens per second of the `new_tokens` - 1 steps after it (``"decode"``), fed one by one through the KV
    cache as `generate()` feeds them, and the greedy tokens of the last round (``"tokens"``)."""
    result = {name: {"prefill": [], "decode": [], "tokens": []} for name in models}
    for round_ in range(warmup + repeats):
        for name, model in models.items():
            started = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            prefilled = time.perf_counter()
            tokens = [out.logits[:, -1:].argmax(-1)]
            for _ in range(new_tokens - 1):
                out = model(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
                tokens.append(out.logits[:, -1:].argmax(-1))
            if round_ >= warmup:
                result[name]["prefill"].append(prefilled - started)
                result[name]["decode"].append((new_tokens - 1) / (time.perf_counter() - prefilled))
                result[name]["tokens"] = torch.cat(tokens, 1)[0].tolist()
    return result


def generate_rows(model: nn.Module, tokenizer, config, settings) -> tuple[list[Row], str]:
    """Rows of the whole model's prefill and greedy decode in transformers, sparse vs dense (the original), and a
    note on how far their greedy tokens agree."""
    from llmopt import patch_model

    length, new_tokens = settings.sparse_generate, settings.decode_tokens
    sparse = patch_model(copy.deepcopy(model), config)
    prompt = heldout_tokens(tokenizer, length).to(next(model.parameters()).device)
    r = generate_speed({"dense": model, "sparse": sparse}, prompt, new_tokens, settings.repeats, settings.warmup)
    reads = decode_reads(config, length + new_tokens // 2)
    rows = [Row(f"whole model in transformers, prefill of {length} tokens", "s", Spread.of(r["dense"]["prefill"]),
                Spread.of(r["sparse"]["prefill"]), ratio(r["dense"]["prefill"], r["sparse"]["prefill"])),
            Row(f"whole model in transformers, greedy decode after it, batch 1, {reads}", "tokens/s",
                Spread.of(r["dense"]["decode"]), Spread.of(r["sparse"]["decode"]),
                ratio(r["sparse"]["decode"], r["dense"]["decode"]))]
    same = [a == b for a, b in zip(r["dense"]["tokens"], r["sparse"]["tokens"])]
    agreement = (f"Greedy tokens after the {length}-token prompt: the sparse model's first "
                 f"{same.index(False) if False in same else len(same)} of {len(same)} equal the dense model's "
                 f"({sum(same)} in all): a small change to the logits can flip a greedy choice, after which the texts "
                 "part; decode perplexity (`llmopt eval --tasks long`) measures the quality.")
    return rows, agreement


def kernel_name(device: torch.device) -> str:
    """Which sparse implementation `llmopt.sparse.attention` dispatches to on `device`."""
    return "Triton" if device.type == "cuda" else "PyTorch"


@torch.no_grad()
def bench_length(qkv: list[QKV], config, repeats: int, warmup: int) -> dict:
    """Seconds (summed over layers) of dense SDPA, selection, selection + sparse; density over the layers and
    per layer; the share of KV heads whose selection took the vertical-slash pattern."""
    from llmopt.sparse.attention import block_sparse
    from llmopt.sparse.selection import select_blocks

    synchronize = torch.cuda.synchronize if qkv[0][0].is_cuda else (lambda: None)

    def dense():
        for q, k, v in qkv:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        synchronize()

    def select():
        selections = [select_blocks(q, k, config) for q, k, _ in qkv]
        synchronize()
        return selections

    def sparse():
        for q, k, v in qkv:
            s = select_blocks(q, k, config)
            block_sparse(q, k, v, s.kv_num_blocks, s.kv_indices, config.block_size, None)
        synchronize()

    selections = select()
    density = sum(s.selected_blocks for s in selections) / sum(s.causal_blocks for s in selections)
    return {**timed_rounds({"dense": dense, "select": select, "sparse": sparse}, repeats, warmup),
            "density": density, "layer_densities": [s.density for s in selections],
            "vertical_slash": sum(float(s.vertical_slash.float().mean()) for s in selections) / len(selections)}


def run(bench) -> SectionResult:
    from llmopt import OptimizationConfig
    from llmopt.models import load_model

    settings = bench.settings
    config = OptimizationConfig.from_yaml(str(bench.recipe_dir / "sparse-attention.yaml")).get("sparse")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(bench.model)
    model.to(device)
    layers = list(settings.sparse_layers)
    tokens = heldout_tokens(tokenizer, max(settings.sparse_lengths)).to(device)
    kernel = kernel_name(device)
    result = SectionResult("sparse", f"Sparse attention ({kernel}, {device.type}) vs dense SDPA")
    measured, decoded = {}, {}
    for length in settings.sparse_lengths:
        bench.progress(f"sparse attention at {length} tokens")
        qkv = capture_qkv(model, tokens[:, :length], layers)
        r = measured[length] = bench_length(qkv, config, settings.repeats, settings.warmup)
        result.rows.append(Row(f"prefill attention, {length} tokens, density {r['density']:.2f}", "ms",
                               Spread.of(r["dense"]).scaled(1e3), Spread.of(r["sparse"]).scaled(1e3),
                               ratio(r["dense"], r["sparse"]), bound=f"1/density {1 / r['density']:.2f}×"))
        if config.decode_pages:
            d = decoded[length] = bench_decode(qkv, config, settings.repeats, settings.warmup)
            result.rows.append(Row(f"decode attention, {length}-token cache, {DECODE_STEPS} steps, density "
                                   f"{d['density']:.2f}", "ms", Spread.of(d["dense"]).scaled(1e3),
                                   Spread.of(d["sparse"]).scaled(1e3), ratio(d["dense"], d["sparse"]),
                                   bound=f"1/density {1 / d['density']:.2f}×"))
    for name in ("dense", "sparse"):
        result.series.append(Series("speed_vs_context", f"attention of {len(layers)} layer(s): {name} ({kernel})",
                                    list(measured), [n / statistics.median(measured[n][name]) for n in measured]))
    selection_share = {n: statistics.median(r["select"]) / statistics.median(r["sparse"]) for n, r in measured.items()}
    result.notes += [
        (f"mass {config.mass}, local blocks {config.local_blocks}, pattern threshold {config.pattern_threshold}, "
        f"block {config.block_size}, layers {layers} of {bench.model} on held-out Wikipedia; ms summed over the "
        f"layers, batch 1, {next(model.parameters()).dtype}."),
        ("Density is the share of causally possible key blocks the selector kept on this text; 1/density is the "
        "speed-up if attention time were proportional to the blocks computed and selection were free."),
        "Selection (estimating block attention from a few query rows per block) takes "
        + ", ".join(f"{share:.0%} at {n}" for n, share in selection_share.items())
        + " of the sparse path's time: the gap to 1/density.",
        "Density per layer (" + ", ".join(map(str, layers)) + "): " + "; ".join(
            f"{n}: " + " ".join(f"{d:.2f}" for d in r["layer_densities"]) for n, r in measured.items())
        + ". KV heads on the vertical-slash pattern: "
        + ", ".join(f"{r['vertical_slash']:.0%} at {n}" for n, r in measured.items()) + ".",
    ]
    bench.progress(f"whole model in transformers: prefill of {settings.sparse_generate} tokens and greedy decode")
    rows, agreement = generate_rows(model, tokenizer, config, settings)
    result.rows += rows
    result.notes.append(agreement)
    if decoded:
        result.notes.append(f"Decode keeps, per KV head, the first page, {config.decode_pages} more pages of "
                            f"{config.decode_page_size} keys (the newest full one and the best-bounded others: "
                            "Quest) and the partial page; its density is the share of the cache's pages read.")
    result.raw = {"config": vars(config), "layers": layers, "kernel": kernel, "lengths": measured,
                  "decode": decoded}
    return result
