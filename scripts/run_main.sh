#!/usr/bin/env bash
# Set up (or reuse) the pinned virtualenv, then run the main job on CPU, in two stages:
#   1. heal: SmolLM2-135M-Instruct pruned to 15 of 30 layers (ModelOpt Minitron), trained by offline distillation
#      (dense forward KL on teacher-written responses): examples/configs/smollm2_heal_cpu.yaml. Cached: a rerun
#      finds the stage complete (tropd train --resume) and skips it.
#   2. distil: TrOPD with its defaults from the healed student: examples/configs/smollm2_tropd_cpu.yaml.
# Each stage prints held-out forward KL, reverse KL and agreement with the teacher before and after.
# Extra arguments are config overrides of stage 2 (section.key=value).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
SECONDS=0  # the main job's own time, after the set-up
heal_cfg=examples/configs/smollm2_heal_cpu.yaml
heal_dir=runs/smollm2_heal_cpu
echo "[main] stage 1/2: heal the pruned student ($heal_cfg -> $heal_dir)"
"$venv/bin/tropd" train --config "$heal_cfg" train.run_dir="$heal_dir" --resume
healed="$("$venv/bin/python" -c 'import sys; from megatron_tropd.training.checkpoint import latest_checkpoint
c = latest_checkpoint(sys.argv[1]); print(c or "")' "$heal_dir")"
if [[ -z "$healed" ]]; then
    echo "[main] stage 1 left no checkpoint in $heal_dir/checkpoints" >&2
    exit 1
fi
echo "[main] stage 2/2: TrOPD from the healed student ($healed)"
main_dir="$("$venv/bin/python" -c 'import sys; from megatron_tropd.config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).train.run_dir)' examples/configs/smollm2_tropd_cpu.yaml "$@")"
"$venv/bin/tropd" train --config examples/configs/smollm2_tropd_cpu.yaml student.megatron_checkpoint="$healed" "$@"
echo
echo "[main] the pipeline on held-out prompts: pruned student -> healed -> after TrOPD"
"$venv/bin/python" -m megatron_tropd.training.stages "$heal_dir" "$main_dir"
echo "[main] finished in ${SECONDS}s (after set-up; stage 1 is cached in $heal_dir for reruns)"
