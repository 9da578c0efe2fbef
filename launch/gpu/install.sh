#!/usr/bin/env bash
# Device call 2 (or the only call): join split wheels, install every carried wheel into
# /tmp/site (never over the image's torch/triton/transformers), then `export PYTHONPATH=/tmp/site`.
#   source launch/gpu/install.sh     (sourcing keeps PYTHONPATH in the calling shell)
set -eo pipefail
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p /tmp/distill-wheels
for d in "$_repo/.whl/a" "$_repo/.whl/b"; do [ -d "$d" ] && cp "$d"/* /tmp/distill-wheels/ 2>/dev/null || true; done
for p in /tmp/distill-wheels/*.whl.part00; do
  [ -e "$p" ] || continue
  w=${p%.part00}
  [ -e "$w.part01" ] || { echo "missing second half of $(basename "$w"): carry .whl/b" >&2; return 1 2>/dev/null || exit 1; }
  cat "$p" "$w.part01" > "$w"
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  /tmp/distill-wheels/*.whl
export PYTHONPATH=/tmp/site:$_repo${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import deepspeed, webdataset; print('deepspeed', deepspeed.__version__)"
python3 -c "import flash_attn.cute as fa; print('flash-attn-4', getattr(fa, '__version__', '?'))" 2>/dev/null \
  || echo "flash-attn-4 not installed (WITH_FA4=0, or it failed to import)"
