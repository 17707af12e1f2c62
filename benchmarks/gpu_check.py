"""One-shot GPU check of the Triton kernels: correctness and the timings that settle the static profile.

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--parts ...] [--budget-s 300] [--steps-budget-s 240]

Meant for a fresh H100/H200 (torch + triton installed, nothing downloaded).  The
default budgets (300 s for the correctness, kernel and model sections, 240 s
more for the compiled steps, Triton's and Inductor's compile times included) fit
one 10-minute call on a lent machine; ``--parts`` reruns a part in a second one.
``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` are rewritten whole after every
section and every compiled-step mode, so a run cut short keeps what it finished.

Sections, each with its own time budget and ``try/except`` (a failure is
recorded with its error text, never turned into a number):

* correctness, bf16 and fp16 against a float64 reference: attention out, dq,
  dk, dv, d table, d bias (including a fully masked row); every token and adaLN
  op, output and input gradients, at C=1152 and C=936 (rows aligned to 8, not 16,
  elements: the launchers' alignment hints);
* attention forward at N=4096, D=64: none / table / AMM / table+AMM vs SDPA
  without bias; table+AMM at D=52, 64, 72;
* backward at B=32, H=16, N=256, D=72 with the table gradient on and off, with
  the Delta preprocess and each backward kernel timed alone (dK/dV, dQ and,
  with the table gradient on, the kernel that sums it over the batch);
* MDT masked attention (179 of 256 tokens) with random vs sorted positions
  (``random_masking(..., sort_kept=False / True)``), forward and forward + backward;
* token / adaLN bandwidth at C=1152 and C=936 vs a device copy;
* EDT-XL/2 vs MDTv2-XL/2: one training step and one CFG step at batch 32;
* compiled steps: EDT-S/B/XL and MDTv2-S/B/XL at batch 32, the trainer's step (both
  passes, loss, backward) and a CFG step, eager vs CUDA graphs (``reduce-overhead``)
  vs ``torch.compile``, in that order, each with the GPU's idle fraction within the
  step from ``torch.profiler`` (1 - device-busy time / wall time: near 0 means the
  GPU is fed, large means the step is host-bound), and for ``reduce-overhead`` the graphs
  Inductor declined to capture as CUDA graphs (``cudagraph_skips``: 0, or the row is not a
  CUDA-graph time); its own budget (``--steps-budget-s``).

Each timing sits beside its static estimate from ``benchmarks/profiling/sm90_profile.py``
(``benchmarks/results/sm90-static/sm90_profile.json``) where one applies.
Timing: CUDA events around each call after warm-up calls, median of the
repeats.  ``--dry-run`` runs the same code on the CPU with tiny shapes under
Triton's interpreter (no figure of it is a speed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback

PROFILE = pathlib.Path(__file__).resolve().parent / "results" / "sm90-static" / "sm90_profile.json"
PARTS = {  # --parts: groups of sections
    "correctness": ("correctness: attention", "correctness: token/adaLN"),
    "kernels": ("timing: attention forward", "timing: attention backward", "timing: MDT masked",
                "timing: token/adaLN bandwidth"),
    "models": ("timing: models",),
    "steps": ("timing: compiled steps",),
}


class Ctx:
    def __init__(self, dry: bool, budget_s: float, out: pathlib.Path):
        import torch
        self.torch = torch
        self.dry = dry
        self.out = out
        self.dev = torch.device("cpu" if dry else "cuda")
        self.info = run_info(self)  # the run's start, device, versions and commit: one read for every flush
        self.deadline = time.time() + budget_s
        self.sections = {}
        self.static = self._load_static()

    def _load_static(self):
        try:
            return json.loads(PROFILE.read_text())["records"]
        except (OSError, ValueError, KeyError):
            return []

    def static_estimate(self, kernel, feature, head_dim, dtype="bf16"):
        for r in self.static:
            if (r["kernel"] == kernel and r.get("feature") == feature and r.get("head_dim") == head_dim
                    and r.get("dtype") == dtype and not r.get("rejected_over_shared_limit")):
                m = r.get("loop_model") or {}
                return dict(bound=m.get("bound"), bound_tflops=m.get("bound_tflops"),
                            instr_per_score=m.get("instr_per_score"), registers=r["registers"],
                            spill_bytes=r["stack_bytes"], label="static estimate")
        return None

    def time_ms(self, fn, warmup=3, repeats=10):
        torch = self.torch
        if self.dry:
            warmup, repeats = 1, 1
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def section(self, name, budget_s, fn):
        start = time.time()
        left = self.deadline - start
        if left <= 0:
            self.sections[name] = dict(error="skipped: the overall time budget is spent")
            self.flush()
            return
        rows = []
        # what a process killed inside this section leaves on disk (see flush)
        self.sections[name] = dict(rows=rows, error="unfinished: the process ended inside this section")
        try:
            fn(rows, start + min(budget_s, left))
            self.sections[name] = dict(rows=rows, seconds=round(time.time() - start, 1))
        except Exception as exc:  # recorded, never a number
            self.sections[name] = dict(rows=rows, error=f"{type(exc).__name__}: {exc}",
                                       traceback=traceback.format_exc()[-2000:],
                                       seconds=round(time.time() - start, 1))
        self.flush()
        print(f"[{name}] {self.sections[name].get('error', 'ok')} ({time.time() - start:.1f} s)", flush=True)

    def flush(self):
        """Rewrites the results so far: a run cut short (a device call's time limit) keeps every section
        it finished, and the rows of the one it was in, marked unfinished."""
        write(self, self.out)


def _over(deadline):
    if time.time() > deadline:
        raise TimeoutError("section time budget spent")


def _rel_err(a, b):
    a, b = a.double(), b.double()
    fin = a.isfinite() & b.isfinite()
    same_nonfinite = bool(((~a.isfinite()) == (~b.isfinite())).all())
    scale = b[fin].abs().max().item() if fin.any() else 1.0
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    return err / max(scale, 1e-12), same_nonfinite


TOL = {"bfloat16": 4e-2, "float16": 1e-2, "float32": 1e-4}


# ----------------------------------------------------------------------------- correctness

def correctness_attention(c: Ctx, rows, deadline):
    torch = c.torch
    from edt_kernels import amm_attention
    B, H, side = (1, 2, 4) if c.dry else (2, 4, 16)
    dims = (16,) if c.dry else (52, 64, 72, 128)
    dtypes = (torch.float16, torch.float32) if c.dry else (torch.bfloat16, torch.float16)
    n_off = (2 * side - 1) ** 2
    for dt in dtypes:
        for D in dims:
            for case in ("table+amm", "table+amm+pos", "bias+masked_row"):
                _over(deadline)
                g = torch.Generator().manual_seed(D)
                N = side * side if "pos" not in case else side * side - 3
                qkv = torch.randn(B, N, 3, H, D, generator=g).to(c.dev, dt)
                qkv.requires_grad_(True)
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                kw = dict(grid=side)
                table = (torch.randn(n_off, H, generator=g) * 0.5).to(c.dev).requires_grad_(True)
                bias = None
                if "table" in case:
                    kw.update(rel_pos_bias=table, amm=True)
                if "pos" in case:
                    kw["positions"] = torch.stack([torch.randperm(side * side, generator=g)[:N]
                                                   for _ in range(B)]).to(c.dev)
                if "bias" in case:
                    bias = torch.randn(1, H, N, N, generator=g).to(c.dev)
                    bias[0, 0, 1, :] = float("-inf")  # a fully masked row: NaN, as in the reference
                    bias.requires_grad_(True)
                    kw["bias"] = bias
                out = amm_attention(q, k, v, backend="triton", **kw)
                dout = torch.randn(out.shape, generator=g).to(c.dev, dt)
                out.backward(dout)
                got = dict(out=out.detach(), dqkv=qkv.grad)
                if "table" in case:
                    got["dtable"] = table.grad
                if bias is not None:
                    got["dbias"] = bias.grad
                # float64 reference of the same call
                qkv64 = qkv.detach().double().cpu().requires_grad_(True)
                q6, k6, v6 = qkv64.permute(2, 0, 3, 1, 4).unbind(0)
                kw64 = {k_: (v_.detach().double().cpu().requires_grad_(True) if torch.is_tensor(v_)
                             and v_.is_floating_point() else (v_.cpu() if torch.is_tensor(v_) else v_))
                        for k_, v_ in kw.items()}
                o64 = amm_attention(q6, k6, v6, backend="torch", **kw64)
                o64.backward(dout.double().cpu())
                ref = dict(out=o64.detach(), dqkv=qkv64.grad)
                if "table" in case:
                    ref["dtable"] = kw64["rel_pos_bias"].grad
                if bias is not None:
                    ref["dbias"] = kw64["bias"].grad  # the masked row is NaN in both, like the output
                for name in got:
                    err, nf = _rel_err(got[name].float().cpu(), ref[name])
                    tol = TOL[str(dt).split(".")[-1]]
                    rows.append(dict(op="amm_attention", case=case, dtype=str(dt), head_dim=D, tensor=name,
                                     rel_err=err, tol=tol, ok=bool(err <= tol and nf)))


def correctness_tokens(c: Ctx, rows, deadline):
    """Every token and adaLN kernel, output and input gradients, against its float64 reference
    on the CPU.  C = 936 is a multiple of 8 but not of 16: its rows load as vectors only through
    the launchers' alignment hints, which this is the first check of on a GPU."""
    torch = c.torch
    import edt_kernels as ek
    from edt_kernels.reference import adaln as radaln
    from edt_kernels.reference import tokens as rtok
    B, side, K = (2, 4, 11) if c.dry else (8, 16, 179)
    L = side * side
    T = "triton"
    widths = (24,) if c.dry else (1152, 936)
    dtypes = (torch.float16, torch.float32) if c.dry else (torch.bfloat16, torch.float16)
    for dt in dtypes:
        tol = TOL[str(dt).split(".")[-1]]
        for C in widths:
            g = torch.Generator().manual_seed(C)

            def rnd(*shape):
                return torch.randn(*shape, generator=g)

            ids = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
            keep_ids, restore = ids[:, :K].contiguous(), torch.argsort(ids, dim=1)
            cases = {  # name: (kernel call, float64 reference, inputs[, the first input unaligned])
                "gather_tokens": (lambda x, i: ek.gather_tokens(x, i, backend=T), rtok.reference_gather_tokens,
                                  [rnd(B, L, C), keep_ids]),
                # hinted strides, x 2 bytes past a 16-byte boundary: Triton must keep the accesses scalar
                "gather_tokens, unaligned x": (lambda x, i: ek.gather_tokens(x, i, backend=T),
                                               rtok.reference_gather_tokens, [rnd(B, L, C), keep_ids], True),
                "scatter_tokens": (lambda y, i: ek.scatter_tokens(y, i, L, backend=T),
                                   lambda y, i: rtok.reference_scatter_tokens(y, i, L), [rnd(B, K, C), keep_ids]),
                "unshuffle_with_mask_token": (lambda *a: ek.unshuffle_with_mask_token(*a, backend=T),
                                              rtok.reference_unshuffle_with_mask_token,
                                              [rnd(B, K, C), restore, rnd(1, 1, C), rnd(1, L, C)]),
                "masked_shortcut": (lambda *a: ek.masked_shortcut(*a, backend=T), rtok.reference_masked_shortcut,
                                    [rnd(B, L, C), rnd(B, L, C), torch.rand(B, L, 1, generator=g)]),
                "layernorm_modulate": (lambda *a: ek.layernorm_modulate(*a, backend=T),
                                       lambda *a: radaln.reference_layernorm_modulate(*a, 1e-6),
                                       [rnd(B, L, C), rnd(B, C), rnd(B, C)]),
                "patch_merge_modulate": (lambda x, sh, sc: ek.patch_merge_modulate(x, sh, sc, grid=side, backend=T),
                                         lambda x, sh, sc: rtok.reference_patch_merge_modulate(x, sh, sc, grid=side),
                                         [rnd(B, L, C), rnd(B, 4 * C), rnd(B, 4 * C)]),
                "gated_residual": (lambda *a: ek.gated_residual(*a, backend=T), radaln.reference_gated_residual,
                                   [rnd(B, L, C), rnd(B, C), rnd(B, L, C)]),
            }
            for name, (fn, ref_fn, inputs, *unaligned) in cases.items():
                _over(deadline)
                ins = [t.to(c.dev, dt).requires_grad_() if t.is_floating_point() else t.to(c.dev) for t in inputs]
                if unaligned:
                    x = torch.empty(ins[0].numel() + 1, device=c.dev, dtype=dt)[1:].view(ins[0].shape)
                    ins[0] = x.copy_(ins[0].detach()).requires_grad_()
                ins64 = [t.detach().cpu().double().requires_grad_() if t.is_floating_point() else t.cpu()
                         for t in ins]  # the values the kernel reads
                out, ref = fn(*ins), ref_fn(*ins64)
                dout = torch.randn(ref.shape, generator=g)
                want = [t for t in ins if t.requires_grad]
                got = dict(zip(["out"] + [f"d{i}" for i in range(len(want))],
                               [out.detach(), *torch.autograd.grad(out, want, dout.to(c.dev, out.dtype))]))
                exp = dict(zip(got, [ref.detach(), *torch.autograd.grad(ref, [t for t in ins64 if t.requires_grad],
                                                                        dout.double())]))
                for tensor in got:
                    err, nf = _rel_err(got[tensor].float().cpu(), exp[tensor])
                    rows.append(dict(op=name, dtype=str(dt), C=C, tensor=tensor, rel_err=err, tol=tol,
                                     ok=bool(err <= tol and nf)))
            _over(deadline)  # MDT's masking: the same draws on the device, so the kept rows are equal
            x = rnd(B, L, C).to(c.dev, dt).requires_grad_()
            got = ek.random_masking(x, 0.3, torch.Generator(c.dev.type).manual_seed(C), sort_kept=True,
                                   backend=T)
            want = rtok.reference_random_masking(x, 0.3, torch.Generator(c.dev.type).manual_seed(C), sort_kept=True)
            dout = torch.randn(got[0].shape, generator=g).to(c.dev, dt)
            same = [torch.equal(a, b) for a, b in zip(got, want)]
            same.append(torch.equal(*(torch.autograd.grad(o[0], x, dout)[0] for o in (got, want))))
            rows.append(dict(op="random_masking", dtype=str(dt), C=C, tensor="x_kept, mask, restore, ids, dx",
                             rel_err=0.0 if all(same) else None, tol=0.0, ok=all(same)))


# ----------------------------------------------------------------------------- timings

def _attn_inputs(c: Ctx, B, H, N, D, side, dt):
    torch = c.torch
    qkv = torch.randn(B, N, 3, H, D, device=c.dev, dtype=dt)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    table = torch.randn((2 * side - 1) ** 2, H, device=c.dev) * 0.5
    return qkv, q, k, v, table


def timing_forward(c: Ctx, rows, deadline):
    torch = c.torch
    from edt_kernels import amm_attention
    dt = torch.float16 if c.dry else torch.bfloat16
    B, H, side = (1, 2, 4) if c.dry else (4, 16, 64)
    N = side * side
    base = 16 if c.dry else 64
    plan = [(base, ("none", "table", "amm", "table+amm"))]
    plan += [(d, ("table+amm",)) for d in (() if c.dry else (52, 72))]
    for d, feats in plan:
        _, q, k, v, table = _attn_inputs(c, B, H, N, d, side, dt)
        flops = 4 * B * H * N * N * d
        if d == base:
            _over(deadline)
            ms = c.time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            rows.append(dict(op="sdpa (no bias)", head_dim=d, N=N, ms=ms, tflops=flops / ms / 1e9))
        for f in feats:
            _over(deadline)
            kw = dict(grid=side)
            if "table" in f:
                kw["rel_pos_bias"] = table
            if "amm" in f:
                kw["amm"] = True
            ms = c.time_ms(lambda: amm_attention(q, k, v, backend="triton", **kw))
            rows.append(dict(op="amm_attention fwd", feature=f, head_dim=d, N=N, ms=ms,
                             tflops=flops / ms / 1e9,
                             static=c.static_estimate("_amm_attn_fwd_kernel", f, d)))


def timing_backward(c: Ctx, rows, deadline):
    torch = c.torch
    from edt_kernels.ops import amm_attention as attn
    dt = torch.float16 if c.dry else torch.bfloat16
    B, H, side, D = (1, 2, 4, 16) if c.dry else (32, 16, 16, 72)
    N = side * side
    _, q, k, v, table = _attn_inputs(c, B, H, N, D, side, dt)
    amm_tab = None
    from edt_kernels.amm import AMM, cached_amm_offset_table
    amm_tab = cached_amm_offset_table((side, side), AMM(), device=c.dev)
    out, lse = attn.amm_attention_forward(q, k, v, table, None, amm_tab, None, None, D ** -0.5, side, side)
    dout = torch.randn_like(out)
    per_kernel = {}
    orig = attn._launch_tiled

    def timed(kernel, *a, **kw):  # each backward kernel alone, inside the real launcher
        if c.dev.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            orig(kernel, *a, **kw)
            e.record()
            e.synchronize()
            per_kernel.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), []).append(
                s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            orig(kernel, *a, **kw)
            per_kernel.setdefault(getattr(kernel, "__name__", str(kernel)), []).append(
                (time.perf_counter() - t0) * 1e3)

    flops = 10 * B * H * N * N * D  # backward = 2.5x the forward's 4 B H N^2 D
    for need in (True, False):
        _over(deadline)

        def backward(need=need):
            attn.amm_attention_backward(dout, q, k, v, out, lse, table, None, amm_tab, None, None, D ** -0.5,
                                        side, side, need, False)

        ms = c.time_ms(backward)  # the total with the launches back to back, as in a step
        per_kernel.clear()
        attn._launch_tiled = timed  # then each kernel alone: a sync after each, so timed apart
        try:
            c.time_ms(backward)
        finally:
            attn._launch_tiled = orig
        rows.append(dict(op="backward total", need_dtable=need, B=B, H=H, N=N, head_dim=D, ms=ms,
                         tflops=flops / ms / 1e9,
                         kernels_ms={k_: statistics.median(v_) for k_, v_ in per_kernel.items()},
                         static=dict(dkdv=c.static_estimate("_amm_attn_bwd_dkdv_kernel", "table+amm", D),
                                     dq=c.static_estimate("_amm_attn_bwd_dq_kernel", "table+amm", D),
                                     dtable=c.static_estimate("_amm_attn_bwd_dtable_kernel", "table+amm", D))))
    delta = torch.empty(lse.shape, device=c.dev, dtype=torch.float32)
    bd = max(16, 1 << (D - 1).bit_length())
    ms = c.time_ms(lambda: attn._amm_attn_bwd_delta_kernel[(B * H * math.ceil(N / 64),)](
        out, dout, delta, H, N, *out.stride(), *dout.stride(), BLOCK_M=64, BLOCK_D=bd, HEAD_DIM=D,
        ALIGN=attn.alignment(out, dout), num_warps=4))
    rows.append(dict(op="delta preprocess", ms=ms, gbps=2 * out.numel() * out.element_size() / ms / 1e6))


def _static_locality(dry: bool):
    """Table-gather locality (lines per warp-load and per tile, a static
    estimate) by positions case: the profile's (the compiled kernel's layout of
    the table load), else computed here with the default layout."""
    try:
        loc = json.loads(PROFILE.read_text())["gather_locality"]
    except (OSError, ValueError, KeyError, TypeError):
        from benchmarks.profiling import gather_locality
        loc = gather_locality.locality(batch=2 if dry else 8)
    return {name: dict(table_lines_per_warp_load=v["table_lines_per_warp_load"],
                       table_lines_per_tile=v["table_lines_per_tile"], layout=loc["layout_source"],
                       shape=f"{loc['grid']} grid, {loc['kept']} of {loc['of']} kept", label=loc["label"])
            for name, v in loc["cases"].items()}


def timing_masked(c: Ctx, rows, deadline):
    """MDT's masked-training attention: K of L tokens kept by ``random_masking``,
    in the order of the random draw (``sort_kept=False``, the authors' order) or
    in grid order (``sort_kept=True``, MDTv2's default); relative-position table,
    no AMM (MDTv2 applies AMM in eval mode only); forward, then forward +
    backward with the table gradient."""
    torch = c.torch
    from edt_kernels import amm_attention, random_masking
    dt = torch.float16 if c.dry else torch.bfloat16
    B, H, side, D, K = (1, 2, 4, 16, 11) if c.dry else (32, 16, 16, 72, 179)
    L = side * side
    ratio = 1.0 - (K + 0.5) / L  # int(L * (1 - ratio)) == K, MDT's len_keep expression
    qkv, q, k, v, table = _attn_inputs(c, B, H, K, D, side, dt)
    dout = torch.randn_like(q)
    tokens = torch.zeros(B, L, 1, device=c.dev)  # only the kept ids are used
    static = _static_locality(c.dry)
    positions = {}
    for name, sort in (("random", False), ("sorted", True)):
        pos = random_masking(tokens, ratio, torch.Generator(c.dev.type).manual_seed(0), sort_kept=sort)[3]
        if pos.shape[1] != K:
            raise RuntimeError(f"random_masking kept {pos.shape[1]} tokens, expected {K}")
        positions[name] = (sort, pos)
    if not torch.equal(positions["sorted"][1], positions["random"][1].sort(1).values):
        raise RuntimeError("sort_kept=True did not give the random draw's kept set in ascending order")
    for name, (sort, pos) in positions.items():
        _over(deadline)
        ms = c.time_ms(lambda: amm_attention(q, k, v, rel_pos_bias=table, grid=side, positions=pos,
                                             backend="triton"))
        rows.append(dict(op="MDT masked fwd", positions=name, sort_kept=sort, kept=K, of=L, B=B, H=H, head_dim=D,
                         ms=ms, static=static.get(name)))
    qkv_g, table_g = qkv.detach().requires_grad_(), table.detach().requires_grad_()
    qg, kg, vg = qkv_g.permute(2, 0, 3, 1, 4).unbind(0)
    for name, (sort, pos) in positions.items():
        _over(deadline)

        def step():
            out = amm_attention(qg, kg, vg, rel_pos_bias=table_g, grid=side, positions=pos, backend="triton")
            torch.autograd.grad(out, (qkv_g, table_g), dout)

        ms = c.time_ms(step)
        rows.append(dict(op="MDT masked fwd+bwd (table grad)", positions=name, sort_kept=sort, kept=K, of=L, B=B,
                         H=H, head_dim=D, ms=ms, static=static.get(name)))


def timing_tokens(c: Ctx, rows, deadline):
    torch = c.torch
    import edt_kernels as ek
    dt = torch.float16 if c.dry else torch.bfloat16
    B, L = (2, 16) if c.dry else (32, 256)
    for C in ((24,) if c.dry else (1152, 936)):
        _over(deadline)
        x = torch.randn(B, L, C, device=c.dev, dtype=dt)
        dst = torch.empty_like(x)
        nbytes = x.numel() * x.element_size()
        ms = c.time_ms(lambda: dst.copy_(x))
        rows.append(dict(op="device copy", C=C, ms=ms, gbps=2 * nbytes / ms / 1e6))
        sh, sc = torch.randn(B, C, device=c.dev, dtype=dt), torch.randn(B, C, device=c.dev, dtype=dt)
        ms = c.time_ms(lambda: ek.layernorm_modulate(x, sh, sc))
        rows.append(dict(op="layernorm_modulate", C=C, ms=ms, gbps=2 * nbytes / ms / 1e6))
        ms = c.time_ms(lambda: ek.gated_residual(x, sh, dst))
        rows.append(dict(op="gated_residual", C=C, ms=ms, gbps=3 * nbytes / ms / 1e6))
        keep = torch.rand(B, L, device=c.dev) < 0.7
        ms = c.time_ms(lambda: ek.masked_shortcut(x, dst, keep))
        rows.append(dict(op="masked_shortcut", C=C, ms=ms, gbps=3 * nbytes / ms / 1e6))


def _peak_mib(c: Ctx, fn):
    """CUDA: torch.cuda.max_memory_allocated over one call minus what was allocated
    before it (MiB); None on the CPU dry run."""
    torch = c.torch
    if c.dev.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def timing_models(c: Ctx, rows, deadline):
    torch = c.torch
    import edt.models as em  # lazily: the public registries and forward(x, t, y) only
    import edt_kernels
    from edt.utils import frozen
    if c.dry:  # attention through the PyTorch reference on the CPU (no C++ extension build)
        edt_kernels.set_backend("torch")
    B = 2 if c.dry else 32
    names = (("EDT-S/2", em.EDT_models), ("MDTv2-S/2", em.MDTv2_models)) if c.dry else (
        ("EDT-XL/2", em.EDT_models), ("MDTv2-XL/2", em.MDTv2_models))
    for name, reg in names:
        _over(deadline)
        res = 8 if c.dry else 32  # latent side (32 = 256 px images)
        model = reg[name](input_size=res).to(c.dev)
        x = torch.randn(B, 4, res, res, device=c.dev)
        t = torch.randint(0, 1000, (B,), device=c.dev)
        y = torch.randint(0, 1000, (B,), device=c.dev)
        ctx = torch.autocast(c.dev.type, dtype=torch.bfloat16) if not c.dry else torch.autocast("cpu", enabled=False)

        def train_step():
            with ctx:
                out = model(x, t, y)
            (out.float() ** 2).mean().backward()

        def cfg_step():
            with torch.no_grad(), frozen(model), ctx:  # as edt.sample's model
                model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)]))

        ms = c.time_ms(train_step, warmup=1, repeats=3)
        rows.append(dict(op="train step", model=name, batch=B, ms=ms, peak_mib=_peak_mib(c, train_step)))
        if name.startswith("EDT"):  # the same step with every block checkpointed (memory vs time)
            from edt.models.checkpointing import parse_checkpoint

            model.checkpoint = parse_checkpoint("all")
            ms = c.time_ms(train_step, warmup=1, repeats=3)
            rows.append(dict(op="train step, checkpoint=all", model=name, batch=B, ms=ms,
                             peak_mib=_peak_mib(c, train_step)))
            model.checkpoint = parse_checkpoint(None)
        rows.append(dict(op="CFG step (2B forward)", model=name, batch=B, ms=c.time_ms(cfg_step, warmup=1,
                                                                                      repeats=3)))
        del model


