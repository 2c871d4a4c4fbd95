"""Benchmark: latent diffusion training and sampling throughput (issue 6).

For each network (the tiny U-ViT and SiT on a CPU; U-ViT-S/2 and SiT-B/2 on 4x32x32 latents
on a GPU), measured side by side in one process:
- training: one optimiser step of the real loss (process interpolation, network forward and
  backward, AdamW, EMA) in latents/s, and the same step of timm's `VisionTransformer` of equal
  width, depth, heads and token count as the reference backbone: the ratio says what our
  networks' extras (time/class conditioning, adaLN-Zero, long skips, unpatchify) cost over a
  plain, well-optimised ViT;
- sampling: network evaluations per second (NFE/s) and images/s of the process's default
  sampler (DPM-Solver for the VP U-ViT, Euler-Maruyama for SiT) without decoding;
- achieved TFLOP/s on a GPU (FLOPs counted by torch.utils.flop_counter, so the figure is
  model FLOPs per second, not a vendor's peak).
Rounds alternate ours / reference, and the median over rounds is reported.

    PYTHONPATH=src python bench/diffusion.py --device cpu
    PYTHONPATH=src python bench/diffusion.py --device cuda --json results/bench_diffusion.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from timm.models.vision_transformer import VisionTransformer

from specmatch.diffusion import models, samplers, transport

CPU_CASES = [("UViT-tiny/2", "vp-linear", 0, 4, 16, 64), ("SiT-tiny/2", "linear", 10, 4, 16, 64)]
GPU_CASES = [("UViT-S/2", "vp-linear", 0, 4, 32, 128), ("SiT-B/2", "linear", 1000, 4, 32, 128)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reference_vit(net, name: str) -> torch.nn.Module:
    """timm's ViT with the same width, blocks, heads, MLP ratio and token grid (no class token)."""
    cfg, patch = models.parse_name(name)
    return VisionTransformer(img_size=net.input_size, patch_size=patch, in_chans=net.in_channels, num_classes=0,
                             embed_dim=cfg.width, depth=net.n_blocks, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                             class_token=False, global_pool="", qkv_bias=True)


def _train_step(fn, params, batch, device, dtype):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _time(step, n: int, device: str) -> float:
    step()  # warm-up (allocations, autotuning)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_case(name, kind, num_classes, c, size, batch, device, dtype, steps, rounds, sample_steps):
    net = models.build(name, in_channels=c, input_size=size, num_classes=num_classes).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    ref = _reference_vit(net, name).to(device)
    path = transport.make_path(kind)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, c, size, size, device=device, generator=gen)
    y = torch.randint(0, max(num_classes, 1), (batch,), device=device, generator=gen) if num_classes else None

    def ours_loss():
        t = path.sample_t(batch, gen, device)
        x_t, target = path.interpolate(x0, torch.randn_like(x0), t)
        return path.loss(net(x_t, t, y).float(), target).mean()

    def ref_loss():
        x_t = x0 + torch.randn_like(x0)
        tokens = ref.forward_features(x_t)
        return tokens.float().square().mean()

    ours_step = _train_step(ours_loss, list(net.parameters()), batch, device, dtype)

    def ours_full():
        ours_step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - 0.9999)

    ref_step = _train_step(ref_loss, list(ref.parameters()), batch, device, dtype)
    t_ours, t_ref = [], []
    for _ in range(rounds):
        t_ours.append(_time(ours_full, steps, device))
        t_ref.append(_time(ref_step, steps, device))
    t_o, t_r = statistics.median(t_ours), statistics.median(t_ref)
    flops_train = _flops(lambda: ours_loss().backward())

    method = "dpm-solver" if kind == "vp-linear" else "euler-maruyama"
    noise = torch.randn(batch, c, size, size, device=device, generator=gen)

    def model_fn(x, t):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            return ema(x, t, y).float()

    with torch.no_grad():
        flops_nfe = _flops(lambda: model_fn(noise, torch.full((batch,), 0.5, device=device)))
        samplers.sample(method, model_fn, noise, path, 2, generator=gen)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        _, nfe = samplers.sample(method, model_fn, noise, path, sample_steps, generator=gen)
        _sync(device)
        t_sample = time.perf_counter() - t0
    res = {
        "model": name, "device": device, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
        "latent": [c, size, size], "tokens": net.token_grid[0] * net.token_grid[1],
        "parameters": models.count_parameters(net),
        "train_latents_per_s": batch / t_o, "reference_vit_latents_per_s": batch / t_r,
        "train_step_ratio_ours_over_timm_vit": t_o / t_r,
        "sampler": method, "sample_steps": sample_steps, "nfe": nfe,
        "sample_images_per_s": batch / t_sample, "nfe_per_s": nfe / t_sample,
    }
    if device == "cuda":
        res["train_tflops_per_s"] = flops_train / t_o / 1e12
        res["sample_tflops_per_s"] = flops_nfe * nfe / t_sample / 1e12
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sample-steps", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    steps = args.steps or (20 if gpu else 3)
    sample_steps = args.sample_steps or (50 if gpu else 10)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    results = [bench_case(*case, args.device, dtype, steps, args.rounds, sample_steps)
               for case in (GPU_CASES if gpu else CPU_CASES)]
    meta = {"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if gpu else None}
    for r in results:
        line = (f"{r['model']:12s} {r['device']} {r['dtype']} batch {r['batch']}: train {r['train_latents_per_s']:.1f} "
                f"latents/s (timm ViT of equal size {r['reference_vit_latents_per_s']:.1f}; ratio of step times "
                f"{r['train_step_ratio_ours_over_timm_vit']:.2f}); sampling {r['sampler']} {r['sample_steps']} steps: "
                f"{r['sample_images_per_s']:.2f} images/s, {r['nfe_per_s']:.1f} NFE/s")
        if gpu:
            line += f"; {r['train_tflops_per_s']:.1f} TFLOP/s training, {r['sample_tflops_per_s']:.1f} sampling"
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
