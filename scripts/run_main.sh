#!/usr/bin/env bash
# Set up (or reuse) the pinned virtualenv, then run the main job: TrOPD distillation of SmolLM2-135M-Instruct into
# a 6-layer student on CPU. Extra arguments are config overrides (section.key=value).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
exec "$venv/bin/tropd" train --config examples/configs/smollm2_tropd_cpu.yaml "$@"