STEP_MODELS = ("EDT-S/2", "MDTv2-S/2", "EDT-B/2", "MDTv2-B/2", "EDT-XL/2", "MDTv2-XL/2")


def _busy_ms(prof) -> float:
    """Milliseconds in which the device ran something (the union of its kernel / copy intervals)."""
    from torch.autograd import DeviceType
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, -math.inf
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3


def _idle_fraction(c: Ctx, fn, steps: int):
    """1 - (device busy time / wall time) over ``steps`` calls of ``fn`` under torch.profiler (None
    without a device): near 0 when the device is kept fed, large when the step is host-bound."""
    torch = c.torch
    if c.dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    return max(0.0, 1.0 - _busy_ms(prof) / wall_ms)


def timing_compiled_steps(c: Ctx, rows, deadline):
    """Training step (the trainer's two passes, loss, backward; no optimizer step) and CFG step of
    EDT-S/B/XL and MDTv2-S/B/XL at batch 32: eager kernels vs torch.compile (Inductor) vs
    CUDA graphs (mode reduce-overhead), with the device's idle fraction within the step.  The
    draws are made ahead of the step as edt.train does.  Dry run: EDT-S and MDTv2-S at tiny widths,
    batch 2, compiled with the aot_eager backend (the same tracing, no code generation)."""
    torch = c.torch
    import edt.models as em
    from edt.diffusion import create_diffusion
    from edt.train import DiffusionTrainingLoss
    from edt.utils import compile_step, frozen
    from torch._dynamo.utils import counters

    if c.dry:
        os.environ["EDT_KERNELS_BACKEND"] = "torch"
    B = 2 if c.dry else 32
    res = 8 if c.dry else 32
    names = STEP_MODELS[:2] if c.dry else STEP_MODELS
    # CUDA graphs right after eager: the pair the host-cost targets compare, first should the budget run out
    modes = ("none", "default") if c.dry else ("none", "reduce-overhead", "default")
    diffusion = create_diffusion("")
    for name in names:
        reg = em.EDT_models if name.startswith("EDT") else em.MDTv2_models
        small = dict(hidden_size=32, depth=4, num_heads=2, decode_layer=2) if name.startswith("MDT") else \
            dict(hidden_size=16, dims=[16, 24, 32, 24, 16], num_heads=[2, 2, 2, 2, 2])
        model = reg[name](input_size=res, **(small if c.dry else {})).to(c.dev)
        loss = DiffusionTrainingLoss(model, diffusion, "edt" if name.startswith("EDT") else "mdt")
        g = torch.Generator(device=c.dev).manual_seed(0)
        x = torch.randn(B, 4, res, res, device=c.dev, generator=g)
        t = torch.randint(0, 1000, (B,), device=c.dev, generator=g)
        y = torch.randint(0, 1000, (B,), device=c.dev, generator=g)
        n1, n2 = torch.randn(x.shape, device=c.dev, generator=g), torch.randn(x.shape, device=c.dev, generator=g)
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)])
        amp = torch.autocast(c.dev.type, dtype=torch.bfloat16, enabled=not c.dry)
        base = {}
        for mode in modes:
            if time.time() > deadline:
                rows.append(dict(model=name, mode=mode, error="skipped: section time budget spent"))
                continue
            try:
                if c.dry and mode != "none":
                    train_fn = torch.compile(loss, fullgraph=True, backend="aot_eager")
                    cfg_fn = torch.compile(model.forward_with_cfg, fullgraph=True, backend="aot_eager")
                else:
                    train_fn = compile_step(loss, mode, c.dev)
                    cfg_fn = compile_step(model.forward_with_cfg, mode, c.dev)
                step_gen = torch.Generator(device=c.dev).manual_seed(1)

                def train_step():
                    if mode == "reduce-overhead":
                        torch.compiler.cudagraph_mark_step_begin()
                    model.train()
                    draws = loss.draw_ahead(B, step_gen, c.dev)
                    with amp:
                        out = train_fn(x, y, t, n1, n2, draws)
                    out[0].backward()
                    model.zero_grad(set_to_none=True)

                def cfg_step():
                    if mode == "reduce-overhead":
                        torch.compiler.cudagraph_mark_step_begin()
                    model.eval()
                    with torch.no_grad(), frozen(model), amp:  # as edt.sample's model
                        cfg_fn(x2, t2, y2, 1.5)

                for step, fn in (("train", train_step), ("cfg", cfg_step)):
                    skips = counters["inductor"]["cudagraph_skips"]
                    t0 = time.time()
                    for _ in range(1 if c.dry else 3):  # compilation, autotuning, CUDA-graph recording
                        fn()
                    warm_s = time.time() - t0
                    ms = c.time_ms(fn, warmup=1, repeats=10)
                    base.setdefault(step, ms)
                    # graphs Inductor declined to capture (a host tensor, a mutated input, ...): with any,
                    # the reduce-overhead row is not a CUDA-graph time
                    skipped = counters["inductor"]["cudagraph_skips"] - skips
                    rows.append(dict(model=name, step=step, mode=mode, batch=B, ms=ms,
                                     speedup_vs_eager=base[step] / ms, warmup_s=round(warm_s, 1),
                                     idle_fraction=_idle_fraction(c, fn, 1 if c.dry else 5),
                                     cudagraph_skips=skipped if mode == "reduce-overhead" else None))
            except Exception as exc:  # recorded per (model, mode), never a number
                rows.append(dict(model=name, mode=mode, error=f"{type(exc).__name__}: {exc}"[:500]))
            finally:
                torch._dynamo.reset()
                c.flush()
        del model, loss


