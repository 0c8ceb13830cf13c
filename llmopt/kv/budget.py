"""KV heads per layer under an accuracy budget (`llmopt.budget`'s search, with KV bytes as the saving).

Every layer has been folded once (the calibrated fold, all layers). Sensitivity: the KL of the final logits to the
original on the search windows with only that layer's folded attention spliced into the original model. The
greedy path then takes layers in order of KL per byte saved, and is walked as far as the perplexity ratio − 1 on
the search windows stays within `max_loss`; the chosen model is verified on windows the search never saw.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmopt.arch import ArchAdapter, AttentionShape
from llmopt.budget import Ladder, greedy_path, longest_within
from llmopt.distill import kl_divergence
from llmopt.eval.perplexity import perplexity

BATCH = 4
BYTES_PER_ELEMENT = 2  # the report's bf16 KV cache, as `model_costs`


def perplexity_loss(model: nn.Module, windows: torch.Tensor, original_perplexity: float) -> float:
    """Perplexity ratio − 1 of `model` against the original's perplexity on the same ``windows [n, seq_len]``."""
    return perplexity(model, windows, BATCH, progress=False) / original_perplexity - 1


@torch.no_grad()
def splice_sensitivity(model: nn.Module, layers: list[nn.Module], attention: str, originals: list[nn.Module],
                       changed: list[nn.Module], windows: torch.Tensor) -> list[float]:
    """``[n_layers]``: KL(original ‖ original with only layer l's attention `changed`) of the final logits on
    ``windows [n, seq_len]``, float64; the layers hold `originals` on return."""
    device = next(model.parameters()).device
    set_attention(layers, attention, originals)
    totals = [0.0] * len(layers)
    batches = windows.split(BATCH)
    bar = tqdm(total=len(batches) * sum(m is not o for m, o in zip(changed, originals)),
               desc="budget: layer sensitivity", unit="pass")
    for batch in batches:
        batch = batch.to(device)
        reference = model(input_ids=batch, use_cache=False).logits
        for index, (layer, module) in enumerate(zip(layers, changed)):
            if module is originals[index]:
                continue
            setattr(layer, attention, module)
            logits = model(input_ids=batch, use_cache=False).logits
            setattr(layer, attention, originals[index])
            totals[index] += kl_divergence(logits, reference).double().item() * len(batch)
            bar.update()
    bar.close()
    return [total / len(windows) for total in totals]


def set_attention(layers: list[nn.Module], attention: str, modules: list[nn.Module]) -> None:
    for layer, module in zip(layers, modules):
        setattr(layer, attention, module)


def spend_budget(model: nn.Module, adapter: ArchAdapter, originals: list[nn.Module], shape: AttentionShape,
                 targets: list[int], max_loss: float, search: torch.Tensor,
                 verify: torch.Tensor) -> tuple[list[int], dict]:
    """Keep each layer's folded attention (now in `model`, with `targets` KV heads) or its original, the cheapest
    mix whose perplexity ratio − 1 on ``search [n, seq_len]`` is within `max_loss`; leaves that mix in `model`.

    Returns the per-layer KV head counts and the report: sensitivity per layer, the losses measured on the path,
    the chosen loss on `search`, the verified loss on ``verify`` (never searched) and the KV saving."""
    started = time.perf_counter()
    layers = list(adapter.decoder_layers(model))
    folded = adapter.attention_modules(model)
    num_kv_heads, head_bytes = shape.num_kv_heads, 2 * shape.head_dim * BYTES_PER_ELEMENT
    changed = [module if target < num_kv_heads else original
               for module, original, target in zip(folded, originals, targets)]
    sensitivity = splice_sensitivity(model, layers, adapter.attention, originals, changed, search)
    ladders = [Ladder((0.0, float((num_kv_heads - target) * head_bytes)), (0.0, kl)) if target < num_kv_heads
               else Ladder((0.0,), (0.0,)) for target, kl in zip(targets, sensitivity)]
    path = list(greedy_path(ladders))

    def chosen(rungs: list[int]) -> list[nn.Module]:
        return [changed[index] if rung else originals[index] for index, rung in enumerate(rungs)]

    def search_loss(rungs: list[int]) -> float:
        set_attention(layers, adapter.attention, chosen(rungs))
        loss = perplexity_loss(model, search, original_search)
        print(f"[budget] {sum(rungs)} of {len(rungs)} layers folded: loss {loss:.4f} on the search windows "
              f"(budget {max_loss:g})", file=sys.stderr, flush=True)
        return loss

    set_attention(layers, adapter.attention, originals)
    original_search, original_verify = (perplexity(model, windows, BATCH, progress=False)
                                        for windows in (search, verify))
    try:
        step, measured = longest_within(path, search_loss, max_loss)
    except BaseException:
        set_attention(layers, adapter.attention, folded)
        raise
    rungs = path[step]
    set_attention(layers, adapter.attention, chosen(rungs))
    verified = perplexity_loss(model, verify, original_verify)
    heads = [target if rung else num_kv_heads for target, rung in zip(targets, rungs)]
    if verified > max_loss:
        warnings.warn(f"kv.max_loss = {max_loss:g}: the chosen layers lose {verified:.4f} on the verification "
                      f"windows (search windows: {measured[step]:.4f}); give more search_tokens, or a lower budget",
                      stacklevel=3)
    report = {
        "max_loss": max_loss,
        "sensitivity_kl": [round(kl, 5) for kl in sensitivity],
        "path_losses": {str(index + 1): round(loss, 4) for index, loss in sorted(measured.items())},
        "compressed_layers": [index for index, rung in enumerate(rungs) if rung],
        "search_loss": round(measured[step], 4),
        "verified_loss": round(verified, 4),
        "within_budget": verified <= max_loss,
        "kv_ratio": round(num_kv_heads * len(heads) / sum(heads), 4),
        "search_windows": len(search),
        "verify_windows": len(verify),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return heads, report
