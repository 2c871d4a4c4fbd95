"""`specmatch train-diffusion`: latent diffusion on an autoencoder's latent cache (docs/method.md §6).

The network (`models`, a registry keyed like `SiT-B/2`) and the process (`transport`: the VP
path with epsilon prediction of the U-ViT recipe, or the linear interpolant with velocity
prediction of the SiT recipe) are separate; this module only trains.

Runtime guarantees, as in the autoencoder trainer (`runtime.training`):
- Step s draws its global batch of cache entries, their posterior noise, t, the diffusion noise
  and the label dropout from streams seeded by (seed, s) for the whole global batch, and each
  rank takes its rows: the trajectory does not depend on the number of processes, and a run
  resumed at step s follows the uninterrupted one bit for bit on the CPU.
- The data path keeps the GPUs fed: a background thread (`Prefetch`) reads each rank's rows
  only (mu, logvar, labels and, for alignment, the cached targets or the images) a few steps
  ahead, into pinned memory on CUDA; the copies to the device are asynchronous; the random
  draws, cheap there and costly on the CPU, are made on the training device (each rank draws
  the global batch's and keeps its rows). Nothing reads a value back from the GPU at every
  step: the non-finite check (`FiniteGuard`) and the loss are read at log, snapshot and
  checkpoint steps only, and the stop flag travels on the CPU.
- torch.distributed via torchrun (DDP; NCCL on GPU, gloo on CPU); bf16 autocast on GPU
  (`train.precision: auto`), on any device with `bf16`; `train.compile` compiles the network.
- Checkpoints every `checkpoint_every` steps, on a stop signal (SIGTERM, SIGUSR1, SIGINT, SIGHUP;
  exit status 3) and at the end; `--resume auto`, only under the settings the checkpoint records
  (`runtime.train_state`: another length needs `train.extend` and a constant schedule); a
  non-finite loss stops every rank and keeps the last good checkpoint.
- Optional EMA snapshots at `snapshot_steps` (the weights sampling uses, at those steps), for the
  metric over training (`specmatch fid-progress`): written atomically into the run folder when
  the step is reached, so an interrupted run keeps them, and copied into the output at the end.
- Optional representation alignment (`alignment`, REPA / iREPA / DoG-REPA): the hidden tokens
  after block `depth` go through a projector and are pulled to a frozen encoder's target of the
  same cache entries (`specmatch.alignment`); loss = diffusion + weight * (-cos). The projector
  lives in training checkpoints only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import config as config_mod
from ..alignment import objectives, registry
from ..autoencoder.latents import LatentReader
from ..errors import SpecmatchError
from ..runtime import checkpoint, distributed, seeding
from ..runtime.hashing import sha256_file
from ..runtime.curves import Curves
from ..runtime.provenance import Provenance
from ..runtime.signals import StopRequest
from ..runtime.train_state import TrainingState, final_weights
from ..runtime.training import (METRICS_FILE, AttemptLog, FiniteGuard, Interrupted, NonFiniteLoss, Prefetch,
                                RankSetup, TrainSettings, batch_indices, compile_forward, end_of_step,
                                identity_fingerprint, lr_factor, make_ema, prepare_rank, run_folder, trim_metrics,
                                write_output)
from . import artifact, models, transport

log = logging.getLogger(__name__)

KIND = artifact.KIND
STAGE = "train-diffusion"

__all__ = ["train", "DiffusionTrainSettings", "Interrupted", "NonFiniteLoss"]


@dataclass(frozen=True)
class DiffusionTrainSettings(TrainSettings):
    """`train` of a diffusion run (schema `$defs/diff_train`): the shared settings and these."""

    label_dropout: float  # conditional runs: probability of the null label
    snapshot_steps: tuple[int, ...]  # EMA snapshots for the metric over training


def latents_identity(latents: str | Path) -> str:
    """The cache's manifest lists the sha256 of every shard: its hash identifies the data."""
    return sha256_file(Path(latents) / "manifest.json")


