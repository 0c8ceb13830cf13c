"""Calibration data as the transforms take it: texts, or token windows a caller already made."""

from __future__ import annotations

from typing import Union

import torch

from llmopt.data.windows import token_windows

CalibrationData = Union[list[str], torch.Tensor, None]


def calibration_windows(calibration: CalibrationData, tokenizer, seq_len: int, tokens: int,
                        minimum_tokens: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` windows holding `tokens` tokens of calibration text (fewer is an error that says why)."""
    if calibration is None:
        raise ValueError("this transform calibrates on text: pass calibration=[...texts...] (or token windows) "
                         "to patch_model, or use the CLI, which takes packaged Wikipedia/news text by default")
    count = max(tokens // seq_len, 1)
    if isinstance(calibration, torch.Tensor):
        windows = calibration[:count]
    else:
        if tokenizer is None:
            raise ValueError("calibration texts need a tokenizer: pass tokenizer=... to patch_model")
        if isinstance(calibration, str):
            calibration = [calibration]
        windows = token_windows(list(calibration), tokenizer, seq_len, count)
    have = windows.numel()
    if have < max(tokens, minimum_tokens):
        raise ValueError(
            f"the calibration text gives {have} tokens; this transform needs {max(tokens, minimum_tokens)} "
            f"({count} windows of {seq_len}): give more text, or lower calibration_tokens"
            + (f" (not below {minimum_tokens})" if minimum_tokens else "")
        )
    return windows
