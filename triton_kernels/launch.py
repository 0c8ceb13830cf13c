"""What every kernel checks and sets up around a launch: one supported dtype for its tensors, int32 index tensors
of the right shape, all inputs on one CUDA device (any device under the interpreter), and that device current."""

import contextlib

import torch
import triton


def interpreted(kernel) -> bool:
    """Whether `kernel` runs under ``TRITON_INTERPRET=1`` (read by triton when it was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtypes(names: str, *tensors: torch.Tensor) -> None:
    """`tensors` (called `names` in the message, e.g. "q, k, v") share one dtype of `DTYPES`."""
    if tensors[0].dtype not in DTYPES or any(t.dtype != tensors[0].dtype for t in tensors):
        raise ValueError(f"{names} must share one dtype of float16, bfloat16, float32; got "
                         f"{', '.join(str(t.dtype) for t in tensors)}")


def check_index(name: str, index: torch.Tensor, shape: tuple[int, ...]) -> None:
    if index.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {index.dtype}")
    if tuple(index.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(index.shape)}")


def check_devices(kernel, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if devices.pop().type != "cuda" and not interpreted(kernel):
        raise ValueError("the Triton kernel needs CUDA tensors (on CPU: TRITON_INTERPRET=1 before importing)")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the inputs' one (layers spread over GPUs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
