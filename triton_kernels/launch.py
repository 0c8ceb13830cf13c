"""What every kernel checks and sets up around a launch: int32 index tensors of the right shape, all inputs on
one CUDA device (any device under the interpreter), and that device made current."""

import contextlib

import torch
import triton


def interpreted(kernel) -> bool:
    """Whether `kernel` runs under ``TRITON_INTERPRET=1`` (read by triton when it was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


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
