#!/usr/bin/env bash
# Test-only material that cannot be a pip extra.
# timm's wheel (no dependencies): `import timm` needs a torchvision built for the
# installed torch, which a CPU-only machine cannot get, so tests/test_patch.py
# runs timm's own Attention source from the wheel instead (see its docstring).
set -u
dest="${EDT_TIMM_WHEEL_DIR:-$HOME/.cache/edt_kernels/wheels}"
mkdir -p "$dest"
if ! ls "$dest"/timm-*.whl >/dev/null 2>&1; then
  python -m pip download -q --no-deps --only-binary=:all: -d "$dest" "timm==1.0.31" \
    || echo "extra_test_deps: could not download timm; the tests on timm's real Attention will skip"
fi
exit 0
