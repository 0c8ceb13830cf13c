#!/usr/bin/env bash
# The whole test suite, from a fresh clone: creates .venv if needed, then runs pytest (slow, vLLM and
# lm-eval tests included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