# `train` settings that leave the result alone: where it is computed, how often it is saved and
# logged, which steps' weights are kept aside, whether another length may continue it, and whether
# the network is compiled (another kernel schedule of the same arithmetic).
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "log_every", "device", "snapshot_steps", "extend", "compile")


def identity(run: dict[str, Any], latents_id: str, targets_id: str | None = None) -> dict[str, Any]:
    """Everything that shapes a diffusion run's result: the network, the process, the training
    settings (not the device or bookkeeping), the alignment that acts
    (`alignment.registry.effective`) and the identity of the latent cache it reads
    (`latents_identity`) and of the target cache. A run without alignment leaves the last two
    out: it keeps the fingerprint it had before alignment existed. Checkpoints record it; a resume
    compares it (`runtime.train_state`)."""
    train = {k: v for k, v in run["train"].items() if k not in _BOOKKEEPING}
    ident = {"model": run["model"], "process": run["process"], "conditional": run.get("conditional"),
             "train": train, "latents": latents_id}
    align = registry.effective(run.get("alignment") or {})
    if align["kind"] != "none":
        ident.update(alignment=align, targets=targets_id)
    return ident


def fingerprint(run: dict[str, Any], latents_id: str, targets_id: str | None = None) -> str:
    """What makes a checkpoint belong to a diffusion run: the hash of its `identity`, its length
    left out where the schedule does not depend on it (`runtime.training.identity_fingerprint`),
    so re-extracted latents or another setting start a fresh run rather than resume another."""
    return identity_fingerprint(identity(run, latents_id, targets_id))


def _num_classes(cache: LatentReader, conditional: bool) -> int:
    if not conditional:
        return 0
    n = int(cache.manifest.get("num_classes") or 0)
    if n < 1:
        raise SpecmatchError(f"{cache.folder}: a conditional run needs class labels, but the latent cache "
                             "records no num_classes (re-extract the latents)")
    return n


def _build_net(run: dict[str, Any], cache: LatentReader) -> torch.nn.Module:
    c, h, w = cache.shape
    if h != w:
        raise SpecmatchError(f"{cache.folder}: latents of {h}x{w}; the networks take square inputs")
    return models.build(run["model"], in_channels=c, input_size=h, num_classes=_num_classes(cache, run["conditional"]))


def train(run: dict[str, Any], latents: str | Path, out: str | Path, name: str, run_dir: str | Path | None = None,
          resume: str = "auto", runs_root: str | Path | None = None, targets: str | Path | None = None,
          dataset: str | Path | None = None) -> dict[str, Any]:
    """Train one diffusion run. `run`: resolved parameters (schema `$defs/diff_run`); `latents`:
    an `extract-latents` folder; `targets` (an `extract-targets` folder) or `dataset` (on-the-fly
    targets) serve alignment only."""
    run = config_mod.validate(run, "diff_run", where="diffusion run", source=f"parameters of {name}")
    t = DiffusionTrainSettings.from_params(run["train"], f"train of {name}")
    late = [s for s in t.snapshot_steps if s > t.steps]
    if late:
        raise SpecmatchError(f"train.snapshot_steps {late} of {name} lie beyond train.steps={t.steps}")
    latents = Path(latents)
    cache = LatentReader(latents)
    info = distributed.setup(t.device)
    try:
        rank_setup = prepare_rank(t, info)  # seeds this process: before the network is built
        net = _build_net(run, cache).to(info.device)
        align = None
        if run["alignment"]["kind"] != "none":
            from ..alignment.align import Alignment

            align = Alignment.for_run(run["alignment"], net, cache.manifest, latents, info.device, targets, dataset)
        settings = identity(run, latents_identity(latents), align.identity if align else None)
        fp = identity_fingerprint(settings)
        job = _Job(params=run, name=name, train=t, path=transport.from_params(run["process"]), latents=latents,
                   cache=cache, fp=fp, settings=settings, info=info, run_dir=run_folder(run_dir, runs_root, fp),
                   out=Path(out), resume=resume, rank=rank_setup)
        return _train(job, net, align)
    finally:
        distributed.teardown()


