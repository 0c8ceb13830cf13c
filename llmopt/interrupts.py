"""SIGTERM as an exception, so that `finally` blocks run (temporary outputs removed) when a run is stopped the way
schedulers and `kill` stop it, as they already do on Ctrl-C (SIGINT raises KeyboardInterrupt)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(TERMINATED_EXIT_CODE)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside, SIGTERM raises ``SystemExit(143)``; the previous handler comes back after. A no-op outside the main
    thread (only it receives signals) or where a handler of the caller's is already installed."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _exit):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
