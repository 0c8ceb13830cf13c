"""vLLM's CPU attention with llmopt's block-sparse prefill and sparse decode, for models whose record asks for it.

Registered in place of ``CPU_ATTN`` (the CPU platform ignores a CUSTOM backend), so it runs for every model
served while the plugin is loaded; for a model without a ``sparse`` record it is vLLM's backend unchanged.
For a sparse model, each step's requests split three ways:

- sparse prefill: a chunk (query length > 1) whose context, earlier chunks and cached prefix included, holds at
  least ``min_seq_len`` tokens. Its K/V are read back from the paged cache (vLLM writes the step's K/V before
  attention runs) and its queries, the last ones of the context, attend to the blocks llmopt's selector keeps
  (`sparse_chunk_attention`: the torch path). A prompt attended in one step is exactly the transformers model's
  sparse prefill; so is a chunked one, wherever chunks start on a sparse block boundary.
- sparse decode, where the record sets `decode_pages`: a decode token whose context holds at least
  ``min_seq_len`` tokens and whose pages read are at most ``decode_max_density`` of its pages
  (`SparseAttentionConfig.decodes_sparse`), through `paged_sparse_decode`: the pages transformers' sparse decode
  chooses, read from the paged cache, with per-page key bounds kept beside it.
- dense: the other decode steps and shorter prefills, through vLLM's C++ kernel over the other requests only.

Neither sparse path runs below its crossover, the context length from which it beats vLLM's kernel on this machine
(`llmopt.vllm_plugin.crossover`: calibrated by ``llmopt bench``, or set in the recipe).

Chunked prefill and prefix caching stay on: a later chunk, or the suffix after a cached prefix, attends to the
earlier KV through the cache like any other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionLayer, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from llmopt.kv.config import kv_heads_per_layer
from llmopt.record import read_record
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.vllm_plugin.crossover import describe, load_crossover
from llmopt.vllm_plugin.paged_decode import PagedKeyBounds, paged_sparse_decode
from llmopt.vllm_plugin.paged_kv import LAYOUT_ISAS
from llmopt.vllm_plugin.servable import split_query_groups
from llmopt.vllm_plugin.sparse_chunk import paged_sparse_prefill

logger = init_logger(__name__)


def sparse_config(vllm_config: VllmConfig) -> SparseAttentionConfig | None:
    """The served model's sparse attention settings, from the llmopt record in its config.json (None: dense)."""
    model_config = vllm_config.model_config
    record = read_record(model_config.hf_config) if model_config is not None else None
    return record.get("sparse") if record is not None else None


@dataclass
class SparseRow:
    """One request attended sparsely: its query tokens ``[start, stop)`` of the flat batch, its context length
    (cached and new tokens) and its row of the block table."""

    start: int
    stop: int
    seq_len: int
    blocks: torch.Tensor


@dataclass
class DecodeRows:
    """The decode tokens attended sparsely: their indices in the flat batch, context lengths and block tables."""

    tokens: torch.Tensor  # [R]
    seq_lens: torch.Tensor  # [R]
    block_table: torch.Tensor  # [R, W]


@dataclass
class SparsePlan:
    """A step's split: the sparse prefill rows and decode tokens, and the other requests' tokens with their own
    dense metadata."""

    config: SparseAttentionConfig
    rows: list[SparseRow]
    decode: DecodeRows | None
    dense_tokens: torch.Tensor  # [n] indices into the flat batch
    dense: CPUAttentionMetadata | None