# Steps the loader thread reads ahead: enough to hide a slow read behind a few steps, few
# enough that the pinned buffers stay small (a SiT-B/1 REPA batch of 32 rows is ~13 MB).
PREFETCH = 3


@dataclass(frozen=True)
class HostBatch:
    """This rank's rows of one step's global batch, read on the host (`read_rows`): their cache
    entries, the posterior moments and labels, and what their alignment targets are made of."""

    entries: np.ndarray
    mu: torch.Tensor
    logvar: torch.Tensor
    labels: torch.Tensor
    align: torch.Tensor | None


def read_rows(cache: LatentReader, align, global_batch: int, seed: int, step: int, rows: slice,
              pin: bool = False) -> HostBatch:
    """The host side of step `step` for the rows `rows` of its global batch: the entries of the
    seeded global batch (`batch_indices`), and only this rank's rows read from the caches, in
    pinned memory when `pin` (the loader thread runs this)."""
    entries = batch_indices(len(cache), global_batch, seed, step)[rows]
    mu, logvar, labels = cache.get_tensors(entries, pin)
    return HostBatch(entries, mu, logvar, labels, align.fetch(entries, pin) if align is not None else None)


def draw_batch(cache: LatentReader, path: transport.Path, host: HostBatch, global_batch: int, seed: int, step: int,
               rows: slice, label_dropout: float, device: torch.device) -> tuple:
    """Step `step` on the training device: (scaled posterior samples, labels, t, diffusion
    noise, label-dropout mask) of this rank's rows. Every random draw comes from a stream seeded
    by (seed, step) on `device` and is made for the whole global batch, of which the rank keeps
    its rows: the same numbers on 1 or 8 ranks, and again after a resumption (bitwise on the
    CPU), at a cost that matters on the CPU only."""
    mu, logvar, y = (v.to(device, non_blocking=True) for v in (host.mu, host.logvar, host.labels))
    shape = (global_batch, *cache.shape)
    gen = torch.Generator(device=device).manual_seed(seeding.step_seed(seed, step, "posterior"))
    x0 = cache.scaled_sample(mu.float(), logvar.float(), torch.randn(shape, generator=gen, device=device)[rows])
    gen = torch.Generator(device=device).manual_seed(seeding.step_seed(seed, step, "diffusion"))
    tt = path.sample_t(global_batch, gen, device)[rows]
    noise = torch.randn(shape, generator=gen, device=device)[rows]
    drop = (torch.rand(global_batch, generator=gen, device=device) < label_dropout)[rows]
    return x0, y.long(), tt, noise, drop


@dataclass(frozen=True)
class _Job:
    """One training run as the loop sees it: its parameters, typed, and where it reads and writes."""

    params: dict[str, Any]  # the validated `diff_run` parameters, as provenance and the summary record them
    name: str
    train: DiffusionTrainSettings
    path: transport.Path  # the generative process
    latents: Path
    cache: LatentReader
    fp: str  # the run's fingerprint: keys its run folder and checkpoints
    settings: dict[str, Any]  # its `identity`, recorded in each checkpoint and compared on resume
    info: distributed.DistInfo
    run_dir: Path
    out: Path
    resume: str
    rank: RankSetup


