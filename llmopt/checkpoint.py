"""Save and load optimized models; outputs appear only when complete, and nothing is ever overwritten."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from llmopt.record import read_record


def save_optimized(model: nn.Module, out_dir: str | Path, tokenizer=None,
                   extras: dict[str, bytes] | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face checkpoint at `out_dir`, which must not exist yet.

    `extras` are further files (name → content), e.g. a report, written into the same directory.
    KV-compressed models are vanilla checkpoints: transformers and vLLM load them with no llmopt code.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; llmopt never overwrites a model: choose a new --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extras or {}).items():
            (tmp / name).write_bytes(content)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_optimized(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` saved by `save_optimized`; a corrupt or partial checkpoint raises clearly."""
    from llmopt.models import load_model

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved model (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"{path} holds no weights (*.safetensors): the checkpoint is incomplete")
    model, tokenizer = load_model(str(path), dtype=dtype)
    record = read_record(model)
    if record is not None and record.get("version") != 1:
        raise ValueError(f"{path} was written by a newer llmopt (record version {record.get('version')})")
    return model, tokenizer
