"""What the kernel tests share: running a kernel on CPU under TRITON_INTERPRET=1, compiling it for an H100
without one, and the GPU gate. Both run in a worker process: triton reads TRITON_INTERPRET when it is imported
(its own tl functions are jitted then), not later in the test process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

H100_SHARED_BYTES = 232448  # 227 KiB of opt-in shared memory per block on sm_90

RUN = r"""
import importlib, sys, torch
kernel = importlib.import_module(sys.argv[1])
kernel._FILL_NAN = True
cases = torch.load(sys.argv[3])
torch.save({name: getattr(kernel, sys.argv[2])(**call) for name, call in cases.items()}, sys.argv[4])
"""

COMPILE_SM90 = r"""
import importlib, json, sys
try:
    import triton.backends.nvidia.compiler  # noqa: F401
except ImportError as error:
    print(json.dumps({"skip": f"triton's CUDA backend does not import: {error}"}))
    sys.exit()
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
shared = {}
for name, variant in spec["variants"].items():
    constexprs = variant["constexprs"]
    signature = {arg: "constexpr" if arg in constexprs else spec["pointers"].get(arg, "*" + variant["dtype"])
                 if arg.endswith("_ptr") else "fp32" if arg == "qk_scale" else "i32" for arg in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=variant["options"])
    shared[name] = compiled.metadata.shared
print(json.dumps({"shared": shared}))
"""


def _worker(script: str, *args: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def run_interpreted(module: str, function: str, cases: dict[str, dict], folder: Path) -> dict[str, torch.Tensor]:
    """name → output of ``module.function(**call)`` for each case, with the module's `_FILL_NAN` set so that
    output the kernel never writes shows up as NaN."""
    torch.save(cases, folder / "inputs.pt")
    _worker(RUN, module, function, str(folder / "inputs.pt"), str(folder / "outputs.pt"),
            env=os.environ | {"TRITON_INTERPRET": "1"}, timeout=600)
    return torch.load(folder / "outputs.pt")


def sm90_shared_memory(module: str, kernel: str, pointers: dict[str, str], variants: dict[str, dict]) -> dict:
    """name → shared memory bytes of each variant (``{"dtype", "constexprs", "options"}``) of ``module.kernel``
    compiled for sm_90 (non-float pointers typed by `pointers`); skips the test where triton has no CUDA
    backend."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    spec = {"module": module, "kernel": kernel, "pointers": pointers, "variants": variants}
    run = _worker(COMPILE_SM90, json.dumps(spec), env=env | {"TRITON_DEFAULT_FP_FUSION": "1"}, timeout=300)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["shared"]


def gpu_capability_at_least(major: int) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (major, 0)
