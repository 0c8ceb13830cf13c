"""Run a Triton kernel on CPU under TRITON_INTERPRET=1, in a worker process: triton reads the variable when it is
imported (its own tl functions are jitted then), not later in the test process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

RUN = r"""
import importlib, sys, torch
kernel = importlib.import_module(sys.argv[1])
kernel._FILL_NAN = True
cases = torch.load(sys.argv[3])
torch.save({name: getattr(kernel, sys.argv[2])(**call) for name, call in cases.items()}, sys.argv[4])
"""


def run_interpreted(module: str, function: str, cases: dict[str, dict], folder: Path) -> dict[str, torch.Tensor]:
    """name → output of ``module.function(**call)`` for each case, with the module's `_FILL_NAN` set so that
    output the kernel never writes shows up as NaN."""
    torch.save(cases, folder / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", RUN, module, function, folder / "inputs.pt", folder / "outputs.pt"],
                         env=os.environ | {"TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(folder / "outputs.pt")
