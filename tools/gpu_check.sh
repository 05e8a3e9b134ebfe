#!/usr/bin/env bash
# Every GPU check in one command (tools/gpu_check.py): ops vs float64 on CUDA, ops vs gather at T=4096 V=151936,
# a bf16 step with DDP and the distributed optimizer, save / SIGKILL / resume, the embedded engine on CUDA.
#
#   bash tools/gpu_check.sh --out DIR          # on the GPU machine; installs .gpu_wheels/*.whl first, if present
#   bash tools/gpu_check.sh --cpu --out DIR    # the same checks, tiny, on this CPU (the project's .venv)
#
# On the GPU machine (no network) the wheels of tools/gpu_wheels.sh travel in .gpu_wheels/ (device `carry`) and
# are installed with --no-index into a private target directory on PYTHONPATH; the image's torch is used as is.
# Output: a table on stdout, DIR/gpu_check.json; exit status 0 when every check passed. See docs/cluster.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cpu=0
[[ " $* " == *" --cpu "* ]] && cpu=1
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ $cpu == 1 && -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
wheels="${TROPD_GPU_WHEELS:-$root/.gpu_wheels}"
if [[ $cpu == 0 ]] && compgen -G "$wheels/*.whl" >/dev/null; then  # --cpu: the project's venv has everything
    site="${TROPD_GPU_SITE:-/tmp/tropd-gpu-site}"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" tools/gpu_check.py "$@"
