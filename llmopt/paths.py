"""Where llmopt keeps what it provisions: models, packaged data, built eval tasks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The per-user cache: ``$LLMOPT_CACHE``, else ``$XDG_CACHE_HOME/llmopt``, else ``~/.cache/llmopt``."""
    if os.environ.get("LLMOPT_CACHE"):
        return Path(os.environ["LLMOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmopt"
