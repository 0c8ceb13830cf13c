"""Save and load optimized models; outputs appear only when complete, and nothing is ever overwritten.

A saved model is a Hugging Face directory: config.json (with the record of what was done; a routed model names
llmopt's vLLM architecture there, the original kept in the record), safetensors weights
(extra weights such as routers under their module names), the tokenizer if given, and ``llmopt_report.json``
with the diagnostics. `load_optimized` rebuilds the model from the record and loads every weight strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from llmopt.checkpoint_files import (CheckpointError, check_checkpoint, checkpoint_config, model_config,
                                     weight_files)
from llmopt.interrupts import terminate_as_exit
from llmopt.offload import is_offloaded
from llmopt.patch import diagnostics
from llmopt.record import ORIGINAL_ARCHITECTURES, RECORD_KEY, original_architectures, read_record
from llmopt.transforms import transform_for
from llmopt.vllm_plugin.servable import vllm_architecture

REPORT_FILE = "llmopt_report.json"


def save_optimized(model: nn.Module, out_dir: str | Path, tokenizer=None, *, report: dict | None = None,
                   files: dict[str, bytes] | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face checkpoint at `out_dir`, which must not exist yet.

    ``llmopt_report.json`` holds `report` (default: the transforms' diagnostics); `files` are further files
    (name → content), e.g. plots. Written to a temporary directory first and renamed into place when complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; llmopt never overwrites a model: choose a new --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(out_dir)
    with terminate_as_exit():  # SIGTERM, like Ctrl-C, runs the finally below: no partial directory is left
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-{os.getpid()}-"))
        try:
            # An offloaded model is saved shard by shard, each loaded from the offload folder: keep shards small.
            model.save_pretrained(tmp, **({"max_shard_size": "100MB"} if is_offloaded(model) else {}))
            _name_vllm_architecture(tmp / "config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            report = report if report is not None else {"diagnostics": diagnostics(model)}
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
            for name, content in (files or {}).items():
                (tmp / name).write_bytes(content)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _remove_abandoned_partials(out_dir: Path) -> None:
    """Remove what earlier saves to `out_dir` left when killed outright (SIGKILL, power loss): partial directories
    whose process no longer runs. A save in progress elsewhere keeps its own."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = partial.name.removeprefix(f".{out_dir.name}.partial-").partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _name_vllm_architecture(config_file: Path) -> None:
    """Make config.json name llmopt's vLLM class where the record needs one (see `vllm_architecture`)."""
    data = json.loads(config_file.read_text())
    served = vllm_architecture(read_record(data))
    if served is None:
        return
    data[RECORD_KEY][ORIGINAL_ARCHITECTURES] = original_architectures(data) or data.get("architectures")
    data["architectures"] = [served]
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_optimized(path: str | Path, *, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` saved by `save_optimized` (tokenizer None if none was saved).

    The record is read and validated before any weight: an unknown format version or transform is refused.
    The model is built from its config, each recorded transform rebuilds its structure, and the weights load
    strictly: a missing or unexpected tensor is an error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    raw = checkpoint_config(path)
    record = read_record(raw)
    weight_files(path)  # before the model is built: a missing shard needs no model to be seen
    hf_config = model_config(path)
    hf_config.architectures = original_architectures(raw) or hf_config.architectures
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for _, settings in (record.transforms.items() if record else ()):
        transform_for(settings).apply(model, settings)
    load_weights_strictly(model, check_checkpoint(path, model))
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model.eval(), tokenizer


def load_weights_strictly(model: nn.Module, files: list[Path]) -> None:
    """Load safetensors `files` into `model`; every tensor must match a parameter or buffer, and every parameter
    must be given, except the aliases of tied weights (e.g. ``lm_head.weight``), which are re-tied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file} is corrupt or truncated ({error}); re-save the model") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
               - {name for name, _ in model.named_parameters()})
    missing = [name for name in missing if name not in aliases]
    if missing or unexpected:
        raise CheckpointError(
            "the weights do not match the model the record describes: "
            + (f"missing {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"unexpected {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}" if unexpected
               else "")
            + " (a transform whose apply() does not rebuild what calibrate() made, or a damaged checkpoint)")