@dataclass
class SparseCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's metadata for the whole batch (used as is when a layer runs dense), plus this step's plan."""

    plan: SparsePlan | None = None


class SparseCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = None
        if not (self.is_cross_attention or self.is_encoder_only_attention):
            config = sparse_config(vllm_config)
        if config is not None and self.isa not in LAYOUT_ISAS:
            logger.warning("llmopt sparse attention: the %s kernel's KV cache layout is not supported (only %s); "
                           "attention runs dense", self.isa, ", ".join(LAYOUT_ISAS))
            config = None
        if config is not None:
            hf_config = vllm_config.model_config.hf_config
            split = split_query_groups(read_record(hf_config), kv_heads_per_layer(hf_config),
                                       vllm_config.parallel_config.tensor_parallel_size)
            if split:
                raise ValueError(f"llmopt: {split}")
        self.sparse = config
        self.decode_pages = config.decode_pages if config is not None else 0
        if self.decode_pages and self.block_size % config.decode_page_size:
            logger.warning("llmopt sparse attention: vLLM's block size %d is not a multiple of the sparse page size "
                           "%d; decode runs dense", self.block_size, config.decode_page_size)
            self.decode_pages = 0
        self.prefill_from = self.decode_from = math.inf  # context tokens from which a request runs sparse
        if config is not None:
            crossover = load_crossover(str(vllm_config.model_config.dtype).removeprefix("torch."))
            prefill = config.vllm_prefill_from if config.vllm_prefill_from is not None else crossover.prefill_from
            decode = config.vllm_decode_from if config.vllm_decode_from is not None else crossover.decode_from
            self.prefill_from = max(config.min_seq_len, prefill) if prefill is not None else math.inf
            self.decode_from = decode if decode is not None else math.inf  # decodes_sparse: min_seq_len
            logger.info_once("llmopt sparse attention: crossover %s (%s); recipe: prefill from %s, decode from %s; "
                             "runs sparse: prefill from %s, decode from %s tokens", describe(crossover),
                             crossover.source, config.vllm_prefill_from, config.vllm_decode_from, self.prefill_from,
                             self.decode_from)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseCPUAttentionMetadata:
        whole = super().build(common_prefix_len, common_attn_metadata, fast_build)
        plan = (self._plan(self.sparse, common_prefix_len, common_attn_metadata) if self.sparse is not None
                else None)
        return SparseCPUAttentionMetadata(**vars(whole), plan=plan)

    def _plan(self, config: SparseAttentionConfig, common_prefix_len: int,
              common: CommonAttentionMetadata) -> SparsePlan | None:
        """Which requests of the step run sparse (None: none does)."""
        starts = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens.cpu().tolist()
        requests = range(common.num_reqs)
        prefill = [i for i in requests if starts[i + 1] - starts[i] > 1 and seq_lens[i] >= self.prefill_from]
        decode = [i for i in requests if starts[i + 1] - starts[i] == 1 and self.decode_pages
                  and seq_lens[i] >= self.decode_from and config.decodes_sparse(seq_lens[i])]
        if not prefill and not decode:
            return None
        rows = [SparseRow(starts[i], starts[i + 1], seq_lens[i], common.block_table_tensor[i]) for i in prefill]
        decoding = None
        if decode:
            index = torch.tensor(decode, dtype=torch.long)
            decoding = DecodeRows(torch.tensor([starts[i] for i in decode], dtype=torch.long),
                                  torch.tensor([seq_lens[i] for i in decode], dtype=torch.long),
                                  common.block_table_tensor[index])
        sparse = set(prefill) | set(decode)
        dense = [i for i in range(common.num_reqs) if i not in sparse]
        tokens = [t for i in dense for t in range(starts[i], starts[i + 1])]
        return SparsePlan(config, rows, decoding, torch.tensor(tokens, dtype=torch.long),
                          self._dense_metadata(common_prefix_len, common, dense) if dense else None)

    def _dense_metadata(self, common_prefix_len: int, common: CommonAttentionMetadata,
                        requests: list[int]) -> CPUAttentionMetadata:
        """vLLM's metadata for `requests` alone, their tokens packed in batch order."""
        index = torch.tensor(requests, dtype=torch.long)
        query_lens = common.query_start_loc_cpu.diff()[index]
        query_start_loc = torch.nn.functional.pad(query_lens.cumsum(0), (1, 0)).to(common.query_start_loc.dtype)
        seq_lens = common.seq_lens[index.to(common.seq_lens.device)]
        subset = dataclasses.replace(
            common, query_start_loc=query_start_loc.to(common.query_start_loc.device),
            query_start_loc_cpu=query_start_loc, seq_lens=seq_lens, num_reqs=len(requests),
            num_actual_tokens=int(query_lens.sum()), max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()), block_table_tensor=common.block_table_tensor[index],
            slot_mapping=common.slot_mapping[:0])
        return super().build(common_prefix_len, subset)


class SparseCPUAttentionImpl(CPUAttentionBackendImpl):
    bounds: PagedKeyBounds | None = None  # this layer's page key bounds, once a sparse decode needed them

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: CPUAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query ``[T, H, D]``, key/value ``[T, Hkv, D]`` (already in `kv_cache`) → output ``[T, H, D]``."""
        plan = getattr(attn_metadata, "plan", None)
        if self.bounds is not None and attn_metadata is not None:
            self.bounds.invalidate(attn_metadata.slot_mapping[:attn_metadata.num_actual_tokens])
        if plan is None or not self._can_be_sparse() or output_scale is not None or output_block_scale is not None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if plan.dense is not None:
            tokens = plan.dense_tokens
            dense_output = output.new_empty((len(tokens), *output.shape[1:]))
            super().forward(layer, query[tokens], key[tokens], value[tokens], kv_cache, plan.dense, dense_output)
            output.index_copy_(0, tokens, dense_output)
        for row in plan.rows:
            output[row.start:row.stop] = self._sparse_prefill(query[row.start:row.stop], kv_cache, row,
                                                              plan.config)
        if plan.decode is not None:
            output[plan.decode.tokens] = self._sparse_decode(query[plan.decode.tokens], kv_cache, plan.decode,
                                                             plan.config)
        return output

    def _can_be_sparse(self) -> bool:
        """A plain causal decoder layer: what llmopt's sparse path computes."""
        return (self.attn_type == AttentionType.DECODER and self.sliding_window == -1 and self.alibi_slopes is None
                and self.sinks is None and not self.logits_soft_cap and not self.is_fp8_kv_cache)

    def _sparse_prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, row: SparseRow,
                        config: SparseAttentionConfig) -> torch.Tensor:
        """query ``[Lq, H, D]``, the last Lq positions of the row's context → output ``[Lq, H, D]``."""
        return paged_sparse_prefill(query, kv_cache, row.blocks, row.seq_len, config, self.scale)

    def _sparse_decode(self, query: torch.Tensor, kv_cache: torch.Tensor, rows: DecodeRows,
                       config: SparseAttentionConfig) -> torch.Tensor:
        """query ``[R, H, D]``, one decode token per request → output ``[R, H, D]``."""
        if self.bounds is None or not self.bounds.covers(kv_cache):
            self.bounds = PagedKeyBounds(kv_cache, config.decode_page_size)
        return paged_sparse_decode(query, kv_cache, rows.block_table, rows.seq_lens, self.bounds,
                                   config.decode_pages, self.scale)


class SparseCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with sparse prefill and decode for llmopt sparse models (`get_name` keeps the stock name)."""

    @staticmethod
    def get_impl_cls() -> type[SparseCPUAttentionImpl]:
        return SparseCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseCPUAttentionMetadataBuilder]:
        return SparseCPUAttentionMetadataBuilder
