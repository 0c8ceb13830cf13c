"""Is a checkpoint directory whole? Checked from config.json and the safetensors headers alone, before any weight
is read, by every command that loads one: a damaged checkpoint is an error naming the file and what is wrong.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor → dtype, shape, byte offsets
into the data that follows) and the data; so a truncated file, a shard an index names but that is missing, or a
tensor whose shape disagrees with config.json shows without loading anything.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch.nn as nn

from llmopt.errors import ConfigError

INDEX_FILE = "model.safetensors.index.json"
HEADER_LENGTH_BYTES = 8


class CheckpointError(ValueError):
    """A directory that is not a complete, readable llmopt/HF checkpoint; the message says what is wrong."""


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """config.json of the checkpoint at `path`, its llmopt record (if any) validated."""
    from llmopt.record import read_record

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a saved model (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is corrupt (not JSON: {error}); re-save the model") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file} is corrupt (a JSON {type(raw).__name__}, not a mapping)")
    try:
        read_record(raw)
    except ConfigError as error:
        raise CheckpointError(f"{config_file}: {error} (saved by another llmopt version? load it with that "
                              "version, or calibrate again with this one)") from None
    return raw


def model_config(path: str | Path):
    """The transformers config of the checkpoint at `path`; one transformers cannot read is a CheckpointError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{Path(path) / 'config.json'} is not a model config transformers can read: "
                              f"{error}") from None


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of the checkpoint at `path`: the shards its index names (each must exist), else
    every ``*.safetensors``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is corrupt (not a JSON index with a weight_map: {error!r})") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                  f"not in {path}: the checkpoint is incomplete; copy the missing shards or re-save")
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights: the checkpoint is incomplete (llmopt loads "
                              "safetensors only, never pickled .bin files)")
    return files


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from the header of safetensors `file`; a file too short for what its header
    describes, or with no readable header, is a CheckpointError."""
    size = file.stat().st_size
    if size < HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{file} is truncated ({size} bytes, not even a safetensors header); re-save the model "
                              "or copy the file again")
    with file.open("rb") as handle:
        (header_bytes,) = struct.unpack("<Q", handle.read(HEADER_LENGTH_BYTES))
        if HEADER_LENGTH_BYTES + header_bytes > size:
            raise CheckpointError(f"{file} is truncated or not a safetensors file: its header claims {header_bytes:,} "
                                  f"bytes, the file has {size:,}; re-save the model or copy the file again")
        try:
            header = json.loads(handle.read(header_bytes))
            header.pop("__metadata__", None)
            shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
            data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError) as error:
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header: {error!r})") from None
    data_bytes = size - HEADER_LENGTH_BYTES - header_bytes
    if data_end > data_bytes:
        raise CheckpointError(f"{file} is truncated: its tensors need {data_end:,} bytes of data, the file holds "
                              f"{data_bytes:,}; re-save the model or copy the file again")
    return shapes


def check_checkpoint(path: str | Path, model: nn.Module | None = None) -> list[Path]:
    """Refuse a damaged checkpoint at `path` before any weight is read; return its weight files.

    Checks config.json (JSON, a record this llmopt reads), the weight files (the index's shards present, each
    file as long as its header says) and every tensor's shape against `model` (default: the model config.json
    describes, built on the meta device: no memory, no time) where both have it; names only one side has are
    left to the loader, which knows the family's conventions.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    checkpoint_config(path)
    files = weight_files(path)
    shapes = {name: (file, shape) for file in files for name, shape in tensor_shapes(file).items()}
    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(path))
    expected = model.state_dict()
    wrong = [(name, file, shape, tuple(expected[name].shape)) for name, (file, shape) in shapes.items()
             if name in expected and shape != tuple(expected[name].shape)]
    if wrong:
        name, file, shape, wanted = wrong[0]
        raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, but {path / 'config.json'} describes "
                              f"{list(wanted)}" + (f" ({len(wrong)} tensors disagree)" if len(wrong) > 1 else "")
                              + ": the weights and config.json are of different models; re-save the model")
    return files
