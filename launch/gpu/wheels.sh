#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, every wheel the GPU image lacks, and split
# them into two carry sets of < 60 MiB each (one device call carries at most 64 MiB):
#
#   bash launch/gpu/wheels.sh            -> .whl/a/ (project deps, FA4's small wheels, first half
#                                           of the CUDA-13 CuTe-DSL libs wheel), .whl/b/ (second half)
#
# Then two consecutive device calls on a warm machine (launch/gpu/README.md):
#   1. carry [".whl/a"]:  bash launch/gpu/stash.sh             (copies .whl/a to /tmp/distill-wheels)
#   2. carry [".whl/b"]:  bash launch/gpu/install.sh && python3 launch/gpu_check.py --out $OUT/gpu
# Without FA4 (`WITH_FA4=0`) everything fits in .whl/a and one call does both.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
WITH_FA4=${WITH_FA4:-1}
DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST/all" "$DEST/a" "$DEST/b"
# the GPU image: Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, triton 3.6, no deepspeed
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST/all" "$@"; }
# deepspeed ships no wheel: build a pure-Python one (ops are JIT-built on the GPU machine)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST/all" \
  "deepspeed==$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))')"
dl hjson pydantic annotated-types typing-inspection typing-extensions webdataset braceexpand
# pydantic pins its core exactly: take the version its metadata names
CORE=$(unzip -p "$DEST"/all/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
dl "pydantic-core==$CORE"
if [ "$WITH_FA4" = 1 ]; then
  dl "flash-attn-4==4.0.0b36" quack-kernels nvidia-cutlass-dsl nvidia-cutlass-dsl-libs-base \
     nvidia-cutlass-dsl-libs-cu13 apache-tvm-ffi torch-c-dlpack-ext
fi
for f in "$DEST"/all/*.whl; do
  if [ "$(stat -c %s "$f")" -gt $((40 << 20)) ]; then  # too big for one call: split in two
    split -n 2 -d "$f" "$DEST/a/$(basename "$f").part"
    mv "$DEST/a/$(basename "$f").part01" "$DEST/b/"
  else
    cp "$f" "$DEST/a/"
  fi
done
rm -rf "$DEST/all"
du -sh "$DEST"/a "$DEST"/b
