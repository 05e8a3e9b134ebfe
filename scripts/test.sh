#!/usr/bin/env bash
# Set up (or reuse) the pinned virtualenv, then run the whole test suite. Extra args go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh")"
cd "$root"
TROPD_SGLANG_PYTHON="${TROPD_SGLANG_PYTHON:-$(bash scripts/setup_sglang_env.sh)}"; export TROPD_SGLANG_PYTHON  # SGLang tests
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit $rc
