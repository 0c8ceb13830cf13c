"""llmopt: make pretrained LLMs cheaper to serve, and measure what it costs in accuracy."""

from llmopt.checkpoint import load_optimized, save_optimized
from llmopt.config import OptimizationConfig
from llmopt.kv.config import HealingConfig, KVCompressionConfig, LayerHealingConfig
from llmopt.paths import cache_dir
from llmopt.patch import patch_model
from llmopt.routing.config import TokenRoutingConfig
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.transforms import register_transform

__version__ = "0.1.0"
__all__ = [
    "HealingConfig",
    "KVCompressionConfig",
    "LayerHealingConfig",
    "OptimizationConfig",
    "SparseAttentionConfig",
    "TokenRoutingConfig",
    "cache_dir",
    "load_optimized",
    "patch_model",
    "register_transform",
    "save_optimized",
]
