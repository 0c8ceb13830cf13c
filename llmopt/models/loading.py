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


def checked_source(name_or_path: str) -> str:
    """`resolve_model`, and for a local directory `check_checkpoint`: a damaged checkpoint is refused, naming the
    file and what is wrong, before anything loads."""
    from llmopt.checkpoint_files import check_checkpoint

    source = resolve_model(name_or_path)
    if Path(source).is_dir():
        check_checkpoint(source)
    return source


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device_map: str | None = None,
               max_memory: dict[str | int, str] | None = None, offload_folder: str | Path | None = None):
    """Load ``(model, tokenizer)`` in eval mode. With `max_memory` (e.g. ``{"cpu": "300MiB"}``) the weights that
    do not fit are offloaded to `offload_folder` (accelerate, ``device_map="auto"``).

    A checkpoint saved by llmopt whose transforms change the model's structure (routing, sparse attention) loads
    through `load_optimized`, so it runs as saved: ``from_pretrained`` would build the plain architecture and run
    it dense."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = checked_source(name_or_path)
    structural = structural_transforms(source)
    if structural:
        return _load_structural(source, structural, dtype, device_map, max_memory)
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


def structural_transforms(source: str) -> list[str]:
    """The transforms of an llmopt checkpoint in the directory `source` that are not vanilla (empty for anything
    else: a plain or KV-compressed model, a hub id)."""
    from llmopt.checkpoint_files import checkpoint_config
    from llmopt.record import read_record
    from llmopt.transforms import transform_for

    record = read_record(checkpoint_config(source)) if (Path(source) / "config.json").is_file() else None
    return [name for name, settings in (record.transforms.items() if record else ())
            if not transform_for(settings).is_vanilla(settings)]


def _load_structural(source: str, transforms: list[str], dtype: torch.dtype, device_map: str | None,
                     max_memory: dict | None):
    from llmopt.checkpoint import load_optimized

    if device_map is not None or max_memory is not None:
        raise ValueError(f"{source} is an llmopt checkpoint with {', '.join(transforms)}: it loads whole into "
                         "memory (load_optimized); drop device_map / max_memory")
    model, tokenizer = load_optimized(source, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{source} has no tokenizer; save the model with its tokenizer (save_optimized(model, path, "
                         "tokenizer))")
    return model, tokenizer
