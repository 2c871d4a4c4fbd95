"""Benchmark: one autoencoder training step (generator + discriminator update) for sdvae, esm and
dsm side by side, through the real trainer (`specmatch.autoencoder.train.train`).

Each (config, variant) is a short run of the trainer with the GAN on from step 0 (so every step
pays both updates, as most paper-scale steps do) and a log line per step; the first `--warmup`
steps are dropped and the median images/s of the rest is reported. The three variants run one
after the other in every round, `--rounds` times, so drift on the machine hits all of them; the
ratio to sdvae is the figure of interest (goal: ESM and DSM add at most 5%). LPIPS is off on
every side when its VGG16 weights are not in resources/ (say so in the output).
Peak memory is torch.cuda.max_memory_allocated on GPU; on CPU the peak RSS of a fresh process
per run is not separable in-process, so it is not reported.

    PYTHONPATH=src python bench/autoencoder.py --device cpu --rounds 3
    PYTHONPATH=src python bench/autoencoder.py --device cuda --big-batch 16 --json results/bench_ae.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from specmatch import resources
from specmatch.autoencoder import train
from specmatch.data.prepare import prepare

VARIANTS = ("sdvae", "esm", "dsm")


def run_once(data: Path, cfg: str, variant: str, batch: int, steps: int, device: str, lpips: bool,
             tmp: Path) -> tuple[list[float], int | None]:
    params = {"dataset": "embedded", "config": cfg, "variant": variant,
              "train": {"steps": steps, "batch_size": batch, "device": device, "log_every": 1,
                        "checkpoint_every": 10 ** 9, "ema_decay": 0.9999, "deterministic": False},
              "loss": {"gan_start": 0, "lpips_weight": 0.5 if lpips else 0.0}}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = tmp / f"{cfg}-{variant}"
    train.train(params, data, out / "run", out / "model", variant, resume="none")
    log = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return [r["images_per_s"] for r in log], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny-batch", type=int, default=16)
    ap.add_argument("--big-batch", type=int, default=2, help="f16d16 at 256 px (2 on a CPU, 16+ on a GPU)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lpips = resources.check(resources.get("vgg16"))["ok"]
    cases = [("tiny", 64, args.tiny_batch), ("f16d16", 256, args.big_batch)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for cfg, size, batch in cases:
            data = tmp / f"data{size}"
            prepare({"source": "embedded", "resolution": size, "seed": 0, "n_train": max(64, 4 * batch),
                     "n_test": 8, "shard_size": 256}, "embedded", data)
            speeds = {v: [] for v in VARIANTS}
            peaks = {}
            for r in range(args.rounds):
                for v in VARIANTS:
                    s, peak = run_once(data, cfg, v, batch, args.steps, args.device, lpips, tmp / f"r{r}")
                    speeds[v].extend(s[args.warmup:])
                    peaks[v] = peak
            base = statistics.median(speeds["sdvae"])
            for v in VARIANTS:
                med = statistics.median(speeds[v])
                results.append({"config": cfg, "resolution": size, "batch": batch, "variant": v,
                                "images_per_s": round(med, 3), "step_time_vs_sdvae": round(base / med, 4),
                                "peak_memory_mb": None if peaks[v] is None else round(peaks[v] / 2 ** 20, 1)})
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or "cpu")
    print(f"device {args.device} ({dev_name}), dtype {'bf16 autocast' if args.device == 'cuda' else 'float32'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, LPIPS {'on' if lpips else 'off (no VGG16 file)'}, "
          f"GAN on, median of {args.rounds} rounds x {args.steps - args.warmup} steps")
    print(f"{'config':<8} {'px':>4} {'batch':>5} {'variant':<7} {'images/s':>9} {'step time / sdvae':>18} {'peak MB':>8}")
    for r in results:
        print(f"{r['config']:<8} {r['resolution']:>4} {r['batch']:>5} {r['variant']:<7} {r['images_per_s']:>9.2f} "
              f"{r['step_time_vs_sdvae']:>18.3f} {str(r['peak_memory_mb']):>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "device_name": dev_name, "lpips": lpips,
                                         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
