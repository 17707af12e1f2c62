"""Static sm_90 profile of every Triton kernel of the package, on a CPU-only machine.

    python -m benchmarks.profiling.sm90_profile [--out DIR] [--reduced]

Each kernel is compiled for sm_90 (H100/H200) through its real launcher: a
compile-only driver (``benchmarks/profiling/sm90_compile.py``) reports an sm_90 target and ``JITFunction.run`` compiles
without launching (its ``warmup`` mode), so argument binding, specialisation
(alignment, constexprs) and the whole pipeline TTIR -> PTX -> ptxas run exactly
as they would on the GPU.  The forward autotuner compiles every one of its
configs; the backward launcher tries its tiles in order, a tile over the
shared-memory limit failing as it would on the device.  q/k/v are the strided
views of one ``[B, N, 3, H, D]`` qkv tensor, as ``AMMAttention`` passes them.

For each compiled kernel the cubin is read with the ``cuobjdump``/``nvdisasm``
that Triton ships: registers, stack (spills), shared memory and the SASS
instruction mix.  For the attention main loop (the innermost loop holding the
tensor-core MMAs) the issued non-MMA instructions per score element give a
bound from published H100 SXM throughputs (FlashAttention-3, Shah et al. 2024,
section 3.1: 989 TFLOP/s dense bf16/fp16 MMA, 3.9 TFLOP/s MUFU exp; 132 SMs at
1.83 GHz, 4 warp schedulers per SM issuing one warp instruction per clock):

    per SM and clock: 4096 MMA FLOP, 16 exp, 128 thread instructions
    instr/score = (non-MMA SASS in the loop) * 32 * num_warps / (BLOCK_M * BLOCK_N)
    clocks/score = max(flop/score / 4096, exp/score / 16, instr/score / 128)

Every figure is a **static estimate** read off the compiled code: it is not a
speed, ignores latency, memory stalls, dual issue and occupancy, and counts an
instruction once per loop trip whatever its predicate.

Writes ``DIR/sm90_profile.json``, ``DIR/sm90_profile.md`` and
``DIR/cubins/<kernel>-<specialisation>.cubin``.  Both files also carry the
table-gather locality of MDT's masked attention with random vs sorted kept
positions, counted on the host from the index pattern and the compiled
kernel's layout of the table load (``benchmarks/profiling/gather_locality.py``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # the profile needs the real compiler
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.profiling import gather_locality, sm90_compile  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "sm90-static"
SHARED_LIMIT = 232448  # bytes per block on sm_90 (opt-in maximum, 227 KiB)
_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# H100 SXM published throughputs (FlashAttention-3 paper, section 3.1; NVIDIA H100 datasheet).
H100 = dict(sms=132, clock_ghz=1.83, mma_tflops=989.0, exp_tflops=3.9)
MMA_PER_CLK = H100["mma_tflops"] * 1e12 / (H100["sms"] * H100["clock_ghz"] * 1e9)  # ~4096
EXP_PER_CLK = H100["exp_tflops"] * 1e12 / (H100["sms"] * H100["clock_ghz"] * 1e9)  # ~16
ISSUE_PER_CLK = 4 * 32  # thread instructions per SM and clock
STATIC = "static estimate"


# ----------------------------------------------------------------------------- compile-only driver

class _Recorder:
    def __init__(self):
        self.records: List[dict] = []
        self.spec: Dict = {}


_REC = _Recorder()


def _record(fn, args, kwargs, kernel):
    meta = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "BLOCK_D", "BLOCK_D2")
            if k in kwargs}
    _REC.records.append(dict(kernel=fn.fn.__name__, compiled=kernel, launch=meta, spec=dict(_REC.spec)))
    if kernel.metadata.shared > SHARED_LIMIT:  # what loading it on an H100 would raise
        _REC.records[-1]["rejected"] = True
        raise triton.runtime.errors.OutOfResources(kernel.metadata.shared, SHARED_LIMIT, "shared memory")


def _autotune_every_config(self, *args, **kwargs):
    """Autotuner.run in compile-only mode: compile each config (nothing to time)."""
    last = None
    self.nargs = dict(zip(self.arg_names, args))
    for cfg in self.prune_configs(kwargs):  # the configs the autotuner would time
        try:
            last = self.fn.run(*args, **kwargs, **cfg.all_kwargs())
        except triton.runtime.errors.OutOfResources:
            pass  # the autotuner skips a config that does not fit (recorded as rejected)
    return last


def install():
    sm90_compile.install(_record)
    triton.runtime.Autotuner.run = _autotune_every_config
    from edt_kernels.ops import adaln, amm_attention, tokens  # noqa: F401
    amm_attention._on_gpu = lambda t: True  # the GPU tiles and configs, not the interpreter's
    return amm_attention, adaln, tokens


# ----------------------------------------------------------------------------- SASS analysis

_MMA = re.compile(r"^(HMMA|HGMMA|IMMA|DMMA|WGMMA)")
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _classify(op: str) -> str:
    base = op.split(".")[0]
    if _MMA.match(base):
        return "mma"
    if base == "MUFU":
        return "mufu"
    if base in ("LDG",):
        return "ldg"
    if base in ("LDGSTS",):
        return "async_copy"
    if base.startswith("UTMA") or base == "UBLKCP":
        return "tma"
    if base in ("RED", "ATOM", "REDG", "ATOMG", "REDUX", "ATOMS"):
        return "atomic"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("STG",):
        return "stg"
    if base in ("LDS", "STS", "LDSM", "STSM"):
        return "shared"
    if base in ("BAR", "SYNCS", "WARPSYNC", "BSYNC", "BSSY", "DEPBAR", "WARPGROUP", "ARRIVES"):
        return "sync"
    return "alu"


def _ldg_width(op: str) -> str:
    for w in ("128", "64"):
        if f".{w}" in op:
            return f"LDG.{w}"
    for w in ("U16", "S16", "U8", "S8"):
        if f".{w}" in op:
            return "LDG.16" if "16" in w else "LDG.8"
    return "LDG.32"


def _mix(ops: List[str]) -> dict:
    mix: Dict[str, int] = {}
    for op in ops:
        c = _classify(op)
        mix[c] = mix.get(c, 0) + 1
        if c == "ldg":
            w = _ldg_width(op)
            mix[w] = mix.get(w, 0) + 1
    mix["total"] = len(ops)
    return mix


def analyse_cubin(path: pathlib.Path) -> dict:
    res = subprocess.run([str(_BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    regs, stack, _shared_static, local = (int(x) for x in m.groups())
    sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                          check=True).stdout
    lines = sass.splitlines()
    ops, labels, branches = [], {}, []
    for ln in lines:
        s = ln.strip()
        if s.startswith(".L_x_") and s.endswith(":"):
            labels[s[:-1]] = len(ops)
            continue
        mi = _INSTR.search(ln)
        if not mi:
            continue
        op = mi.group(1)
        if op == "BRA":
            mt = re.search(r"`\((\.L_x_\d+)\)", ln)
            if mt:
                branches.append((len(ops), mt.group(1)))
        ops.append(op)
    # Loops: a branch back to an earlier label.  The main loop is the smallest one holding MMAs.
    loops = []
    for at, lab in branches:
        start = labels.get(lab)
        if start is not None and start <= at:
            body = ops[start:at + 1]
            if any(_classify(o) == "mma" for o in body):
                loops.append(body)
    main = min(loops, key=len) if loops else None
    return dict(registers=regs, stack_bytes=stack, local_bytes=local, sass=_mix(ops),
                main_loop=_mix(main) if main is not None else None)


# ----------------------------------------------------------------------------- bound model

def _loop_model(kind: str, rec: dict) -> Optional[dict]:
    loop = rec.get("main_loop")
    if loop is None or kind not in ("fwd", "dkdv", "dq", "dtable"):
        return None
    bm, bn, warps = rec["BLOCK_M"], rec["BLOCK_N"], rec["num_warps"]
    d = rec["head_dim"]
    per = 32 * warps / (bm * bn)  # thread instructions per score per warp instruction of the loop
    non_mma = loop["total"] - loop.get("mma", 0)
    instr = non_mma * per
    dots = {"fwd": 2, "dkdv": 4, "dq": 3, "dtable": 2}[kind]
    flop = 2 * dots * d
    clk = {"mma": flop / MMA_PER_CLK, "exp": 1.0 / EXP_PER_CLK, "issue": instr / ISSUE_PER_CLK}
    bound = max(clk, key=clk.get)
    tflops = flop / clk[bound] * H100["sms"] * H100["clock_ghz"] * 1e9 / 1e12
    return dict(instr_per_score=round(instr, 2), mufu_per_score=round(loop.get("mufu", 0) * per, 3),
                budget_instr_per_score=round(max(clk["mma"], clk["exp"]) * ISSUE_PER_CLK, 2),
                bound=bound, bound_tflops=round(tflops, 1), label=STATIC)


# ----------------------------------------------------------------------------- the matrix

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (52, 64, 72, 128)


def _qkv(B, N, H, D, dt):
    qkv = torch.randn(B, N, 3, H, D, dtype=dt)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: [B, H, N, D] strided views


def _attention_inputs(feat: str, B, N, H, D, dt, side):
    q, k, v = _qkv(B, N, H, D, dt)
    rows = cols = side
    n_off = (2 * rows - 1) * (2 * cols - 1)
    table = torch.randn(n_off + 3, H) if "table" in feat else None
    amm = torch.rand(n_off) if "amm" in feat else None
    pos = torch.stack([torch.randperm(rows * cols)[:N] for _ in range(B)]) if "pos" in feat else None
    bias = torch.randn(1, H, N, N, dtype=dt) if "bias" in feat else None
    return q, k, v, table, pos, amm, bias


def attention_matrix(reduced: bool):
    """(kind, feature, dtype, head_dim, fwd_all_configs, bwd_all_tiles)."""
    m = []
    dims = (52, 64, 72) if reduced else HEAD_DIMS
    for dt in (("bf16",) if reduced else ("bf16", "fp16")):
        for d in dims:
            main = dt == "bf16" and not reduced
            m.append(("table+amm", dt, d, main, main and d == 72))
    if not reduced:
        for feat in ("none", "table", "amm", "table+amm+pos", "bias"):
            m.append((feat, "bf16", 64, False, False))
    return m


def run_attention(attn, reduced: bool):
    out = []
    B, H = 2, 4
    for feat, dt_name, d, fwd_all, bwd_all in attention_matrix(reduced):
        dt = DTYPES[dt_name]
        side, N = (16, 179) if "pos" in feat else (16, 256)
        q, k, v, table, pos, amm, bias = _attention_inputs(feat, B, N, H, d, dt, side)
        spec = dict(feature=feat, dtype=dt_name, head_dim=d, N=N, layout="qkv[B,N,3,H,D] views")
        args = (q, k, v, table, pos, amm, bias, None, d ** -0.5, side, side)
        _REC.spec = dict(spec, phase="fwd")
        saved_cfgs = None
        if not fwd_all and isinstance(attn._fwd_kernel, triton.runtime.Autotuner):
            saved_cfgs = attn._fwd_kernel.configs  # the first config the autotuner keeps for this D
            d1, d2 = attn._head_blocks(d)  # the head-dim tiles (72 = 64 + 16)
            attn._fwd_kernel.configs = attn._prune_fwd_configs(saved_cfgs, {}, BLOCK_D=d1, BLOCK_D2=d2)[:1]
        try:
            o, lse = attn.amm_attention_forward(*args)
        finally:
            if saved_cfgs is not None:
                attn._fwd_kernel.configs = saved_cfgs
        _REC.spec = dict(spec, phase="bwd")
        block_d = sum(attn._head_blocks(d))  # the width of the head-dim tiles, as the launcher keys its lists
        lists = (attn._bwd_tiles(attn._BWD_DKDV_TILES_BY_D, block_d),
                 attn._bwd_tiles(attn._BWD_DQ_TILES_BY_D, block_d),
                 attn._bwd_tiles(attn._BWD_DTABLE_TILES_BY_D, block_d))
        if bwd_all:  # every tile in the order the launcher tries them (each compiled)
            for i in range(len(lists[0])):
                saved = lists[0][:], lists[1][:], lists[2][:]
                lists[0][:] = saved[0][i:i + 1]
                lists[1][:] = saved[1][i:i + 1] if i < len(saved[1]) else saved[1][-1:]
                lists[2][:] = saved[2][i:i + 1] if i < len(saved[2]) else saved[2][-1:]
                attn._tile_choice.clear()
                try:
                    attn.amm_attention_backward(torch.randn_like(q), q, k, v, o, lse, *args[3:],
                                                table is not None, bias is not None)
                except RuntimeError:
                    pass
                finally:
                    lists[0][:], lists[1][:], lists[2][:] = saved
        attn._tile_choice.clear()
        attn.amm_attention_backward(torch.randn_like(q), q, k, v, o, lse, *args[3:],
                                    table is not None, bias is not None)
    return out


def run_tokens_adaln(adaln, tokens, reduced: bool):
    B, L, K = 2, 256, 179
    widths = (1152, 936)  # a multiple of 16, and of 8 only (EDT-XL; EDT-S's 312 alike)
    dts = ("bf16",) if reduced else ("bf16", "fp16")
    for dt_name in dts:
        dt = DTYPES[dt_name]
        for C in widths:
            _REC.spec = dict(feature=f"C={C}", dtype=dt_name, head_dim=None, N=L, layout="[B, L, C]")
            sm90_compile.token_launchers(tokens, adaln, torch.randn(B, L, C, dtype=dt), K)
        run_diffusion_loss(dt_name)


def run_diffusion_loss(dt_name: str) -> None:
    """The training loss kernel on a model output of ``dt_name`` (the data, noise and schedule rows
    float32, as the training loss passes them), 4x32x32 latents, with and without its gradient."""
    from edt_kernels.ops import diffusion_loss as dloss

    B = 2
    x0 = torch.randn(B, 4, 32, 32)
    for need_grad in (True, False):
        _REC.spec = dict(feature="latent4x32x32" + ("+grad" if need_grad else ""), dtype=dt_name, head_dim=None,
                         N=4 * 32 * 32, layout="[B, 2C, H, W]")
        dloss.diffusion_loss_forward(torch.randn(B, 8, 32, 32, dtype=DTYPES[dt_name]), x0, x0.clone(), x0.clone(),
                                     torch.rand(B, len(dloss.COEF_COLUMNS)), 1.0, need_grad)


# ----------------------------------------------------------------------------- records and output

_KIND = {"_amm_attn_fwd_kernel": "fwd", "_amm_attn_bwd_dkdv_kernel": "dkdv", "_amm_attn_bwd_dq_kernel": "dq",
         "_amm_attn_bwd_delta_kernel": "delta", "_amm_attn_bwd_dtable_kernel": "dtable"}


def _spec_name(r: dict) -> str:
    s = r["spec"]
    parts = [s["dtype"], s["feature"].replace("+", "_").replace("=", "")]
    if s.get("head_dim"):
        parts.append(f"d{s['head_dim']}")
    la = r["launch"]
    if "BLOCK_M" in la:
        parts.append(f"m{la['BLOCK_M']}" + (f"n{la['BLOCK_N']}" if "BLOCK_N" in la else "")
                     + f"w{la.get('num_warps', 4)}s{la.get('num_stages', 3)}")
    return "-".join(parts)


def collect(out_dir: pathlib.Path) -> List[dict]:
    cub = out_dir / "cubins"
    cub.mkdir(parents=True, exist_ok=True)
    seen, rows = set(), []
    for r in _REC.records:
        k = r["compiled"]
        name = f"{r['kernel']}-{_spec_name(r)}"
        if name in seen:
            continue
        seen.add(name)
        path = cub / f"{name}.cubin"
        path.write_bytes(k.asm["cubin"])
        rec = dict(kernel=r["kernel"], specialisation=_spec_name(r), **r["spec"],
                   BLOCK_M=r["launch"].get("BLOCK_M"), BLOCK_N=r["launch"].get("BLOCK_N"),
                   num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                   shared_bytes=k.metadata.shared, rejected_over_shared_limit=bool(r.get("rejected")),
                   cubin=str(path.relative_to(out_dir)), label=STATIC)
        rec.update(analyse_cubin(path))
        rec["spills"] = rec["stack_bytes"] > 0 or rec["sass"].get("local", 0) > 0
        rec["scalar_tile_loads"] = rec["sass"].get("LDG.16", 0)
        model = _loop_model(_KIND.get(r["kernel"], ""), rec)
        if model:
            rec["loop_model"] = model
            rec["useful_mma"] = _useful_mma(rec["head_dim"], r["launch"])
        rows.append(rec)
    return rows


def _useful_mma(d: int, launch: dict) -> Optional[float]:
    """Fraction of the MMA work on real head-dim lanes: D over the width of the
    head-dim tiles (one padded power of two, or a tile plus a tail tile)."""
    if "BLOCK_D" in launch:
        width = launch["BLOCK_D"] + launch.get("BLOCK_D2", 0)
    else:
        width = max(16, triton.next_power_of_2(d))
    return round(d / width, 3)


def _fmt_row(r: dict) -> str:
    m, lm = r["sass"], r.get("main_loop") or {}
    model = r.get("loop_model") or {}
    loads = "/".join(str(m.get(w, 0)) for w in ("LDG.16", "LDG.32", "LDG.64", "LDG.128"))
    return (f"| {r['kernel']} | {r['specialisation']} | {r['registers']} | {r['stack_bytes']} | "
            f"{m.get('local', 0)} | {r['shared_bytes']}{' (rejected)' if r['rejected_over_shared_limit'] else ''} | "
            f"{m.get('mma', 0)} | {m.get('mufu', 0)} | {m.get('alu', 0)} | {loads} | {m.get('async_copy', 0)}"
            f"/{m.get('tma', 0)} | {m.get('atomic', 0)} | {lm.get('total', '')} | "
            f"{model.get('instr_per_score', '')} | {model.get('budget_instr_per_score', '')} | "
            f"{model.get('bound', '')} {model.get('bound_tflops', '')} | {r.get('useful_mma', '')} |")


HEADER = ("| kernel | specialisation | regs | stack B | LDL/STL | shared B | MMA | MUFU | other ALU | "
          "LDG 16/32/64/128 | LDGSTS/TMA | atomics | loop SASS | instr/score | budget | bound (TFLOP/s) | "
          "useful MMA |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def write_markdown(rows, info, out_dir: pathlib.Path, baseline: Optional[List[dict]] = None):
    lines = [f"# sm_90 static profile ({STATIC}s, not speeds)", "",
             f"{info['date']} · commit {info['commit']} · torch {info['torch']} · triton {info['triton']} · "
             f"compiled for sm_90 on a CPU (no GPU): every figure below is a {STATIC}.", "",
             "Bound model: H100 SXM, 132 SMs at 1.83 GHz, 989 TFLOP/s dense bf16 MMA and 3.9 TFLOP/s MUFU exp "
             "(FlashAttention-3, Shah et al. 2024, sec. 3.1), 128 issued thread instructions per SM and clock. "
             "`instr/score` = non-MMA SASS instructions of the main loop x 32 x warps / (BLOCK_M x BLOCK_N); "
             "`budget` = the instructions per score that fit under the MMA or exp time, whichever is larger. "
             "`useful MMA` = head dim / width of the head-dim tiles (the MMA work on real lanes). "
             "It ignores latency, stalls, memory and occupancy.", ""]
    if baseline:
        lines += ["## Before / after (attention kernels, first tile the launcher would run)", "",
                  "| kernel | specialisation | regs before | regs after | stack B before | after | "
                  "LDG.16 before | after | instr/score before | after | useful MMA before | after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        key = lambda r: (r["kernel"], r["dtype"], r["feature"], r["head_dim"])  # noqa: E731
        first_b, first_a = {}, {}
        for src, dst in ((baseline, first_b), (rows, first_a)):
            for r in src:
                if r["kernel"] in _KIND and not r["rejected_over_shared_limit"]:
                    dst.setdefault(key(r), r)
        for kk, a in first_a.items():
            b = first_b.get(kk)
            if b is None:
                continue
            ib = (b.get("loop_model") or {}).get("instr_per_score", "")
            ia = (a.get("loop_model") or {}).get("instr_per_score", "")
            lines.append(f"| {a['kernel']} | {a['dtype']} {a['feature']} D={a['head_dim']} | {b['registers']} | "
                         f"{a['registers']} | {b['stack_bytes']} | {a['stack_bytes']} | "
                         f"{b['sass'].get('LDG.16', 0)} | {a['sass'].get('LDG.16', 0)} | {ib} | {ia} | "
                         f"{b.get('useful_mma') or _useful_mma(b['head_dim'], {})} | {a.get('useful_mma', '')} |")
        lines.append("")
    lines += ["## Every compiled kernel", "", HEADER]
    lines += [_fmt_row(r) for r in rows]
    (out_dir / "sm90_profile.md").write_text("\n".join(lines) + "\n")


def run_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=commit,
                torch=torch.__version__, triton=triton.__version__, target="sm_90 (compile only, no GPU)",
                label=STATIC, h100_model=dict(H100, mma_flop_per_clk_sm=round(MMA_PER_CLK),
                                              exp_per_clk_sm=round(EXP_PER_CLK, 1),
                                              issue_per_clk_sm=ISSUE_PER_CLK))


def profile(out_dir: pathlib.Path, reduced: bool = False, attention_only: bool = False) -> List[dict]:
    attn, adaln, tokens = install()
    _REC.records.clear()
    run_attention(attn, reduced)
    if not attention_only:
        run_tokens_adaln(adaln, tokens, reduced)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(out_dir)
    info = run_info()
    baseline = None
    bpath = out_dir / "baseline" / "sm90_profile.json"
    if bpath.exists():
        baseline = json.loads(bpath.read_text())["records"]
    locality = gather_locality.from_compiled(_REC.records)
    (out_dir / "sm90_profile.json").write_text(json.dumps(dict(info=info, records=rows, gather_locality=locality),
                                                          indent=1) + "\n")
    write_markdown(rows, info, out_dir, baseline)
    with open(out_dir / "sm90_profile.md", "a") as f:
        f.write("\n" + gather_locality.markdown(locality))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--reduced", action="store_true", help="the reduced matrix CI checks")
    ap.add_argument("--attention-only", action="store_true")
    a = ap.parse_args(argv)
    if not (_BIN / "nvdisasm").exists():
        print(f"error: this triton wheel ships no nvdisasm under {_BIN}", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = profile(a.out, a.reduced, a.attention_only)
    spills = [r["cubin"] for r in rows if r["spills"]]
    print(f"{len(rows)} kernels compiled for sm_90 in {time.time() - t0:.0f} s -> {a.out} ({STATIC}s)")
    print(f"spilling: {len(spills)}" + "".join(f"\n  {s}" for s in spills))
    return 0


if __name__ == "__main__":
    sys.exit(main())
