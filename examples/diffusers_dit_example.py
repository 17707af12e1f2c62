"""edt-kernels inside a diffusers DiTPipeline: patch, check, add training-free AMM, time, undo.

    python examples/diffusers_dit_example.py                          # tiny random pipeline, no download
    python examples/diffusers_dit_example.py --pretrained ./DiT-XL-2-256 --steps 25 --preset DiT-XL/2

Without ``--pretrained`` the pipeline is built from configs with random weights
(a DiT transformer of 12 blocks, a one-level VAE, a DDIM scheduler): the point
is that the patched pipeline draws the same images, and how fast.  With
``--pretrained DIR`` it loads ``DiTPipeline.from_pretrained(DIR)``, a local copy
of ``facebook/DiT-XL-2-256`` (``huggingface-cli download facebook/DiT-XL-2-256
--local-dir DIR`` on a machine with network access), whose transformer has the
28 blocks the ``DiT-XL/2`` preset (blocks 15, 17, 19, 22, 24) is for.

The timings are wall-clock seconds of whole pipeline calls on the device used
(the fastest of ``--repeat``; a busy machine makes them noisy); on a CPU the
attention runs on amm_attention's CPU backends, not the GPU kernels.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import edt_kernels
from edt_kernels import apply_amm, patch_model


def tiny_pipeline(sample_size: int, num_layers: int, seed: int = 0):
    """A random DiTPipeline from configs: the layout of DiT-XL-2-256, much smaller."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,  # 8: learned sigma
        num_layers=num_layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():  # random, not zero-initialised adaLN: every attention reaches the output
        for p in transformer.parameters():
            p.normal_(0.0, 0.05)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        layers_per_block=1, norm_num_groups=32, sample_size=sample_size)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    # eval mode, as from_pretrained leaves it (training mode would drop class labels at random)
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)


def generate(pipe, labels, steps: int, seed: int, repeat: int = 1):
    """Images (numpy, [B, H, W, 3]) and the fastest of ``repeat`` pipeline calls, in seconds."""
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        images = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images
        sync()
        best = min(best, time.perf_counter() - t0)
    return images, best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", default=None, metavar="DIR",
                    help="local folder of a DiTPipeline (e.g. facebook/DiT-XL-2-256); default: tiny random")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    ap.add_argument("--labels", type=int, nargs="+", default=[207, 360], help="ImageNet class ids")
    ap.add_argument("--preset", default=None, choices=sorted(edt_kernels.AMM_PRESETS),
                    help="AMM placement (default: DiT-XL/2 for 28 blocks, else DiT-S/2)")
    ap.add_argument("--sample-size", type=int, default=16, help="tiny pipeline: latent side (default 16)")
    ap.add_argument("--layers", type=int, default=12, help="tiny pipeline: transformer blocks (default 12)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per variant, the fastest is shown")
    args = ap.parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("error: this example needs diffusers: pip install 'edt-kernels[diffusers]'", file=sys.stderr)
        sys.exit(2)
    from diffusers import DiTPipeline

    dtype = getattr(torch, args.dtype)
    if args.pretrained:
        pipe = DiTPipeline.from_pretrained(args.pretrained, torch_dtype=dtype)
    else:
        pipe = tiny_pipeline(args.sample_size, args.layers, args.seed)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    depth = len(transformer.transformer_blocks)
    preset = args.preset or ("DiT-XL/2" if depth == 28 else "DiT-S/2")
    blocks = preset if edt_kernels.AMM_PRESETS[preset][0] == depth else \
        [i for i in edt_kernels.AMM_PRESETS[preset][1] if i < depth]
    n_tokens = (transformer.config.sample_size // transformer.config.patch_size) ** 2
    print(f"DiTPipeline: {'pretrained ' + args.pretrained if args.pretrained else 'tiny random'}; "
          f"{depth} blocks, {n_tokens} tokens, batch {len(args.labels)} (x2 for guidance), "
          f"{args.steps} steps, {args.dtype} on {args.device}")

    generate(pipe, args.labels, 1, args.seed)  # warm-up
    stock, t_stock = generate(pipe, args.labels, args.steps, args.seed, args.repeat)

    # 1. patch: every self-attention of the transformer through amm_attention, same images
    report = patch_model(pipe)
    print(report)
    patched, t_patched = generate(pipe, args.labels, args.steps, args.seed, args.repeat)
    err = float(abs(patched - stock).max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    print(f"patched vs stock images: max |diff| = {err:.2e} ({'OK' if err < tol else 'MISMATCH'})")

    # 2. training-free AMM at the published placement
    handle = apply_amm(pipe, blocks)
    print(f"AMM on {handle.names}")
    with_amm, t_amm = generate(pipe, args.labels, args.steps, args.seed, args.repeat)
    amm_change = float(abs(with_amm - stock).max())
    print(f"AMM changes the images by max |diff| = {amm_change:.3g}")

    # 3. undo: the original processors, the stock images again
    handle.undo()
    report.undo()
    again, _ = generate(pipe, args.labels, args.steps, args.seed)
    undo_exact = bool((again == stock).all())
    print(f"after undo: {'identical to stock' if undo_exact else 'DIFFERENT from stock'}")

    print(f"\n{'pipeline call':<32}{'s':>10}")
    for name, s in (("stock (AttnProcessor2_0)", t_stock), ("patched (amm_attention)", t_patched),
                    (f"patched + AMM {preset}", t_amm)):
        print(f"{name:<32}{s:>10.3f}")
    return {"patched_max_diff": err, "amm_max_change": amm_change, "undo_exact": undo_exact,
            "amm_blocks": handle.names, "patched": len(report)}


if __name__ == "__main__":
    main()
