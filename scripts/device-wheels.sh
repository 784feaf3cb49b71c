#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, transformers and accelerate but no network (the lent device
# machine, Python 3.12, x86-64): what its image lacks, at the versions of this checkout's .venv, into
# .whl/ (git-ignored). Then run benchmarks/gpu.sh there with .whl carried. --no-bnb leaves out
# bitsandbytes (43 MB; only the low-VRAM preset's 8-bit AdamW needs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
PYVER=${PYVER:-3.12}
packages=(diffusers datasets dill multiprocess pydantic pydantic_core annotated_types typing_inspection peft)
[ "${1:-}" = "--no-bnb" ] || packages+=(bitsandbytes)
# The versions the test suite ran with here, so the GPU runs the same code.
pins=()
for name in "${packages[@]}"; do
  version=$("$PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
  pins+=("$name${version:+==$version}")
done
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64; do
  platforms+=(--platform "$p")
done
"$PIP" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
ls -1 .whl
# The device tool sends the working tree and the carried folders, 64 MiB in all.
tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s}')
wheels=$(du -sb .whl | cut -f1)
echo "travels: $(( (tree + wheels) / 1048576 )) MiB of 64 (tree $(( tree / 1048576 )), wheels $(( wheels / 1048576 )))"