# ----------------------------------------------------------------------------- output

def run_info(c: Ctx):
    import torch
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=pathlib.Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    dev = torch.cuda.get_device_name() if c.dev.type == "cuda" else f"CPU {platform.processor()} (dry run)"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=commit or "unknown", device=dev, torch=torch.__version__, triton=triton.__version__,
                dry_run=c.dry, note=("dry run: interpreter on CPU, tiny shapes; no figure is a speed"
                                     if c.dry else "CUDA-event timings, median of repeats after warm-up"))


def _replace(path: pathlib.Path, text: str) -> None:
    """``path`` gets ``text`` whole or not at all (a kill between two flushes leaves the previous one)."""
    from edt.utils import atomic_write

    atomic_write(path, lambda f: f.write(text.encode()))


def write(c: Ctx, out: pathlib.Path):
    out.mkdir(parents=True, exist_ok=True)
    info = c.info
    _replace(out / "gpu_check.json", json.dumps(dict(info=info, sections=c.sections), indent=1, default=str) + "\n")
    lines = [f"# gpu_check: {info['device']}", "", " · ".join(f"{k} {v}" for k, v in info.items()), ""]
    for name, sec in c.sections.items():
        lines += [f"## {name}", ""]
        if sec.get("error"):
            lines += [f"**error**: `{sec['error']}`", ""]
        for r in sec.get("rows", []):
            lines.append("- " + ", ".join(f"{k}={(f'{v:.4g}' if isinstance(v, float) else v)}"
                                          for k, v in r.items()))
        lines.append("")
    _replace(out / "gpu_check.md", "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="time budget of the correctness, kernel and model sections together (default 300 s)")
    ap.add_argument("--steps-budget-s", type=float, default=240.0,
                    help="budget of the compiled-steps section, on top of --budget-s (eager / CUDA graphs / "
                         "compiled, S then B then XL; what does not fit is recorded as skipped; default 240 s)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="which sections run (default all): " + "; ".join(f"{k}: {', '.join(v)}"
                                                                          for k, v in PARTS.items()))
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    from edt_kernels._triton_support import triton_unavailable_reason

    why = triton_unavailable_reason()  # every section runs the Triton kernels: one reason, not one per section
    if why is not None:
        print(f"error: the Triton kernels cannot run here{' (--dry-run: interpreter)' if a.dry_run else ''}: "
              f"{why}", file=sys.stderr)
        return 2
    c = Ctx(a.dry_run, a.budget_s, a.out)
    sections = {  # name: (section budget s, function), in the order they run
        "correctness: attention": (120, correctness_attention),
        "correctness: token/adaLN": (60, correctness_tokens),
        "timing: attention forward": (90, timing_forward),
        "timing: attention backward": (60, timing_backward),
        "timing: MDT masked": (45, timing_masked),
        "timing: token/adaLN bandwidth": (20, timing_tokens),
        "timing: models": (120, timing_models),
        "timing: compiled steps": (a.steps_budget_s, timing_compiled_steps),
    }
    chosen = {name for part in a.parts for name in PARTS[part]}
    for name, (budget, fn) in sections.items():
        if name not in chosen:
            continue
        if name == "timing: compiled steps":
            c.deadline = max(c.deadline, time.time()) + a.steps_budget_s  # its own budget, beyond --budget-s
        c.section(name, budget, lambda r, d, fn=fn: fn(c, r, d))
    bad = [n for n, s in c.sections.items() if s.get("error")]
    bad += [f"{r.get('op')} {r.get('tensor', '')}" for n, s in c.sections.items() for r in s.get("rows", [])
            if r.get("ok") is False]
    print(f"wrote {a.out}/gpu_check.json, .md; problems: {bad if bad else 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
