"""Benchmark: both evaluation protocols side by side, each against its independent reference.

On the same uint8 images (crops of the embedded dataset's sources, resized to --size):
- protocol `pytorch-fid`: our in-memory path (`specmatch.metrics.fid.embed`, net
  `inception-fid`) against pytorch-fid's own folder path (the images written as PNG files, then
  `calculate_activation_statistics`: PIL decode in DataLoader workers, its batch size);
- protocol `adm`: our ADM extractor (`inception-adm`: pytorch-fid's network behind our TF1 resize
  and the graph's scaling, pool and `mixed_6/conv` features) against torch-fidelity's TF-exact
  `FeatureExtractorInceptionV3` loading the same weights file, in memory.
Each pair is timed (one after the other, same device, one process; writing the PNGs is not timed)
and compared: max |mu| and |sigma| differences and the Fréchet distance between the two sets of
statistics (~0 when they agree). Then, what the protocol changes: FID between the two halves of
the images under each protocol, and the precision/recall of the halves with float32 distances
(ours) and with the ADM evaluator's float16 first pass emulated.

The real Inception weights cannot be downloaded here: the weights file is the recalibrated
stand-in of `_fid_weights.py` (identical architecture, so identical cost; its features are not
the real network's, so the protocol gap it shows is indicative only).

    PYTHONPATH=src python bench/fid.py --n 200 --device cpu
    PYTHONPATH=src python bench/fid.py --n 5000 --device cuda --json results/bench_fid.json
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


def _compare(a_mu, a_sigma, b_mu, b_sigma) -> dict:
    return {"max_abs_mu_diff": float(np.abs(a_mu - b_mu).max()),
            "max_abs_sigma_diff": float(np.abs(a_sigma - b_sigma).max()),
            "fd_between_statistics": fid.frechet_distance(a_mu, a_sigma, b_mu, b_sigma)}


def _pr_float16(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision/recall with the evaluator's first pass: features cast to float16 and the squared
    distance formula evaluated in float16 (its float32 fallback only on overflow, which these
    features do not reach)."""
    def d2(a, b):
        a16, b16 = torch.from_numpy(a).half(), torch.from_numpy(b).half()
        na, nb = (a16 * a16).sum(1, keepdim=True), (b16 * b16).sum(1)[None]
        d = (na - 2 * (a16.float() @ b16.float().T).half() + nb).clamp_min(0)
        assert torch.isfinite(d).all()
        return d.float()

    r_real = d2(real, real).kthvalue(k + 1, dim=1).values
    r_fake = d2(fake, fake).kthvalue(k + 1, dim=1).values
    precision = (d2(fake, real) <= r_real[None]).any(1).double().mean()
    recall = (d2(real, fake) <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256, help="image side (pixels)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=200, help="ours and torch-fidelity")
    ap.add_argument("--ref-batch-size", type=int, default=50, help="pytorch-fid (its default)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="pytorch-fid's loader")
    ap.add_argument("--repeat", type=int, default=1, help="time each path this many times, keep the fastest")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    device = torch.device(args.device)
    imgs = images(args.n, args.size)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn):
        """(result, the fastest of --repeat runs): the machines we share are loaded unevenly."""
        best = float("inf")
        for _ in range(args.repeat):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return out, best

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = build_fid_inception_weights(tmp / "hub" / "checkpoints" / FILE_NAME, calib_images=imgs[:16])
        folder = tmp / "png"
        folder.mkdir()
        from PIL import Image

        for i, im in enumerate(imgs):
            Image.fromarray(im).save(folder / f"{i:05d}.png")
        files = sorted(str(p) for p in folder.iterdir())

        # protocol pytorch-fid
        net_pf = features.build("inception-fid", weights, device)
        ours_pf, t_ours_pf = timed(lambda: fid.embed(imgs, net_pf, args.batch_size, device, keep=True,
                                                     progress=False))
        torch.hub.set_dir(str(tmp / "hub"))  # pytorch-fid's InceptionV3 loads the same file from here
        ref_model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        (mu_ref, sigma_ref), t_ref_pf = timed(lambda: fid_score.calculate_activation_statistics(
            files, ref_model, args.ref_batch_size, 2048, device, args.workers))

        # protocol adm
        net_adm = features.build("inception-adm", weights, device)
        ours_adm, t_ours_adm = timed(lambda: fid.embed(imgs, net_adm, args.batch_size, device, keep=True,
                                                       progress=False))
        tf_ext = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                             feature_extractor_weights_path=str(weights)).to(device)

        @torch.inference_mode()
        def torch_fidelity_stats():
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
            pool = torch.cat([tf_ext(x[i:i + args.batch_size].contiguous().to(device))[0].cpu()
                              for i in range(0, len(x), args.batch_size)]).double().numpy()
            return pool.mean(0), np.cov(pool, rowvar=False)

        (mu_tf, sigma_tf), t_ref_adm = timed(torch_fidelity_stats)

    half = args.n // 2
    a_pf, b_pf = (fid.statistics(x) for x in (ours_pf.features[:half], ours_pf.features[half:]))
    a_adm, b_adm = (fid.statistics(x) for x in (ours_adm.features[:half], ours_adm.features[half:]))
    pr32 = fid.precision_recall(ours_adm.features[:half], ours_adm.features[half:], 3, device=device)
    pr16 = _pr_float16(ours_adm.features[:half], ours_adm.features[half:], 3)
    result = {
        "n": args.n, "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": "float32", "batch_size": args.batch_size, "batch_size_pytorch_fid": args.ref_batch_size,
        "pytorch_fid_workers": args.workers, "threads": torch.get_num_threads(), "repeat": args.repeat,
        "torch": torch.__version__,
        "pytorch-fid": {"ours_s": round(t_ours_pf, 3), "reference": "pytorch-fid PNG folder",
                        "reference_s": round(t_ref_pf, 3), "speedup": round(t_ref_pf / t_ours_pf, 3),
                        **_compare(ours_pf.pool.mu, ours_pf.pool.sigma, mu_ref, sigma_ref)},
        "adm": {"ours_s": round(t_ours_adm, 3), "reference": "torch-fidelity FeatureExtractorInceptionV3 in memory",
                "reference_s": round(t_ref_adm, 3), "speedup": round(t_ref_adm / t_ours_adm, 3),
                "ours_includes": "pool + spatial (sFID) moments, logits",
                **_compare(ours_adm.pool.mu, ours_adm.pool.sigma, mu_tf, sigma_tf)},
        "fid_between_halves": {"pytorch-fid": fid.frechet_distance(a_pf.mu, a_pf.sigma, b_pf.mu, b_pf.sigma),
                               "adm": fid.frechet_distance(a_adm.mu, a_adm.sigma, b_adm.mu, b_adm.sigma)},
        "precision_recall_halves_adm": {"float32": list(pr32), "float16_first_pass": list(pr16)},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
