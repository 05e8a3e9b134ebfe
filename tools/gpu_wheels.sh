#!/usr/bin/env bash
# Download the cp312 wheels tools/gpu_check.py needs on a GPU machine that has no network (Python 3.12, a CUDA
# torch preinstalled, no Transformer Engine / apex), into the ignored folder .gpu_wheels/ that `carry` takes along
# and tools/gpu_check.sh installs. Versions are this project's pins (constraints.txt). Run it here, with PyPI.
#
#   bash tools/gpu_wheels.sh           # what the lent H200 image lacks: megatron-core, omegaconf, antlr4 (~3 MB)
#   bash tools/gpu_wheels.sh --bare    # also the HF stack, for an image with torch only (~45 MB)
#   bash tools/gpu_wheels.sh --list    # print the package list and exit
#
# The image's own packages (what /work/.library/device/KINDS.md lists for nvidia-h200: transformers, tokenizers,
# safetensors, PyYAML, numpy, ...) are used as they are; tools/gpu_check.py records their versions. --bare carries
# the project's pins of those instead. Total size is checked against the 64 MiB a device call may carry.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.gpu_wheels"
py="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$py" ]] || py=python3

# megatron-core and what it and the config need beyond torch (missing from the lent image)
image=(megatron-core omegaconf antlr4-python3-runtime)
# an image with torch only: the HF stack and what it imports (torch already brings filelock, fsspec, jinja2,
# networkx, sympy, typing-extensions)
bare=(transformers tokenizers safetensors huggingface_hub hf-xet PyYAML regex tqdm numpy packaging typer click
      shellingham rich markdown-it-py mdurl pygments annotated-doc httpx2 httpcore2 anyio h11 idna certifi truststore
      pydantic pydantic_core annotated-types typing-inspection)

names=("${image[@]}")
case "${1:-}" in
    --bare) names+=("${bare[@]}") ;;
    --list) printf '%s\n' "${image[@]}"; echo "--bare adds: ${bare[*]}"; exit 0 ;;
    "") ;;
    *) echo "usage: bash tools/gpu_wheels.sh [--bare|--list]" >&2; exit 2 ;;
esac

pins=()
for name in "${names[@]}"; do
    pattern="${name//[-_]/[-_]}"  # PyPI names: '-' and '_' are the same
    pin="$(grep -i -m1 -E "^${pattern}==" "$root/constraints.txt" || true)"
    if [[ -z "$pin" ]]; then
        echo "gpu_wheels: $name is not pinned in constraints.txt" >&2
        exit 1
    fi
    pins+=("$pin")
done

rm -rf "$out"
mkdir -p "$out"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$out" "${pins[@]}"

total=0 count=0
for f in "$out"/*.whl; do
    count=$((count + 1))
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v f="$(basename "$f")" 'BEGIN { printf "%8.2f MiB  %s\n", s / 1048576, f }'
done
awk -v s="$total" -v d="$out" -v n="$count" 'BEGIN { printf "%8.2f MiB  total in %s (%d wheels)\n", s / 1048576, d, n }'
# Every requirement of every wheel must be carried, or be torch's own, or (without --bare) be in the image.
"$py" - "$out" "${1:-}" <<'PY'
import glob, re, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
env = dict(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_machine="x86_64",
           platform_system="Linux", os_name="posix", implementation_name="cpython",
           platform_python_implementation="CPython", extra="")
provided = {"torch", "filelock", "fsspec", "jinja2", "networkx", "sympy", "typing-extensions", "setuptools", "mpmath",
            "markupsafe"}  # torch's own requirements
if sys.argv[2] != "--bare":
    provided |= {"numpy", "packaging", "pyyaml"}  # in the lent image (KINDS.md)
wheels = {}
for w in glob.glob(f"{sys.argv[1]}/*.whl"):
    z = zipfile.ZipFile(w)
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    wheels[canon(re.search(r"^Name: (.+)$", meta, re.M).group(1))] = [
        Requirement(line.split(": ", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
missing = [f"{name} needs {r}" for name, reqs in sorted(wheels.items()) for r in reqs
           if (r.marker is None or r.marker.evaluate(env)) and canon(r.name) not in set(wheels) | provided]
if missing:
    sys.exit("gpu_wheels: requirements not carried: " + "; ".join(missing))
print(f"requirements closed over {len(wheels)} wheels")
PY
if (( total > 60 * 1048576 )); then
    echo "gpu_wheels: more than 60 MiB: the working tree and the wheels must stay under 64 MiB per device call" >&2
    exit 1
fi
