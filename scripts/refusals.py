"""Every bad input a new user is likely to give the CLI, each run as a real `llmopt` command and timed: a markdown
table of exit code, seconds (wall, and CPU: on a shared machine the CPU seconds say how much work was done),
whether a traceback was printed, and the error. Each should be refused with exit code 2, in a few seconds, before
any work.

    PYTHONPATH=$PWD .venv/bin/python scripts/refusals.py
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "kv-3to1.yaml"


def write_fixtures(folder: Path) -> dict[str, Path]:
    """Recipes, texts, a tiny GPT-2 and a tiny saved Llama (damaged in copies) under `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from llmopt.checkpoint import save_optimized
    from llmopt.models import load_model

    _, tokenizer = load_model("smollm2-135m")
    vocab = len(tokenizer)
    paths = {name: folder / name for name in ("recipes", "texts", "not-a-model")}
    for path in paths.values():
        path.mkdir()
    (paths["not-a-model"] / "notes.txt").write_text("no model here")
    recipes = {"bad-yaml": "kv: [num_kv_heads: 1\n", "unknown-key": "kv:\n  num_kv_heads: 1\n  heads: 2\n",
               "not-dividing": "kv:\n  num_kv_heads: 2\n", "ratio-too-large": "kv:\n  ratio: 6\n",
               "negative-steps": "kv:\n  num_kv_heads: 1\n  healing:\n    steps: -5\n",
               "unknown-transform": "quantize:\n  bits: 4\n"}
    for name, text in recipes.items():
        (paths["recipes"] / f"{name}.yaml").write_text(text)
    (paths["texts"] / "short.txt").write_text("A few words are not enough to calibrate on.")
    (paths["texts"] / "empty.txt").write_text("")
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab))
    gpt2.config.architectures = ["GPT2LMHeadModel"]
    gpt2.save_pretrained(folder / "tiny-gpt2")
    tokenizer.save_pretrained(folder / "tiny-gpt2")
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]))
    good = save_optimized(llama, folder / "tiny-llama", tokenizer)
    paths.update({"gpt2": folder / "tiny-gpt2", "good": good})
    for damage in ("zero-length", "truncated", "not-safetensors", "missing-shard", "shape-mismatch", "newer-record",
                   "unknown-transform-record", "config-not-json", "no-weights"):
        paths[damage] = _damaged(good, folder / damage, damage)
    return paths


def _damaged(good: Path, path: Path, damage: str) -> Path:
    shutil.copytree(good, path)
    weights, config = path / "model.safetensors", path / "config.json"
    data = json.loads(config.read_text())
    if damage == "zero-length":
        weights.write_bytes(b"")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "not-safetensors":
        weights.write_bytes(b"<html>404 Not Found</html>" * 100)
    elif damage == "missing-shard":
        weights.rename(path / "model-00001-of-00002.safetensors")
        from safetensors import safe_open

        with safe_open(path / "model-00001-of-00002.safetensors", "pt") as handle:
            names = list(handle.keys())
        weight_map = {name: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, name in enumerate(names)}
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif damage == "shape-mismatch":
        config.write_text(json.dumps({**data, "intermediate_size": 96}))
    elif damage == "newer-record":
        config.write_text(json.dumps({**data, "llmopt": {"version": 3, "kv": {"num_kv_heads": 1}}}))
    elif damage == "unknown-transform-record":
        config.write_text(json.dumps({**data, "llmopt": {"version": 2, "quantize": {"bits": 4}}}))
    elif damage == "config-not-json":
        config.write_text("{ this is not json")
    elif damage == "no-weights":
        weights.unlink()
    return path


def cases(paths: dict[str, Path], folder: Path) -> list[tuple[str, list[str]]]:
    recipe, recipes, texts = str(RECIPE), paths["recipes"], paths["texts"]
    out = str(folder / "out")
    calibrate = ["calibrate", "--config", recipe, "--out", out]
    rows = [
        ("unknown model name", ["calibrate", "--model", "smollm9-135m", "--config", recipe, "--out", out]),
        ("missing model dir", ["calibrate", "--model", str(folder / "nowhere"), "--config", recipe, "--out", out]),
        ("not-a-model dir", ["calibrate", "--model", str(paths["not-a-model"]), "--config", recipe, "--out", out]),
        ("missing recipe file", ["calibrate", "--config", str(folder / "nowhere.yaml"), "--out", out]),
        ("bad YAML", ["calibrate", "--config", str(recipes / "bad-yaml.yaml"), "--out", out]),
        ("unknown recipe key", ["calibrate", "--config", str(recipes / "unknown-key.yaml"), "--out", out]),
        ("unknown transform", ["calibrate", "--config", str(recipes / "unknown-transform.yaml"), "--out", out]),
        ("KV heads that do not divide (2 of 3)", ["calibrate", "--config", str(recipes / "not-dividing.yaml"),
                                                  "--out", out]),
        ("ratio too large (6 of 3)", ["calibrate", "--config", str(recipes / "ratio-too-large.yaml"), "--out", out]),
        ("negative healing steps", ["calibrate", "--config", str(recipes / "negative-steps.yaml"), "--out", out]),
        ("too-short calibration text", [*calibrate, "--calibration", str(texts / "short.txt")]),
        ("empty calibration file", [*calibrate, "--calibration", str(texts / "empty.txt")]),
        ("missing calibration file", [*calibrate, "--calibration", str(texts / "nowhere.txt")]),
        ("unsupported architecture (tiny GPT-2)", ["calibrate", "--model", str(paths["gpt2"]), "--config", recipe,
                                                   "--out", out]),
        ("unknown eval task", [*calibrate, "--tasks", "no-such-task"]),
        ("output dir exists", ["calibrate", "--config", recipe, "--out", str(folder)]),
        ("--eval-windows 0", [*calibrate, "--eval-windows", "0"]),
        ("unknown baseline", [*calibrate, "--baseline", "no-such-baseline"]),
        ("llmopt eval: unknown model", ["eval", "--model", "smollm9-135m", "--tasks", "wikipedia-ppl", "--limit", "1",
                                        "--out", out]),
    ]
    for damage in ("zero-length", "truncated", "not-safetensors", "missing-shard", "shape-mismatch", "newer-record",
                   "unknown-transform-record", "config-not-json", "no-weights"):
        checkpoint = str(paths[damage])
        rows += [(f"{damage}: info", ["info", checkpoint]),
                 (f"{damage}: eval", ["eval", "--model", checkpoint, "--tasks", "wikipedia-ppl", "--limit", "1",
                                      "--out", out]),
                 (f"{damage}: calibrate --model", ["calibrate", "--model", checkpoint, "--config", recipe,
                                          "--out", out]),
                 (f"{damage}: serve", ["serve", checkpoint])]
    return rows


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="llmopt-refusals-") as tmp:
        folder = Path(tmp)
        paths = write_fixtures(folder)
        print("| bad input | command | exit | wall s | CPU s | traceback | error |\n|---|---|---:|---:|---:|---|---|")
        failures = 0
        for name, args in cases(paths, folder):
            started, cpu = time.perf_counter(), _children_cpu_seconds()
            done = subprocess.run([sys.executable, "-m", "llmopt.cli", *args], capture_output=True, text=True,
                                  timeout=600, check=False)
            seconds, cpu = time.perf_counter() - started, _children_cpu_seconds() - cpu
            traceback = "Traceback" in done.stderr
            lines = done.stderr.strip().splitlines() or [""]
            message = next((line for line in reversed(lines) if line.startswith("llmopt ")), lines[-1])
            failures += done.returncode != 2 or traceback or (folder / "out").exists()
            shown = " ".join([args[0], *(arg.replace(tmp, "$TMP").replace(str(ROOT) + "/", "") for arg in args[1:])])
            print(f"| {name} | `llmopt {shown}` | {done.returncode} | {seconds:.1f} | {cpu:.1f} "
                  f"| {'yes' if traceback else 'no'} | {message.replace(tmp, '$TMP').replace('|', '/')[:300]} |",
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
