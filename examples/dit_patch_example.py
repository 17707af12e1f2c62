"""Use edt-kernels inside a DiT code base: patch, check, add training-free AMM, time.

    python examples/dit_patch_example.py                 # DiT-S/2-like, 256 tokens
    python examples/dit_patch_example.py --depth 28 --hidden 1152 --heads 16 --preset DiT-XL/2

The DiT is built from timm's ``Attention`` / ``Mlp`` / ``PatchEmbed`` exactly as
the DiT repository does (``from timm.models.vision_transformer import ...``);
without timm a local copy with the same semantics is used (and declared to the
patcher with ``targets={Attention: "timm"}``).  Weights are random: the point
is that the patched model computes the same function, and how fast.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import edt_kernels
from edt_kernels import apply_amm, patch_model, unpatch_model

try:
    from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

    HAVE_TIMM = True
except Exception:  # timm (or the torchvision it imports) is not usable here
    HAVE_TIMM = False

    class Attention(nn.Module):
        """timm ``Attention`` semantics (non-fused path)."""

        def __init__(self, dim, num_heads=8, qkv_bias=False):
            super().__init__()
            self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.attn_drop = nn.Dropout(0.0)
            self.proj = nn.Linear(dim, dim)
            self.proj_drop = nn.Dropout(0.0)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
            return self.proj_drop(self.proj(x))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), nn.Linear(hidden_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                       A DiT (facebookresearch/DiT layout)                     #
#################################################################################

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden, hidden_features=4 * hidden, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden=384, depth=12, heads=6, num_classes=1000):
        super().__init__()
        self.p, self.out_channels = patch_size, in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden, bias=True)
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Embedding(num_classes + 1, hidden)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.x_embedder.num_patches, hidden), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads) for _ in range(depth)])
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(hidden, patch_size * patch_size * in_channels)
        # Random (not DiT's zero) adaLN init, so that every attention reaches the output.

    @staticmethod
    def timestep_features(t, dim=256, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self.t_mlp(self.timestep_features(t)) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))  # (B, N, p*p*C)
        B, N, _ = x.shape
        h = int(N ** 0.5)
        x = x.reshape(B, h, h, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.out_channels, h * self.p, h * self.p)


#################################################################################
#                                    helpers                                    #
#################################################################################

def dense_amm_forward(attn, M):
    """The eager DiT-with-AMM attention: (softmax(q k^T scale) ⊙ M) v, M materialised."""

    def forward(x):
        B, N, C = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        p = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1) * M
        return attn.proj((p @ v).transpose(1, 2).reshape(B, N, C))

    return forward


def timeit(fn, iters, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
    return (time.perf_counter() - t0) / iters * 1e3


def backend_in_use(model, x, t, y):
    from edt_kernels.attention import select_backend, validate_inputs

    attn = model.blocks[0].attn
    B, N = x.shape[0], model.x_embedder.num_patches
    D = attn.qkv.in_features // attn.num_heads
    q = torch.empty(B, attn.num_heads, N, D, device=x.device, dtype=x.dtype)
    return select_backend(validate_inputs(q, q, q)).name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px images)")
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    ap.add_argument("--preset", default="DiT-S/2", choices=sorted(edt_kernels.AMM_PRESETS))
    ap.add_argument("--iters", type=int, default=None, help="default: 20 on CUDA, 2 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    args.batch = args.batch or (8 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 2)
    torch.manual_seed(0)
    model = DiT(args.input_size, 2, 4, args.hidden, args.depth, args.heads).to(device, dtype).eval()
    x = torch.randn(args.batch, 4, args.input_size, args.input_size, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    N = model.x_embedder.num_patches
    print(f"DiT: depth {args.depth}, hidden {args.hidden}, heads {args.heads}, N = {N} tokens, batch {args.batch}, "
          f"{args.dtype} on {device} ({'timm' if HAVE_TIMM else 'local timm-compatible'} Attention)")

    with torch.no_grad():
        ref = model(x, t, y)
    t_orig = timeit(lambda: model(x, t, y), args.iters, device)

    # 1. patch: same weights, same outputs
    targets = None if HAVE_TIMM else {Attention: "timm"}
    report = patch_model(model, targets=targets)
    print(report.__str__().splitlines()[0])
    backend = backend_in_use(model, x, t, y)
    print(f"amm_attention backend for these inputs: {backend}")
    with torch.no_grad():
        out = model(x, t, y)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (out - ref).abs().max().item()
    print(f"patched vs original: max |diff| = {err:.2e} ({'OK' if err < tol * max(1.0, ref.abs().max().item()) else 'MISMATCH'})")
    t_patched = timeit(lambda: model(x, t, y), args.iters, device)

    # 2. training-free AMM at the published placement
    handle = apply_amm(model, args.preset) if len(model.blocks) == edt_kernels.AMM_PRESETS[args.preset][0] \
        else apply_amm(model, [i for i in edt_kernels.AMM_PRESETS[args.preset][1] if i < len(model.blocks)])
    print(f"AMM on {handle.names}")
    with torch.no_grad():
        out_amm = model(x, t, y)
    t_amm = timeit(lambda: model(x, t, y), args.iters, device)

    # 3. the same with the authors' eager recipe (dense M multiplied after the softmax)
    amm_modules = handle.modules
    handle.undo()
    unpatch_model(report)
    M = edt_kernels.modulation_matrix(int(N ** 0.5), device=device, dtype=dtype)
    for m in amm_modules:
        m.forward = dense_amm_forward(m, M)
    with torch.no_grad():
        out_dense = model(x, t, y)
    t_dense = timeit(lambda: model(x, t, y), args.iters, device)
    for m in amm_modules:
        del m.forward
    err = (out_amm - out_dense).abs().max().item()
    print(f"fused AMM vs eager dense AMM: max |diff| = {err:.2e}; AMM changes the output by "
          f"{(out_amm - ref).abs().max().item():.2e}")

    print(f"\n{'model forward':<40}{'ms':>10}")
    for name, ms in (("original (timm attention)", t_orig), ("patched (amm_attention)", t_patched),
                     (f"patched + AMM {args.preset}", t_amm), (f"eager DiT-with-AMM {args.preset}", t_dense)):
        print(f"{name:<40}{ms:>10.2f}")
    print(f"speed-up patched vs original: {t_orig / t_patched:.2f}x; "
          f"fused AMM vs eager AMM: {t_dense / t_amm:.2f}x")
    if backend == "torch":
        print("(backend 'torch' is the materialising PyTorch reference: no speed-up is expected from it; "
              "the Triton kernels run on CUDA devices, the C++ kernel on CPUs where it compiles)")


if __name__ == "__main__":
    main()
