"""Benchmark: FID statistics of the same images, our in-memory path vs pytorch-fid's folder path.

Ours: uint8 images (N, H, W, 3) in memory -> `specmatch.metrics.fid.feature_statistics`.
Reference: the same images written as PNG files, then pytorch-fid's
`calculate_activation_statistics` over the folder (PIL decode in DataLoader workers, its
batch size). Both use the same network and the same weights file, on the same device, in one
process, one after the other; the statistics are compared (max |mu| and |sigma| differences and
the Fréchet distance between them, which must be ~0). Writing the PNGs is not timed.

The real Inception weights cannot be downloaded here: the weights file is the recalibrated
stand-in of `_fid_weights.py` (identical architecture, so identical cost).

    PYTHONPATH=src python bench/fid.py --n 2000 --device cpu
    PYTHONPATH=src python bench/fid.py --n 2000 --device cuda --json results/bench_fid.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _fid_weights import FILE_NAME, build_fid_inception_weights  # noqa: E402

from specmatch.metrics import features, fid  # noqa: E402


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-looking uint8 images: crops of the embedded dataset's sources, resized."""
    from PIL import Image

    from specmatch.data.embedded import load_sources

    rng = np.random.default_rng(seed)
    srcs = [im for _, im in load_sources()]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        src = srcs[i % len(srcs)]
        h, w = src.shape[:2]
        s = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out[i] = np.asarray(Image.fromarray(src[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side (pixels)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=200, help="ours")
    ap.add_argument("--ref-batch-size", type=int, default=50, help="pytorch-fid (its default)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="pytorch-fid's loader")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3

    device = torch.device(args.device)
    imgs = images(args.n, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = build_fid_inception_weights(tmp / "hub" / "checkpoints" / FILE_NAME, calib_images=imgs[:16])
        folder = tmp / "png"
        folder.mkdir()
        from PIL import Image

        for i, im in enumerate(imgs):
            Image.fromarray(im).save(folder / f"{i:05d}.png")
        files = sorted(str(p) for p in folder.iterdir())

        net = features.build("inception-fid", weights, device)
        torch.hub.set_dir(str(tmp / "hub"))  # pytorch-fid's InceptionV3 loads the same file from here
        ref_model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        sync()
        t0 = time.perf_counter()
        ours = fid.feature_statistics(imgs, net, args.batch_size, device, progress=False)
        sync()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        mu_ref, sigma_ref = fid_score.calculate_activation_statistics(files, ref_model, args.ref_batch_size, 2048,
                                                                       device, args.workers)
        sync()
        t_ref = time.perf_counter() - t0

    result = {
        "n": args.n, "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": "float32", "batch_size_ours": args.batch_size, "batch_size_ref": args.ref_batch_size,
        "ref_workers": args.workers, "threads": torch.get_num_threads(),
        "ours_s": round(t_ours, 3), "pytorch_fid_s": round(t_ref, 3), "speedup": round(t_ref / t_ours, 3),
        "max_abs_mu_diff": float(np.abs(ours.mu - mu_ref).max()),
        "max_abs_sigma_diff": float(np.abs(ours.sigma - sigma_ref).max()),
        "fd_between_statistics": fid.frechet_distance(ours.mu, ours.sigma, mu_ref, sigma_ref),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
