"""Which recorded transforms vLLM can serve: vanilla ones with no llmopt code, the rest through this plugin."""

from __future__ import annotations

from typing import Any

from llmopt.config import ConfigError, OptimizationConfig
from llmopt.transforms import transform_for
from llmopt.vllm_plugin import PER_LAYER_KV_ARCHITECTURE, ROUTED_ARCHITECTURE


def served_by_plugin(cpu: bool) -> tuple[str, ...]:
    """The transforms that need code inside vLLM and that this plugin provides, on a CPU or a GPU build of vLLM
    (both run on vLLM's CPU attention backend; the CUDA side has not landed)."""
    return ("kv", "routing", "sparse") if cpu else ("kv",)


def vllm_architecture(record: OptimizationConfig | None) -> str | None:
    """The architecture a checkpoint with `record` must name in its config.json so that vLLM runs llmopt's model
    class (routing: stock vLLM would load the Llama and ignore the routers; KV heads per layer: stock vLLM would
    build every layer with the config's count); None: the original one serves."""
    if record is not None and record.get("routing") is not None:
        return ROUTED_ARCHITECTURE
    kv = record.get("kv") if record is not None else None
    return PER_LAYER_KV_ARCHITECTURE if kv is not None and not _vanilla(kv) else None


def needs_plugin(record: OptimizationConfig | None) -> list[str]:
    """The transforms of `record` that are not vanilla, i.e. that stock vLLM would silently ignore."""
    return [name for name, settings in (record.transforms.items() if record else ()) if not _vanilla(settings)]


def unservable(record: OptimizationConfig | None, cpu: bool) -> list[str]:
    """The transforms of `record` that this vLLM cannot serve, even with this plugin."""
    refused = [name for name in needs_plugin(record) if name not in served_by_plugin(cpu)]
    routing = record.get("routing") if record is not None else None
    if routing is not None and routing.features == FTP and "routing" not in refused:
        refused.append(FTP_REFUSAL)
    return refused


def split_query_groups(record: OptimizationConfig | None, layer_kv_heads: list[int],
                       tensor_parallel_size: int) -> str | None:
    """Why a sparse checkpoint cannot run over `tensor_parallel_size` workers, or None. Sparse attention chooses
    blocks and pages per KV head from all the query heads of its group; a layer with fewer KV heads than workers
    has each replicated, its group split across workers, and each worker would choose from part of the group,
    unlike one process. `layer_kv_heads`: each layer's count (`llmopt.kv.config.kv_heads_per_layer`)."""
    fewest = min(layer_kv_heads)
    if record is None or record.get("sparse") is None or tensor_parallel_size <= fewest:
        return None
    return (f"sparse attention over {tensor_parallel_size} tensor-parallel workers: a layer with {fewest} KV "
            f"head(s) would split each head's query group across workers, and each would choose the blocks to "
            f"attend from part of the group, unlike one process. Serve with --tensor-parallel-size at most "
            f"{fewest}.")


FTP, FTP_REFUSAL = "ftp", ("routing on FTP features (attention mass: vLLM's attention kernels do not return "
                           "attention probabilities; serve a router trained on features: residual)")


def _vanilla(settings: Any) -> bool:
    try:
        return transform_for(settings).is_vanilla(settings)
    except ConfigError:  # its code is not in this installation (a transform that has not landed)
        return False
