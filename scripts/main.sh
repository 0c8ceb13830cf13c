#!/usr/bin/env bash
# The main job on the embedded default model: SmolLM2-135M, 3 KV heads -> 1 (3x smaller KV cache), healed,
# measured against the original and the mean-pool baseline on held-out Wikipedia and news text.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
out="${1:-$root/out/smollm2-135m-kv1-$(date +%Y%m%d-%H%M%S)}"
exec "$root/.venv/bin/llmopt" calibrate --model smollm2-135m --config "$root/configs/kv-3to1-healed.yaml" \
  --baselines mean-pool svd-w --out "$out"
