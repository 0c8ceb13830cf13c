"""One way to name a model everywhere: an embedded name, a local HF directory, or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from llmopt.models.default import DEFAULT_MODEL, MHA_TWIN, default_model_dir

EMBEDDED = (DEFAULT_MODEL, MHA_TWIN)


def resolve_model(name_or_path: str) -> str:
    """A path or hub id that ``from_pretrained`` accepts; embedded names are provisioned into the cache."""
    if name_or_path in EMBEDDED:
        return str(default_model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path  # a hub id; needs network
    raise FileNotFoundError(
        f"no model {name_or_path!r}: give an embedded name ({', '.join(EMBEDDED)}), a local HF directory, or a hub id"
    )


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device_map: str | None = None,
               max_memory: dict[str | int, str] | None = None, offload_folder: str | Path | None = None):
    """Load ``(model, tokenizer)`` in eval mode. With `max_memory` (e.g. ``{"cpu": "300MiB"}``) the weights that
    do not fit are offloaded to `offload_folder` (accelerate, ``device_map="auto"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    if max_memory is not None:
        if offload_folder is None:
            raise ValueError("max_memory needs an offload_folder for the weights that do not fit")
        device_map = device_map or "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                                     offload_folder=offload_folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load a causal LM from {source}: {error}") from error
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.eval(), tokenizer
