#!/usr/bin/env bash
# Set up (or reuse) the pinned virtualenv, then run the main job. Extra args are passed through.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
if "$venv/bin/python" -c "import megatron_tropd.train" 2>/dev/null; then
    exec "$venv/bin/tropd" train --config examples/configs/smollm2_tropd_cpu.yaml "$@"
fi
# Until the trainer lands: the smallest real thing the package does (TP=2 forward vs unsharded).
exec "$venv/bin/tropd" smoke --tp 2 "$@"