def _train(job: _Job, net: torch.nn.Module, align) -> dict[str, Any]:
    t, cache, fp, info, run_dir, path = job.train, job.cache, job.fp, job.info, job.run_dir, job.path
    dev = info.device
    seed, global_batch, rows, use_bf16 = job.rank

    proj = align.projector.to(dev) if align is not None else None
    ema = make_ema(net, t.ema_decay)
    params = list(net.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t))

    state = TrainingState(KIND, fp, run_dir, info, t.keep_checkpoints,
                          modules={"net": net, "ema": ema, "proj": proj}, optimizers={"opt": opt},
                          schedulers={"sched": sched}, settings=job.settings, extend=t.extend)
    start, counts = state.resume(job.resume)
    step = counts["step"]
    if start:
        log.info("resumed from %s (step %d)", start, step)
    snapshot_steps = sorted(t.snapshot_steps)
    problem = None
    if info.is_main and step:
        try:
            _recover_snapshots(run_dir, [s for s in snapshot_steps if s <= step], fp, ema is not None)
        except SpecmatchError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)  # every rank stops, not only the main one
    if problem:
        raise SpecmatchError(problem)

    # Compiled in place after the EMA copy and the resume (`compile_forward`: no `_orig_mod.` keys).
    compile_forward(net, t.compile)
    model = DDP(net) if info.world_size > 1 else net
    projector = (DDP(proj) if info.world_size > 1 else proj) if proj is not None else None
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        trim_metrics(run_dir, step)
    log_path = run_dir / METRICS_FILE

    def save_snapshot() -> None:
        if info.is_main:
            src = ema.module if ema is not None else net
            prefix = "ema." if ema is not None else "net."
            artifact.write_snapshot(run_dir, step, {f"{prefix}{k}": v for k, v in src.state_dict().items()}, fp)

    def write_log(record: dict[str, Any]) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    steps = t.steps
    null = getattr(net, "null_label", 0)
    bar = tqdm(total=steps, initial=step, desc=f"train-diffusion {job.name}", unit="step", disable=not info.is_main)
    t_last, n_last = time.perf_counter(), step
    guard = FiniteGuard(info, run_dir)

    def checked_save() -> Path | None:
        guard.check()  # nothing computed after a non-finite loss is saved
        return state.save(step=step)

    pin = dev.type == "cuda"
    loader = Prefetch(lambda s: read_rows(cache, align, global_batch, seed, s, rows, pin), range(step, steps),
                      PREFETCH)
    # The attempt lasts until the output is written: a failure of the final save is recorded as one.
    with StopRequest() as stop, AttemptLog(run_dir, info, step, lambda: step) as attempt, loader, \
            Curves(run_dir, step, info.is_main) as curves:
        while step < steps:
            host = loader.get(step)
            x0, y, tt, noise, drop = draw_batch(cache, path, host, global_batch, seed, step, rows, t.label_dropout,
                                                dev)
            labels = torch.where(drop, torch.full_like(y, null), y) if net.num_classes else None
            x_t, target = path.interpolate(x0, noise, tt)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                if align is None:
                    pred = model(x_t, tt, labels)
                else:
                    pred, hidden = model(x_t, tt, labels, hidden_block=align.depth)
                    proj_tokens = projector(hidden)
            loss = path.loss(pred.float(), target).mean()
            terms = {"loss": loss}
            if align is not None:
                align_loss = objectives.alignment_loss(proj_tokens, align.targets_from(host.align, dev))
                terms = {"loss": loss + align.weight * align_loss, "diffusion_loss": loss, "align_loss": align_loss}
                loss = terms["loss"]
            guard.update(terms, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip:
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            elif (step + 1) % t.log_every == 0 or step + 1 == steps:
                # logged without clipping too (metrics.jsonl, the curves): measured, the gradients untouched
                terms["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(net)
            step += 1
            bar.update(1)

            if step % t.log_every == 0 or step == steps:
                guard.check()
                loss_all = loss.detach().clone()
                if info.world_size > 1:
                    loss_all = distributed.all_reduce_mean(loss_all)
            if info.is_main and (step % t.log_every == 0 or step == steps):
                now = time.perf_counter()
                rec = {"step": step, "lr": sched.get_last_lr()[0], "loss": float(loss_all),
                       "latents_per_s": (step - n_last) * global_batch / max(now - t_last, 1e-9),
                       **{k: float(v.detach()) for k, v in terms.items() if k != "loss"}}
                t_last, n_last = now, step
                write_log(rec)
                curves.log(step, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if step in snapshot_steps:
                guard.check()
                save_snapshot()
            end_of_step(step, steps, t.checkpoint_every, stop, info, checked_save, bar)
        bar.close()
        if steps > 0:
            checked_save()
        distributed.barrier()
        result: dict[str, Any] = {"steps": step}
        if info.is_main:
            result = _write_final(job, net, ema, step, align, snapshot_steps, attempt.as_finished())
        distributed.barrier()
    return result


def _recover_snapshots(run_dir: Path, steps: list[int], fp: str, has_ema: bool) -> None:
    """Snapshots of steps a resumed run has already passed: those written before the interruption
    stay in the run folder; a missing one (the step was added to snapshot_steps later) is taken
    from a kept checkpoint of exactly that step, or the run cannot produce it."""
    kept = dict(checkpoint.list_checkpoints(run_dir))
    missing = []
    for s in steps:
        if artifact.snapshot_ok(artifact.snapshot_path(run_dir, s), fp):
            continue
        if s not in kept:
            missing.append(s)
            continue
        tensors, _, _ = checkpoint.load(kept[s], KIND, fp)
        # The checkpoint holds the AveragedModel's state ("ema.module.<k>", "ema.n_averaged").
        prefix = "ema.module." if has_ema else "net."
        artifact.write_snapshot(run_dir, s, {("ema." if has_ema else "net.") + k[len(prefix):]: v
                                     for k, v in tensors.items() if k.startswith(prefix)}, fp)
        log.info("snapshot of step %d recovered from checkpoint %s", s, kept[s])
    if missing:
        raise SpecmatchError(
            f"train.snapshot_steps {missing} precede the step this run resumes from, and neither a snapshot nor a "
            f"checkpoint of those steps is kept in {run_dir}: the weights of those steps are gone. Drop them from "
            f"snapshot_steps, or remove {run_dir} to train the run again from step 0 (it then writes them)")


def _write_final(job: _Job, net, ema, steps: int, align, snapshot_steps: list[int],
                 attempts: list[dict]) -> dict[str, Any]:
    run, cache = job.params, job.cache
    prov = Provenance(STAGE, job.name, run, seeds={"train": job.train.seed})
    prov.add_input(job.latents, "latents")
    if align is not None and align.reader is not None:
        prov.add_input(align.reader.folder, "targets")
    elif align is not None:
        prov.add_input(align.images.folder, "dataset")
        prov.add_input(align.encoder.weights_path, f"weights:{align.info['encoder']}", align.encoder.weights_sha256)
    man = cache.manifest
    summary = {"name": job.name, "kind": KIND, "fingerprint": job.fp, "model": run["model"], "process": run["process"],
               "conditional": run["conditional"], "num_classes": net.num_classes, "in_channels": net.in_channels,
               "input_size": net.input_size, "token_grid": list(net.token_grid), "steps": steps,
               "world_size": job.info.world_size, "ema": ema is not None, "parameters": models.count_parameters(net),
               "latents": {"autoencoder": man["autoencoder"], "scale_factor": cache.scale_factor,
                           "shape": list(cache.shape), "count": man["count"],
                           "manifest_sha256": latents_identity(job.latents)},
               "alignment": align.info if align is not None else {"kind": "none"},
               "seed": job.train.seed}
    if snapshot_steps:
        summary["snapshots"] = {"steps": list(snapshot_steps), "weights": "ema" if ema is not None else "raw",
                                "files": [artifact.snapshot_path(Path(), s).as_posix() for s in snapshot_steps]}
    weights = final_weights("net", net, ema)
    write_output(job.out, job.run_dir, prov,
                 lambda tmp: artifact.write(tmp, weights, summary, job.fp, job.run_dir, snapshot_steps), attempts)
    log.info("diffusion %s: %s, %d steps, weights in %s", job.name, run["model"], steps, job.out)
    return summary
