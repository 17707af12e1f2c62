"""Compile the Triton kernels for Hopper (sm_90) without a GPU.

The interpreter checks the arithmetic but not what the real compiler accepts;
``triton.compile`` with a CUDA target runs the whole pipeline (TTIR -> PTX ->
ptxas) on the CPU.  This catches compiled-mode type errors and shows whether
the first-choice tiles fit the 227 KiB of shared memory an H100 block may use.
Runs in a subprocess because the test session uses TRITON_INTERPRET=1.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

H100_SHARED_LIMIT = 232448  # bytes per block (sm_90 opt-in maximum)

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from edt_kernels.ops import amm_attention as m

    FP32_PTRS = {"lse_ptr", "delta_ptr", "dtable_ptr", "dbias_ptr", "bias_ptr", "mod_ptr"}

    def compile_one(fn, dtype, tiles, **flags):
        bm, bn, warps, stages = tiles
        const = dict(HAS_GRID=True, HAS_POS=True, HAS_TABLE=True, HAS_AMM=True, HAS_BIAS=False,
                     HAS_MOD=False, NEED_DTABLE=True, NEED_DBIAS=False, FOLD=True, BLOCK_D2=0,
                     DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, HEAD_DIM=64, ALIGN=8)
        const.update(flags)
        const = {k: v for k, v in const.items() if k in fn.arg_names}
        sig = {}
        for name in fn.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                # tab_ptr: the packed (table, AMM) per-offset table, one 64-bit word per entry.
                sig[name] = ("*fp32" if name in FP32_PTRS else "*i32" if name == "u_ptr"
                             else "*i64" if name == "tab_ptr" else "*" + dtype)
            elif name in ("qk_scale", "sm_scale", "bias_scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig,
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
        return kern.metadata.shared

    fwd_first = m._fwd_configs()[0]
    fwd_tiles = (fwd_first.kwargs["BLOCK_M"], fwd_first.kwargs["BLOCK_N"], fwd_first.num_warps,
                 fwd_first.num_stages)
    out = {
        "fwd_bf16": compile_one(m._amm_attn_fwd_kernel, "bf16", fwd_tiles),
        "dkdv_bf16": compile_one(m._amm_attn_bwd_dkdv_kernel, "bf16", m._BWD_DKDV_TILES_BY_D[64][0]),
        "dq_bf16": compile_one(m._amm_attn_bwd_dq_kernel, "bf16", m._BWD_DQ_TILES_BY_D[64][0]),
        # D = 72 as a 64-wide tile plus a 16-wide tail (8 valid lanes).
        "fwd_bf16_d72": compile_one(m._amm_attn_fwd_kernel, "bf16", fwd_tiles, BLOCK_D=64, BLOCK_D2=16,
                                    HEAD_DIM=72),
        "dkdv_bf16_d72": compile_one(m._amm_attn_bwd_dkdv_kernel, "bf16", m._BWD_DKDV_TILES_BY_D[80][0],
                                     BLOCK_D=64, BLOCK_D2=16, HEAD_DIM=72),
        # The table gradient summed over the batch (positions absent or shared).
        "dtable_bf16": compile_one(m._amm_attn_bwd_dtable_kernel, "bf16", m._BWD_DTABLE_TILES_BY_D[64][0]),
        "dtable_bf16_d72": compile_one(m._amm_attn_bwd_dtable_kernel, "bf16", m._BWD_DTABLE_TILES_BY_D[80][0],
                                       BLOCK_D=64, BLOCK_D2=16, HEAD_DIM=72),
        "dtable_fp32_all_last": compile_one(m._amm_attn_bwd_dtable_kernel, "fp32",
                                            m._BWD_DTABLE_TILES_BY_D[64][-1], HAS_BIAS=True, HAS_MOD=True),
        # Worst case (float32, every option on): the last-resort tiles must fit.
        "dkdv_fp32_all_last": compile_one(m._amm_attn_bwd_dkdv_kernel, "fp32", m._BWD_DKDV_TILES_BY_D[64][-1],
                                          HAS_BIAS=True, HAS_MOD=True, NEED_DBIAS=True),
    }
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_fit_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton wheel ships no ptxas: cannot compile for sm_90 here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    shared = json.loads(line[len("RESULT"):])
    for name, nbytes in shared.items():
        assert 0 < nbytes <= H100_SHARED_LIMIT, f"{name} needs {nbytes} B of shared memory"


EXPECTED_KERNELS = {
    "_gather_rows_kernel", "_invert_ids_kernel", "_unshuffle_rows_kernel", "_unshuffle_bwd_kernel",
    "_masking_gather_kernel", "_sort_kept_kernel", "_masked_shortcut_fwd_kernel", "_masked_shortcut_bwd_kernel",
    "_ln_modulate_fwd_kernel", "_ln_modulate_bwd_kernel", "_gated_residual_fwd_kernel",
    "_gated_residual_bwd_kernel", "_amm_attn_fwd_kernel", "_amm_attn_bwd_dkdv_kernel",
    "_amm_attn_bwd_dq_kernel", "_amm_attn_bwd_delta_kernel", "_amm_attn_bwd_dtable_kernel", "_amm_attn_grid_kernel",
    "_diffusion_loss_kernel",
}


@pytest.mark.slow
def test_every_launcher_compiles_for_sm90():
    """Each token/adaLN/attention launcher, in bfloat16 and float32, through the
    real JIT path (binding, specialisation, compile) with a compile-only driver."""
    script = os.path.join(os.path.dirname(__file__), "helpers", "compile_launchers_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    compiled = json.loads(line[len("RESULT"):])
    names = {name for name, _, _ in compiled}
    assert names == EXPECTED_KERNELS, sorted(names ^ EXPECTED_KERNELS)
    assert {dt for _, dt, _ in compiled} >= {"torch.bfloat16", "torch.float32"}
    for name, dtype, shared in compiled:
        assert shared <= H100_SHARED_LIMIT, (name, dtype, shared)
