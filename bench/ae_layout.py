"""Benchmark: the autoencoder's CPU memory layout. One training step of the `tiny` config (L1 loss,
forward + backward + AdamW, batch 16 of 64 px, one thread as in a DAG job) with the model's
channels-last activations on the CPU (`autoencoder.model._cpu_channels_last`, what the trainer
runs) against the default NCHW layout (the same model with that conversion switched off), side by
side: the two alternate step by step within each round, so drift on the machine hits both.
Reports the median seconds per step of each and their ratio, and the largest difference of the
losses after the same steps from the same weights (float rounding only).

    PYTHONPATH=src python bench/ae_layout.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from specmatch.autoencoder import model as ae_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = ae_model.build(args.config)
    x = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    sides = {}
    for name in ("channels_last", "nchw"):
        m = copy.deepcopy(base)
        sides[name] = (m, torch.optim.AdamW(m.parameters(), 1e-3), [], [])
    convert = ae_model._cpu_channels_last

    def step(name: str) -> None:
        m, opt, times, losses = sides[name]
        ae_model._cpu_channels_last = convert if name == "channels_last" else (lambda t: t)
        try:
            t0 = time.perf_counter()
            rec, _ = m(x, sample=False)
            loss = (rec - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        finally:
            ae_model._cpu_channels_last = convert

    for name in sides:  # warm-up: oneDNN picks and caches its kernels
        step(name)
    for _ in range(args.rounds):
        for _ in range(args.steps):
            for name in sides:
                step(name)
    med = {name: statistics.median(s[2][1:]) for name, s in sides.items()}
    diff = max(abs(a - b) for a, b in zip(sides["channels_last"][3], sides["nchw"][3]))
    out = {"config": args.config, "batch": args.batch, "size": args.size, "threads": args.threads,
           "steps_each": args.rounds * args.steps, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "s_per_step": med, "ratio_nchw_over_channels_last": med["nchw"] / med[
               "channels_last"], "max_loss_difference": diff}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
