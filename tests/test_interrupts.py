"""A real `llmopt calibrate` stopped by a signal while it measures or while it writes its output leaves nothing at
--out: SIGINT and SIGTERM remove the partial directory too; after SIGKILL one may remain beside --out, and the
next run to the same --out removes it and completes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.checkpoint_files import check_checkpoint

ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.005  # between looks for the partial directory (writing it takes about a second)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small Llama whose fp32 weights (about 150 MB) take long enough to write to be caught mid-save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from llmopt.models.default import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir("smollm2-135m"))
    config = LlamaConfig(hidden_size=384, intermediate_size=768, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("small") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _start(model_dir: Path, tmp_path: Path) -> subprocess.Popen:
    recipe = tmp_path / "mean-pool.yaml"
    recipe.write_text("kv:\n  num_kv_heads: 1\n  method: mean-pool\n")
    command = [sys.executable, "-m", "llmopt.cli", "calibrate", "--model", str(model_dir), "--config", str(recipe),
               "--out", str(tmp_path / "out"), "--eval-windows", "1", "--tasks", "wikipedia-ppl"]
    with (tmp_path / "stderr.txt").open("w") as stderr:
        return subprocess.Popen(command, stderr=stderr, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                             "OMP_NUM_THREADS": "1"})


def _partials(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob(".out.partial-*"))


def _wait_for(condition, run: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert run.poll() is None, f"the run ended (exit {run.returncode}) before the point to stop it at"
        assert time.monotonic() < deadline, "the point to stop the run at never came"
        time.sleep(POLL_SECONDS)


@pytest.mark.slow
@pytest.mark.parametrize("point, signum", [("measuring", signal.SIGTERM), ("saving", signal.SIGINT),
                                           ("saving", signal.SIGTERM), ("saving", signal.SIGKILL)])
def test_a_stopped_calibrate_leaves_nothing_at_its_output(model_dir, tmp_path, point, signum):
    run = _start(model_dir, tmp_path)
    if point == "measuring":
        _wait_for(lambda: "measuring original" in (tmp_path / "stderr.txt").read_text(), run)
    else:
        _wait_for(lambda: _partials(tmp_path), run)
    run.send_signal(signum)
    run.wait(timeout=120)
    assert run.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}[signum]
    assert not (tmp_path / "out").exists()
    if signum != signal.SIGKILL:
        assert _partials(tmp_path) == []
        return
    assert _partials(tmp_path)  # SIGKILL runs no cleanup: the next run must not be confused by what is left
    again = _start(model_dir, tmp_path)
    again.wait(timeout=600)
    assert again.returncode == 0
    assert _partials(tmp_path) == []
    check_checkpoint(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_key_value_heads"] == 1
