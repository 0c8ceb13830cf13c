"""End-to-end truths on the real default model (SmolLM2-135M-Instruct from its wheel). Slow: run once each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt import KVCompressionConfig, load_optimized, patch_model, save_optimized
from llmopt.cli import main as cli
from llmopt.data.corpora import calibration_texts, corpus_split
from llmopt.data.windows import token_windows
from llmopt.models import load_model

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parents[1] / "configs"


def perplexity(model, windows):
    with torch.no_grad():
        return float(torch.stack([model(w[None], labels=w[None]).loss for w in windows]).mean().exp())


def test_info_prints_the_shape(capsys):
    assert cli(["info", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    for line in ("layers                     30", "attention heads            9", "KV heads                   3",
                 "head dim                   64", "KV bytes/token (bfloat16)  23,040"):
        assert line in out


def test_the_default_model_answers(default_model):
    model, tokenizer = default_model
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_mha_twin_is_exact_and_compresses_back_losslessly(default_model):
    model, tokenizer = default_model
    twin, _ = load_model("smollm2-135m-mha")
    assert twin.config.num_key_value_heads == 9
    ids = token_windows(corpus_split("wikipedia", "heldout"), tokenizer, 128, 2)
    with torch.no_grad():
        reference = model(ids).logits
        assert (twin(ids).logits - reference).abs().max() < 1e-4
    patch_model(twin, KVCompressionConfig(ratio=3, calibration_tokens=4096), tokenizer=tokenizer,
                calibration=calibration_texts())
    with torch.no_grad():
        assert (twin(ids).logits - reference).abs().max() < 1e-3


def test_calibrate_command_measures_saves_and_reloads(default_model, tmp_path):
    """The CLI end to end: recipe → baselines → retention report with costs → a checkpoint load_optimized restores."""
    out = tmp_path / "kv1"
    assert cli(["calibrate", "--model", "smollm2-135m", "--config", str(RECIPES / "kv-mean-pool.yaml"),
                "--baselines", "keep-one", "--eval-windows", "1", "--out", str(out)]) == 0
    report = json.loads((out / "llmopt_report.json").read_text())
    models = report["retention"]["models"]
    assert list(models) == ["original", "keep-one", "ours"]
    assert models["ours"]["kv_compression"] == 3.0 and models["original"]["kv_bytes_per_token"] == 23040
    assert 0 < report["retention"]["retention"]["ours"]["wikipedia-ppl"]["value"] < 0.5  # mean-pool loses a lot
    assert (out / "retention_per_task.png").is_file() and "| ours |" in (out / "llmopt_report.md").read_text()
    loaded, tokenizer = load_optimized(out)
    expected = patch_model(load_model("smollm2-135m")[0], KVCompressionConfig(num_kv_heads=1, method="mean-pool"))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def compressed_default(default_model, tmp_path_factory):
    """SmolLM2 3 → 1 KV heads, training-free, saved as a vanilla checkpoint; and the mean-pool baseline."""
    model, tokenizer = default_model
    ours, pooled = (load_model("smollm2-135m")[0] for _ in range(2))
    patch_model(ours, KVCompressionConfig(num_kv_heads=1, calibration_tokens=8192), tokenizer=tokenizer,
                calibration=calibration_texts())
    patch_model(pooled, KVCompressionConfig(num_kv_heads=1, method="mean-pool"))
    path = save_optimized(ours, tmp_path_factory.mktemp("kv") / "smollm2-kv1", tokenizer)
    return ours, pooled, path


def test_compressed_default_model_keeps_most_of_its_quality(default_model, compressed_default):
    model, tokenizer = default_model
    ours, pooled, _ = compressed_default
    heldout = token_windows(corpus_split("wikipedia", "heldout"), tokenizer, 512, 6)
    original, calibrated, mean_pool = (perplexity(m, heldout) for m in (model, ours, pooled))
    assert calibrated < 10 * original, (original, calibrated)
    assert calibrated * 100 < mean_pool, (calibrated, mean_pool)


@pytest.mark.vllm
def test_vllm_serves_the_compressed_checkpoint_with_the_same_greedy_tokens(default_model, compressed_default):
    _, tokenizer = default_model
    ours, _, path = compressed_default
    prompts = [tokenizer(text)["input_ids"] for text in
               ("The capital of France is", "In 1905, Albert Einstein published", "def fibonacci(n):")]
    expected = [ours.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
                for ids in prompts]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": ""}
    script = Path(__file__).with_name("vllm_greedy.py")
    done = subprocess.run([sys.executable, str(script), str(path), json.dumps(prompts)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("GREEDY"))
    assert json.loads(line[len("GREEDY"):]) == expected
