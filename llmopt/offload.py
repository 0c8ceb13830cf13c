"""Models larger than the memory given to them: weights that accelerate offloaded (``device_map`` with
``max_memory`` and an offload folder) are brought into memory one module at a time, so that a transform can read,
change and even reshape them, and are written back to the offload folder when it is done.

accelerate keeps an offloaded leaf module's parameters on the meta device and loads them from its hook's
``weights_map`` for each forward pass; the user's own checkpoint files are only ever read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def is_offloaded(module: nn.Module) -> bool:
    """Whether some weight of `module` (or of a submodule) lives in an offload store rather than in memory."""
    return any(_offload_hook(m) is not None for m in module.modules())


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """Within the scope, every offloaded parameter under `module` is a real tensor on its execution device.

    On exit each is written back to its offload store (under its name, with its new shape if a transform changed
    it or replaced the leaf module) and dropped from memory again. A module with nothing offloaded is left as is.
    """
    from accelerate.utils import set_module_tensor_to_device

    leaves = {name: hook for name, m in module.named_modules() if (hook := _offload_hook(m)) is not None}
    for name, hook in leaves.items():
        leaf = module.get_submodule(name)
        for key, _ in leaf.named_parameters(recurse=False):
            set_module_tensor_to_device(leaf, key, hook.execution_device, value=hook.weights_map[key])
        hook.offload = False
    try:
        yield
    finally:
        for name, hook in leaves.items():
            _write_back(module.get_submodule(name), hook)


def _write_back(leaf: nn.Module, hook) -> None:
    from accelerate.hooks import add_hook_to_module
    from accelerate.utils import offload_weight, set_module_tensor_to_device

    if getattr(leaf, "_hf_hook", None) is not hook:  # the transform put a new module in the old one's place
        add_hook_to_module(leaf, hook)
    store = hook.weights_map  # a PrefixedDataset over accelerate's OffloadedWeightsLoader
    for key, param in leaf.named_parameters(recurse=False):
        if param.device.type != "meta":
            offload_weight(param.detach().cpu(), store.prefix + key, store.dataset.save_folder, store.dataset.index)
            set_module_tensor_to_device(leaf, key, "meta")
    hook.offload = True


def _offload_hook(module: nn.Module):
    """The accelerate hook that loads `module`'s own parameters from an offload store, or None."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        if getattr(candidate, "offload", False) and getattr(candidate, "weights_map", None) is not None:
            return candidate
    return None


def peak_resident_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024



def parse_max_memory(text: str) -> dict[str | int, str]:
    """``"cpu=300MiB"`` or ``"0=20GiB,cpu=8GiB"`` → accelerate's ``max_memory`` (GPU indices as ints)."""
    budget: dict[str | int, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, size = item.partition("=")
        if not size or not device:
            raise ValueError(f"--max-memory takes DEVICE=SIZE pairs separated by commas (e.g. cpu=300MiB), "
                             f"got {item!r}")
        budget[int(device) if device.isdigit() else device] = size
    if not budget:
        raise ValueError("--max-memory is empty: give e.g. cpu=300MiB")
    return budget
