#!/usr/bin/env bash
# Create or reuse the SGLang virtualenv (separate from the trainer's .venv), then print its python's path.
# SGLang 0.5.23 pins torch 2.14.1; its CUDA-only deps (flashinfer, sgl-kernel, deep-gemm, ...) are left out so the
# real HTTP server runs on a CPU via its torch-native path (docs/rollout.md, "SGLang"). Reuse is keyed by a hash of
# this script + requirements-sglang-cpu.txt: a complete venv with the same pins is left untouched.
# Usage: export TROPD_SGLANG_PYTHON=$(bash scripts/setup_sglang_env.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TROPD_SGLANG_VENV:-$root/.venv-sglang}"
python="${TROPD_PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
reqs="$root/requirements-sglang-cpu.txt"

stamp_want="$(cat "$reqs" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
stamp_file="$venv/.tropd-sglang-stamp"
if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
    echo "$venv/bin/python"; exit 0
fi

echo "[setup-sglang] building $venv (pins changed or venv missing; ~4 min, ~7 GB)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir -q)  # no wheel cache: CI disks can be small
quiet() { grep -v "is ignored: it is neither" >&2 || true; }
"${pip[@]}" install torch==2.14.1 torchvision==0.29.1 2>&1 | quiet
# --no-deps: sglang's declared deps pull CUDA-only wheels; the CPU-usable subset is pinned in $reqs.
"${pip[@]}" install --no-deps sglang==0.5.23 2>&1 | quiet
"${pip[@]}" install -r "$reqs" 2>&1 | quiet
# Verify instead of trusting pip's exit code through the filter above.
"$venv/bin/python" - <<'PY' >&2
import importlib.util, sys
mods = ["torch", "sglang", "transformers", "fastapi", "uvicorn", "zmq", "orjson", "xgrammar", "safetensors"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"[setup-sglang] missing after install: {missing}")
import torch, sglang
assert torch.__version__.startswith("2.14.1"), torch.__version__
print(f"[setup-sglang] sglang {sglang.__version__} torch {torch.__version__}", file=sys.stderr)
PY
echo "$stamp_want" > "$stamp_file"
echo "[setup-sglang] ready: $venv" >&2
echo "$venv/bin/python"
