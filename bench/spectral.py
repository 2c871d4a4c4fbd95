"""Benchmark: `specmatch.spectral.esm_loss` against the authors'-style torch-dct computation.

Both sides run in the same process, on the same inputs, one after the other in every repeat,
so the ratio is measured side by side (machine noise hits both). Each timing is one
forward + backward into a latent with requires_grad, i.e. what a training step pays.

    PYTHONPATH=src python bench/spectral.py --device cpu --repeats 20
    PYTHONPATH=src python bench/spectral.py --device cuda --json results/bench_spectral.json

Never gates CI: it prints figures, it does not judge them (beyond agreement of the values).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _torch_dct_reference as ref  # noqa: E402

from specmatch import spectral as sp  # noqa: E402

# (name, latent channels, latent size) at 256 px: the paper's two CelebA-HQ autoencoders.
CASES = [("f16d16", 16, 16), ("f8d4", 4, 32)]


def make_inputs(batch: int, image: int, ch: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Integrated noise: a power-law spectrum like natural images, scaled into [-1, 1].
    x = torch.randn(batch, 3, image, image, generator=g).cumsum(-1).cumsum(-2)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    x = x / x.abs().amax(dim=(-3, -2, -1), keepdim=True)
    z = torch.randn(batch, ch, size, size, generator=g)
    return x.to(device), z.to(device)


def fwd_bwd(fn, x: torch.Tensor, z0: torch.Tensor, delta: float):
    z = z0.detach().clone().requires_grad_(True)
    loss = fn(x, z, delta=delta)
    loss.backward()
    return loss.detach(), z.grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns, x, z, delta, device, warmup: int, repeats: int):
    """Median wall time (ms) of each fn, alternating them inside every repeat."""
    for _ in range(warmup):
        for fn in fns:
            fwd_bwd(fn, x, z, delta)
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fwd_bwd(fn, x, z, delta)
            sync(device)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to the largest |b| (an element-wise ratio would blow up on
    gradient entries that are zero up to round-off)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats per case (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--image", type=int, default=256, help="image size in pixels")
    ap.add_argument("--delta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = platform.processor() or platform.machine()
    print(f"device: {args.device} ({dev_name}), dtype: {str(dtype).replace('torch.', '')}, batch: {args.batch}, "
          f"image: {args.image}px, delta: {args.delta}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {platform.python_version()}")
    print(f"warm-up {args.warmup}, median of {args.repeats} repeats, forward + backward into z\n")

    rows = []
    for name, ch, size in CASES:
        x, z = make_inputs(args.batch, args.image, ch, size, device)
        loss_ours, grad_ours = fwd_bwd(sp.esm_loss, x, z, args.delta)
        loss_ref, grad_ref = fwd_bwd(ref.esm_loss, x, z, args.delta)
        diff = max(max_rel_diff(loss_ours, loss_ref), max_rel_diff(grad_ours, grad_ref))
        ours_ms, ref_ms = time_pair([sp.esm_loss, ref.esm_loss], x, z, args.delta, device,
                                    args.warmup, args.repeats)
        rows.append({
            "case": f"{name} ({ch}x{size}x{size})", "ours_ms": ours_ms, "torch_dct_ms": ref_ms,
            "speedup": ref_ms / ours_ms, "max_rel_diff": diff,
            "loss_ours": loss_ours.item(), "loss_torch_dct": loss_ref.item(),
        })

    header = f"{'case':<22} {'ours ms':>9} {'torch-dct ms':>13} {'speed-up':>9} {'max rel diff':>13}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<22} {r['ours_ms']:>9.2f} {r['torch_dct_ms']:>13.2f} {r['speedup']:>8.1f}x "
              f"{r['max_rel_diff']:>13.2e}")
    print("\n(max rel diff: largest of the loss difference and the z-gradient difference, each "
          "relative to the largest reference magnitude)")

    worst = max(r["max_rel_diff"] for r in rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "esm_loss forward+backward", "device": args.device, "device_name": dev_name,
            "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "image": args.image,
            "delta": args.delta, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "warmup": args.warmup, "repeats": args.repeats, "rows": rows,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    if worst > 1e-3:
        print(f"WARNING: the two implementations disagree (max rel diff {worst:.2e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
