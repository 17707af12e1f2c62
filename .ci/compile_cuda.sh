#!/usr/bin/env bash
# Compile-check every CUDA source in csrc/ with `nvcc -c` against the installed
# torch's headers, so that the CUDA kernels cannot rot on CPU-only CI.
#
# Covers: preprocessing, template instantiation and device code generation of
# each .cu for the architectures in $CUDA_ARCHS (default "80 90"), with the
# flags torch's cpp_extension uses.  Does not link or run anything.
# Exit 0 with a message when nvcc is absent; non-zero when a file fails.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$NVCC" ]; then
    echo "compile_cuda: nvcc not found (set NVCC or CUDA_HOME); skipping the CUDA compile check"
    exit 0
fi
shopt -s nullglob
SOURCES=(csrc/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then
    echo "compile_cuda: no .cu files in csrc/"
    exit 0
fi

PY="${PYTHON:-python}"
mapfile -t FLAGS < <("$PY" - <<'PYEOF'
import sysconfig
from torch.utils import cpp_extension as ce
paths = ce.include_paths()
for p in paths + [sysconfig.get_paths()["include"]]:
    print(f"-I{p}")
for f in ce.COMMON_NVCC_FLAGS:
    print(f)
import os
# CPU-only torch wheels ship the CUDA headers but not this generated one
# (it only sets export macros for Windows DLLs).
if not os.path.exists(os.path.join(paths[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
PYEOF
)
GENCODE=()
for a in ${CUDA_ARCHS:-80 90}; do GENCODE+=("-gencode=arch=compute_${a},code=sm_${a}"); done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# the generated source-hash header of the real builds (edt_kernels/_ext.py)
echo "#define EDT_KERNELS_SRC_HASH edt_kernels_src_compile_check" > "$OUT/edt_kernels_src_hash.h"
echo "compile_cuda: $("$NVCC" --version | tail -n 1) ; archs: ${CUDA_ARCHS:-80 90}"
for f in "${SOURCES[@]}"; do
    echo "compile_cuda: nvcc -c $f"
    "$NVCC" -c "$f" -o "$OUT/$(basename "$f").o" -std=c++20 -Xcompiler -fPIC \
        -DTORCH_EXTENSION_NAME=edt_kernels_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
        -I"$OUT" -DEDT_KERNELS_HAVE_HASH_HEADER -O3 --expt-relaxed-constexpr -lineinfo \
        -Xcudafe --diag_suppress=20012 "${FLAGS[@]}" "${GENCODE[@]}" \
        2> >(grep -v -E "Wc\+\+20-extensions|default member initializers for bit-fields|^ *[0-9]* \| |^ *\| *\^|In file included from|^ +from " >&2)
done
echo "compile_cuda: OK (${#SOURCES[@]} file(s) compiled)"
