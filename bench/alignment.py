"""Benchmark: the cost of representation alignment in a diffusion training step (issue: "SiT
training step time without alignment, with on-the-fly targets and with cached targets. Goal:
with cached targets, alignment adds at most 10%.").

Three variants of the `train-diffusion` step are measured side by side in one process, on the
same network (same architecture and initial weights, each variant with its own copy, EMA and
AdamW state), the same batches (every variant replays the same sequence of steps), the same
device and precision, the same number of warm-up and timed steps:

- plain:      no alignment (`alignment.kind: none`);
- cached:     alignment with targets read from a target cache (`targets: cached`);
- on-the-fly: alignment with the frozen encoder run on the batch's images (`targets: on-the-fly`).

The step is the trainer's (`specmatch.diffusion.train._train`) without its logging and
checkpoint machinery: seeded batch indices, a posterior sample of the latent cache entries
(`LatentReader.sample`), t / noise / label dropout drawn on the CPU and moved to the device,
the interpolant, bf16 autocast on a GPU, the hidden tokens after block `depth` through the
projector, -cos against the transformed target (`objectives.transform(resize_grid(raw, grid))`,
as `Alignment.fetch` and `Alignment.targets_from` do), the finiteness check, AdamW, the LR schedule and the EMA update.
Its inputs are real caches on disk, written to a temporary folder at start with random
contents: a latent cache (float32 mu / logvar, memory-mapped), a target cache (float16 raw grids,
memory-mapped and converted to float32 by `TargetReader.targets`) and a dataset split of uint8
images (read by `entry_images`, mirrored for the hflip entries, for the encoder). The files are
small, so they sit in the page cache: a paper-scale target cache (~1 TB for DINOv2 on ImageNet)
read from a disk or a network file system can cost more than measured here.

The variants are interleaved step by step: a round is a few warm-up steps, then `steps` timed
slots, each running one step of every variant, in an order rotated from slot to slot, so that
machine noise hits the three alike. The figures are medians over every timed step of every
round; the ratio aligned / plain is given both as the ratio of the medians and as the median of
the ratios within a slot (paired: robust to slow drifts of the machine's speed). On a GPU each
step ends with torch.cuda.synchronize. After the rounds, the target fetch of each mode (read +
transform, or encode + transform) is timed on its own, to split the aligned steps' extra cost
into targets and projector / loss.

    .venv/bin/python bench/alignment.py --device cpu --batch 32
    .venv/bin/python bench/alignment.py --device cpu --batch 32 --proj-hidden 256
    .venv/bin/python bench/alignment.py --device cuda --json results/bench_alignment.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from specmatch import config as config_mod
from specmatch.alignment import encoders, objectives, registry
from specmatch.alignment.targets import MANIFEST as TARGETS_MANIFEST
from specmatch.alignment.targets import SCHEMA as TARGETS_SCHEMA
from specmatch.alignment.targets import TargetReader, entry_images
from specmatch.autoencoder.latents import MANIFEST as LATENTS_MANIFEST
from specmatch.autoencoder.latents import SCHEMA as LATENTS_SCHEMA
from specmatch.autoencoder.latents import LatentReader
from specmatch.data.reader import SplitReader
from specmatch.data.shards import MANIFEST_SCHEMA as DATASET_SCHEMA
from specmatch.data.shards import write_manifest, write_npz
from specmatch.diffusion import models, transport
from specmatch.diffusion.train import DiffusionTrainSettings, draw_batch
from specmatch.errors import SpecmatchError
from specmatch.runtime import distributed
from specmatch.runtime.hashing import sha256_file
from specmatch.runtime.training import batch_indices, check_finite, prepare_rank, warmup

VARIANTS = ("plain", "cached", "on-the-fly")
LABELS = {"plain": "plain (no alignment)", "cached": "aligned, cached targets",
          "on-the-fly": "aligned, on-the-fly targets"}
GOAL = 1.10  # the goal: with cached targets, alignment adds at most 10%

# (model, latent channels, latent size, image resolution, classes, encoder, batch)
DEFAULTS = {"cpu": ("SiT-tiny/2", 4, 16, 64, 10, "efficientnet-lite0-s8", 32),
            "cuda": ("SiT-B/2", 4, 32, 256, 1000, "dinov2-vitb14", 256)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- caches on disk


def _shards(entries: int, size: int):
    for j, start in enumerate(range(0, entries, size)):
        yield j, np.arange(start, min(entries, start + size))


def write_caches(folder: Path, *, entries: int, shard_size: int, latent: tuple[int, int, int], num_classes: int,
                 resolution: int, target_shape: tuple[int, int, int], encoder: str, image_size: int,
                 seed: int = 0) -> tuple[Path, Path, Path]:
    """A dataset split (entries / 2 uint8 images: the cache entries are the images and their
    mirror images, as with hflip), a latent cache and a raw target cache of `entries` entries,
    random contents, in the formats the readers accept."""
    rng = np.random.default_rng(seed)
    n_images = entries // 2
    data, lat, tgt = folder / "dataset", folder / "latents", folder / "targets"
    for d in (data, lat, tgt):
        d.mkdir(parents=True)

    shards = []
    for j, ids in _shards(n_images, shard_size):
        name = f"train-{j:05d}.npz"
        write_npz(data / name, {"images": rng.integers(0, 256, (len(ids), resolution, resolution, 3), np.uint8),
                                "labels": rng.integers(0, max(num_classes, 1), len(ids)).astype(np.int64),
                                "sources": np.zeros(len(ids), np.int64)})
        shards.append({"file": name, "count": len(ids), "sha256": sha256_file(data / name)})
    write_manifest(data, {"schema": DATASET_SCHEMA, "resolution": resolution, "num_classes": num_classes,
                          "splits": {"train": {"count": n_images, "shards": shards,
                                               "images_sha256": "random (benchmark)"}}})

    common = {"count": entries, "images": n_images, "hflip": True, "dataset_images_sha256": "random (benchmark)",
              "world_size": 1}
    shards = []
    for j, ids in _shards(entries, shard_size):
        name = f"latents-{j:05d}.npz"
        write_npz(lat / name, {"mu": rng.standard_normal((len(ids), *latent), np.float32),
                               "logvar": np.full((len(ids), *latent), -4.0, np.float32),
                               "labels": rng.integers(0, max(num_classes, 1), len(ids)).astype(np.int64),
                               "index": (ids % n_images).astype(np.int64), "flip": ids >= n_images})
        shards.append({"file": name, "count": len(ids), "sha256": sha256_file(lat / name)})
    (lat / LATENTS_MANIFEST).write_text(json.dumps(
        {"schema": LATENTS_SCHEMA, "name": "bench", "shape": list(latent), "num_classes": num_classes,
         "scale_factor": 1.0, **common, "shards": shards}, indent=1) + "\n")

    shards = []
    for j, ids in _shards(entries, shard_size):
        name = f"targets-{j:05d}.npz"
        write_npz(tgt / name, {"targets": rng.standard_normal((len(ids), *target_shape), np.float32).astype(np.float16),
                               "index": (ids % n_images).astype(np.int64), "flip": ids >= n_images})
        shards.append({"file": name, "count": len(ids), "sha256": sha256_file(tgt / name)})
    (tgt / TARGETS_MANIFEST).write_text(json.dumps(
        {"schema": TARGETS_SCHEMA, "name": "bench", "encoder": encoder, "image_size": image_size,
         "weights_sha256": "random (benchmark)", "dtype": "float16", "shape": list(target_shape), **common,
         "shards": shards}, indent=1) + "\n")
    return data, lat, tgt


# --------------------------------------------------------------------------- encoder


def load_encoder(name: str, image_size: int | None, dev: torch.device, tmp: Path):
    """The frozen encoder with its real weights; for DINOv2 without its checkpoint in resources/,
    the same architecture with random weights (the cost is the same, the features meaningless)."""
    try:
        return encoders.load(name, image_size, dev), None
    except SpecmatchError as e:
        s = encoders.spec(name)
        if s.family != "dinov2":
            raise
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(img_size=224, patch_size=s.stride, embed_dim=s.dim, depth=12, num_heads=s.heads,
                                init_values=1.0, num_classes=0)
        state = vit.state_dict()
        state["mask_token"] = torch.zeros(1, s.dim)  # the official checkpoint's extra key
        path = tmp / "dinov2_vitb14_random.pth"
        torch.save(state, path)
        enc = encoders.build(name, path, image_size, dev, sha256="random weights (benchmark fallback)")
        note = (f"{name}: encoders.load failed ({str(e)[:70]}...); the DINOv2 ViT-B/14 architecture was built "
                "with RANDOM weights via encoders.build_dinov2: same cost, meaningless targets")
        return enc, note


# --------------------------------------------------------------------------- the step


class Variant:
    """One training state: network, EMA, optional projector, AdamW and schedule, as `_train`
    builds them, with its own step counter (so every variant replays the same batches)."""

    def __init__(self, name: str, net0: torch.nn.Module, proj0: torch.nn.Module | None, dev: torch.device,
                 ema_decay: float):
        self.name, self.step = name, 0
        self.net = copy.deepcopy(net0).to(dev)
        self.proj = copy.deepcopy(proj0).to(dev) if proj0 is not None else None
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.params = list(self.net.parameters()) + (list(self.proj.parameters()) if self.proj is not None else [])
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup(0))
        self.times: list[list[float]] = []  # per round, seconds per timed step


class Bench:
    def __init__(self, args, dev, info, cache, reader, images, encoder, path, use_bf16, run_dir):
        self.a, self.dev, self.info = args, dev, info
        self.cache, self.reader, self.images, self.encoder = cache, reader, images, encoder
        self.path, self.use_bf16, self.run_dir = path, use_bf16, run_dir
        self.p = {"kind": args.kind, "irepa_gamma": 1.0, "dog": {"sigma1": 0.8, "sigma2": 2.0}}

    def targets(self, source: str, entries: np.ndarray, grid: int) -> torch.Tensor:
        """`Alignment.fetch` + `targets_from`: the raw grids of the cache or of the encoder on the entries'
        images, resized to the token grid and transformed for the kind."""
        if source == "cached":
            raw = self.reader.targets(entries).to(self.dev)
        else:
            raw = self.encoder(entry_images(self.images, np.asarray(entries), True).to(self.dev))
        return objectives.transform(objectives.resize_grid(raw, grid), self.a.kind, self.p)

    def step(self, v: Variant) -> None:
        a, dev, cache, path = self.a, self.dev, self.cache, self.path
        net, s, seed, batch = v.net, v.step, a.seed, a.batch
        idx, *drawn = draw_batch(cache, path, batch, seed, s, a.label_dropout)  # the trainer's own draw
        x0, y, tt, noise, drop = (t.to(dev) for t in drawn)
        labels = torch.where(drop, torch.full_like(y, getattr(net, "null_label", 0)), y) if net.num_classes else None
        x_t, target = path.interpolate(x0, noise, tt)
        if v.proj is None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                pred = net(x_t, tt, labels)
            loss = path.loss(pred.float(), target).mean()
            terms = {"loss": loss}
        else:
            y_align = self.targets(v.name, idx, net.token_grid[0])
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                pred, hidden = net(x_t, tt, labels, hidden_block=a.depth)
                proj_tokens = v.proj(hidden)
            diff = path.loss(pred.float(), target).mean()
            align_loss = objectives.alignment_loss(proj_tokens, y_align)
            loss = diff + a.weight * align_loss
            terms = {"loss": loss, "diffusion_loss": diff, "align_loss": align_loss}
        check_finite(terms, s, self.info, self.run_dir)
        v.opt.zero_grad(set_to_none=True)
        loss.backward()
        v.opt.step()
        v.sched.step()
        v.ema.update_parameters(net)
        v.step += 1

    def timed_step(self, v: Variant) -> float:
        t0 = time.perf_counter()
        self.step(v)
        _sync(self.dev)
        return time.perf_counter() - t0

    def run_round(self, variants: list[Variant], r: int) -> None:
        """Warm-up steps, then `steps` timed slots; a slot runs one step of every variant, in an
        order rotated from slot to slot, so that noise hits the three alike, step by step."""
        for v in variants:
            v.times.append([])
        for k in range(self.a.warmup + self.a.steps):
            shift = (r + k) % len(variants)
            for v in variants[shift:] + variants[:shift]:
                dt = self.timed_step(v)
                if k >= self.a.warmup:
                    v.times[-1].append(dt)

    def time_targets(self, source: str, grid: int, n: int) -> float:
        """Median seconds of one batch's target fetch alone (after one untimed call)."""
        times = []
        for k in range(n + 1):
            idx = batch_indices(len(self.cache), self.a.batch, self.a.seed + 1, k)
            _sync(self.dev)
            t0 = time.perf_counter()
            self.targets(source, idx, grid)
            _sync(self.dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="network (default: SiT-tiny/2 on cpu, SiT-B/2 on cuda)")
    ap.add_argument("--latent", type=int, nargs=2, metavar=("C", "SIZE"), default=None,
                    help="latent channels and size (default: 4 16 on cpu, 4 32 on cuda)")
    ap.add_argument("--num-classes", type=int, default=None, help="class-conditional (default: 10 cpu, 1000 cuda)")
    ap.add_argument("--encoder", default=None, choices=sorted(encoders.REGISTRY),
                    help="target encoder (default: efficientnet-lite0-s8 on cpu, dinov2-vitb14 on cuda)")
    ap.add_argument("--image-size", type=int, default=None, help="encoder input size (default: the encoder's)")
    ap.add_argument("--image-res", type=int, default=None,
                    help="resolution of the dataset images fed to the encoder (default: 64 cpu, 256 cuda)")
    ap.add_argument("--kind", choices=objectives.KINDS[1:], default="repa")
    ap.add_argument("--projector", choices=objectives.PROJECTORS, default=None, help="default: the kind's own")
    ap.add_argument("--proj-hidden", type=int, default=2048, help="MLP projector hidden width (REPA: 2048)")
    ap.add_argument("--depth", type=int, default=None,
                    help="align after this block (default: 8, the schema's, or half the blocks if fewer than 8)")
    ap.add_argument("--weight", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=None, help="default: 32 cpu, 256 cuda")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant per round (default 5 cpu, 20 cuda)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per variant per round (default 1 cpu, 3 cuda)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--entries", type=int, default=None, help="cache entries written (default: 4 x batch, even)")
    ap.add_argument("--shard-size", type=int, default=None, help="entries per shard (default: entries / 4)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="as train.precision: auto = bf16 autocast on cuda, fp32 on cpu")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (the trainer does not)")
    ap.add_argument("--no-deterministic", action="store_true", help="train.deterministic: false (default true)")
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary caches go (default: $TMPDIR)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    d = DEFAULTS[args.device]
    gpu = args.device == "cuda"
    args.model = args.model or d[0]
    c, size = args.latent or (d[1], d[2])
    args.image_res = args.image_res or d[3]
    args.num_classes = d[4] if args.num_classes is None else args.num_classes
    args.encoder = args.encoder or d[5]
    args.batch = args.batch or d[6]
    args.steps = args.steps or (20 if gpu else 5)
    args.warmup = (3 if gpu else 1) if args.warmup is None else args.warmup
    entries = args.entries or max(4 * args.batch, 2)
    entries += entries % 2
    shard_size = args.shard_size or max(1, entries // 4)

    if not gpu:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = distributed.setup(args.device)
    dev = info.device
    t = DiffusionTrainSettings.from_params(config_mod.validate(
        {"seed": args.seed, "deterministic": not args.no_deterministic, "batch_size": args.batch,
         "precision": args.precision}, "diff_train"))
    _, _, _, use_bf16 = prepare_rank(t, info)
    dtype = "bfloat16 autocast" if use_bf16 else "float32"

    net0 = models.build(args.model, in_channels=c, input_size=size, num_classes=args.num_classes)
    args.depth = args.depth or (8 if net0.n_blocks >= 8 else max(1, net0.n_blocks // 2))
    if not 1 <= args.depth <= net0.n_blocks:
        raise SystemExit(f"--depth {args.depth} is outside [1, {net0.n_blocks}] ({args.model})")
    grid = net0.token_grid[0]
    projector = args.projector or registry.DEFAULT_PROJECTOR[args.kind]

    with tempfile.TemporaryDirectory(prefix="specmatch-bench-align-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        encoder, note = load_encoder(args.encoder, args.image_size, dev, tmp)
        target_shape = (encoder.dim, encoder.grid, encoder.grid)
        t0 = time.perf_counter()
        data, lat, tgt = write_caches(tmp, entries=entries, shard_size=shard_size, latent=(c, size, size),
                                      num_classes=args.num_classes, resolution=args.image_res,
                                      target_shape=target_shape, encoder=args.encoder, image_size=encoder.image_size,
                                      seed=args.seed)
        t_write = time.perf_counter() - t0
        cache, reader, images = LatentReader(lat), TargetReader(tgt), SplitReader(data, "train")
        proj0 = objectives.build_projector(projector, net0.hidden_dim, encoder.dim, net0.token_grid, args.proj_hidden)
        variants = [Variant(name, net0, proj0 if name != "plain" else None, dev, 0.9999) for name in VARIANTS]
        bench = Bench(args, dev, info, cache, reader, images, encoder, transport.make_path("linear"), use_bf16,
                      tmp / "run")

        threads = torch.get_num_threads()
        head = (f"{args.model} ({models.count_parameters(net0) / 1e6:.2f}M params, {grid}x{grid} tokens) on "
                f"{c}x{size}x{size} latents, {args.num_classes} classes | device {args.device}"
                f"{' (' + torch.cuda.get_device_name(dev) + ')' if gpu else f' ({threads} threads)'} | {dtype}"
                f"{' + TF32' if args.tf32 else ''} | batch {args.batch}\n"
                f"alignment {args.kind}: depth {args.depth}, weight {args.weight}, projector {projector}"
                f"{f' hidden {args.proj_hidden}' if projector == 'mlp' else ''} "
                f"({models.count_parameters(proj0) / 1e6:.2f}M params) | encoder {args.encoder} at "
                f"{encoder.image_size} px on {args.image_res} px images -> {encoder.dim}x{encoder.grid}x{encoder.grid}"
                f"{' resized to ' + str(grid) + 'x' + str(grid) if encoder.grid != grid else ''}\n"
                f"caches: {entries} entries in shards of {shard_size} (targets float16, "
                f"{sum(f.stat().st_size for f in tgt.glob('*.npz')) / 2**20:.1f} MiB, written in {t_write:.1f} s) | "
                f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps) per variant, "
                "interleaved step by step")
        print(head)
        if note:
            print("NOTE:", note)
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(f"torch threads: {threads}" + (f" | load average (1 min) at start {load0:.2f}" if load0 is not None
                                             else ""), flush=True)

        for r in range(args.rounds):
            bench.run_round(variants, r)
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {statistics.median(variants[VARIANTS.index(n)].times[-1]) * 1e3:.1f} ms" for n in VARIANTS),
                flush=True)
        n_fetch = max(3, min(10, args.steps))
        fetch = {src: bench.time_targets(src, grid, n_fetch) for src in ("cached", "on-the-fly")}
        flops = {}
        for v in variants:  # one more whole step of each, counted (matmuls, convolutions, attention)
            with FlopCounterMode(display=False) as counter:
                bench.step(v)
            flops[v.name] = counter.get_total_flops()

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res: dict[str, Any] = {}
    for v in variants:
        flat = [x for rnd in v.times for x in rnd]
        med = statistics.median(flat)
        res[v.name] = {"median_step_ms": med * 1e3, "latents_per_s": args.batch / med,
                       "round_median_ms": [statistics.median(rnd) * 1e3 for rnd in v.times],
                       "step_ms": [x * 1e3 for x in flat]}
    plain = res["plain"]["median_step_ms"]
    for name in ("cached", "on-the-fly"):
        r = res[name]
        r["ratio_over_plain"] = r["median_step_ms"] / plain
        r["round_ratios"] = [a / b for a, b in zip(r["round_median_ms"], res["plain"]["round_median_ms"])]
        r["paired_ratio_median"] = statistics.median(a / b for a, b in zip(r["step_ms"], res["plain"]["step_ms"]))
        r["target_fetch_ms"] = fetch[name] * 1e3
    for name in VARIANTS:
        res[name]["gflop_per_step"] = flops[name] / 1e9
        res[name]["flop_ratio_over_plain"] = flops[name] / flops["plain"]

    print()
    print(f"{'variant':30s} {'median step ms':>15s} {'latents/s':>10s} {'aligned/plain':>14s} {'paired':>7s}"
          "   per-round median ms")
    for name in VARIANTS:
        r = res[name]
        ratio, paired = ((f"{r['ratio_over_plain']:.3f}", f"{r['paired_ratio_median']:.3f}") if name != "plain"
                         else ("1.000", "1.000"))
        print(f"{LABELS[name]:30s} {r['median_step_ms']:15.1f} {r['latents_per_s']:10.1f} {ratio:>14s} {paired:>7s}   "
              + " / ".join(f"{x:.1f}" for x in r["round_median_ms"]))
    print()
    for name in ("cached", "on-the-fly"):
        r = res[name]
        extra = r["median_step_ms"] - plain
        what = "read + float16->float32 + transform" if name == "cached" else "encoder + transform"
        print(f"{LABELS[name]}: +{extra:.1f} ms/step over plain ({(r['ratio_over_plain'] - 1) * 100:+.1f}%; "
              f"per-round ratios {', '.join(f'{x:.3f}' for x in r['round_ratios'])}); of which target fetch "
              f"({what}) {r['target_fetch_ms']:.1f} ms, the rest (projector, hidden tokens, loss, larger "
              f"optimiser step) ~{extra - r['target_fetch_ms']:.1f} ms")
    print(f"model FLOPs per step (forward + backward; encoder forward): plain {flops['plain'] / 1e9:.1f} GFLOP, "
          f"cached {flops['cached'] / 1e9:.1f} (x{flops['cached'] / flops['plain']:.3f}: projector and loss), "
          f"on-the-fly {flops['on-the-fly'] / 1e9:.1f} (x{flops['on-the-fly'] / flops['plain']:.3f}: + encoder)")
    ratio = res["cached"]["ratio_over_plain"]
    verdict = "MET" if ratio <= GOAL else f"MISSED by {(ratio - GOAL) * 100:.1f} percentage points"
    print(f"goal (cached targets add at most {(GOAL - 1) * 100:.0f}%): {verdict} "
          f"(cached/plain = {ratio:.3f} by medians, {res['cached']['paired_ratio_median']:.3f} paired)")
    if load1 is not None and not gpu and max(load0, load1) > threads + 0.5:
        print(f"WARNING: load average {load0:.2f} at start, {load1:.2f} at end, on {threads} threads: other "
              "processes shared the CPU, the step times are noisy")
    if note:
        print("NOTE:", note)

    if args.json:
        meta = {"host": platform.node(), "torch": torch.__version__, "threads": threads,
                "gpu": torch.cuda.get_device_name(dev) if gpu else None, "encoder_note": note,
                "load_average_1min": [load0, load1]}
        config = {"model": args.model, "latent": [c, size, size], "num_classes": args.num_classes,
                  "parameters": models.count_parameters(net0), "projector_parameters": models.count_parameters(proj0),
                  "token_grid": list(net0.token_grid), "device": args.device, "dtype": dtype, "tf32": args.tf32,
                  "deterministic": not args.no_deterministic, "batch": args.batch, "kind": args.kind,
                  "projector": projector, "proj_hidden": args.proj_hidden, "depth": args.depth,
                  "weight": args.weight, "encoder": args.encoder, "encoder_image_size": encoder.image_size,
                  "image_res": args.image_res, "target_shape": list(target_shape), "entries": entries,
                  "shard_size": shard_size, "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "config": config, "results": res,
                                         "goal_cached_ratio_max": GOAL, "goal_met": ratio <= GOAL}, indent=1) + "\n")


if __name__ == "__main__":
    main()
