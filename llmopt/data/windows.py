"""Text into fixed-length token windows, the unit of calibration and of perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def token_windows(texts: list[str], tokenizer, seq_len: int, max_windows: int | None = None,
                  spread: bool = False) -> torch.Tensor:
    """Documents joined by EOS, tokenized and cut into non-overlapping windows: the first `max_windows` of them,
    or with ``spread`` that many evenly spaced over all of the text (a held-out split scored across its
    documents, not on its first one).

    Returns a LongTensor ``[n, seq_len]``; the ragged tail is dropped. Raises if not even one window fits.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    needed = None if max_windows is None or spread else max_windows * seq_len
    for text in texts:
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        if needed is not None and len(ids) >= needed:
            break
    available = len(ids) // seq_len
    if available == 0:
        raise ValueError(
            f"the text holds {len(ids)} tokens, fewer than one window of {seq_len}: give more text or a shorter seq_len"
        )
    windows = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    if max_windows is None or max_windows >= available:
        return windows
    if spread:
        return windows[torch.linspace(0, available - 1, max_windows).round().long()]
    return windows[:max_windows]


def read_texts(path: str | Path) -> list[str]:
    """User text: a ``.jsonl`` file (one ``{"text": ...}`` per line), a text file, or a folder of ``.txt`` files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt")) + sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path} holds no .txt or .jsonl files")
        return [text for file in files for text in read_texts(file)]
    if not path.is_file():
        raise FileNotFoundError(f"no such text file or folder: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{number}: each JSON line needs a 'text' field")
                texts.append(record["text"])
        return texts
    return [path.read_text()]
