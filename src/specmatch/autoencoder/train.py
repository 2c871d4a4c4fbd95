"""`specmatch train-ae`: the autoencoder trainer (docs/method.md §5), for one process or torchrun.

Runtime guarantees:
- Data order, flips, the DSM/scale mask and the posterior noise of step s are functions of
  (seed, s, rank) only (`seeding.step_rng`), so a run resumed from a checkpoint at step s
  follows the uninterrupted trajectory bit for bit on the CPU, and every rank draws the same k.
- The global batch is split over ranks: rank r takes rows [r*B/W, (r+1)*B/W) of the step's
  global batch. The generator is wrapped in DistributedDataParallel. The discriminator is not:
  its hinge loss needs two forwards (real, fake) before one backward, which DDP's reducer does
  not allow with BatchNorm kept per pass, so its gradients are averaged with one all-reduce of
  the flattened gradient vector. On several GPUs its BatchNorms become SyncBatchNorm
  (`disc.sync_batchnorm`, as the authors' trainer): statistics over the global batch.
- The schedule is the authors' (`disc.schedule: alternating`, forever208/SpectrumMatching
  vae_trainer.py): `steps` counts iterations, each one batch and one update; before `gan_start`
  every iteration updates the generator, from it on even iterations update the generator (with
  the GAN term) and odd ones the discriminator (on a fresh batch, against that batch's
  reconstruction). `disc.schedule: joint` is the LDM code base's two-optimiser scheme instead:
  every iteration a generator update and, from `gan_start`, a discriminator update on the same
  batch. Both counters are logged and recorded.
- Checkpoints (runtime.checkpoint) every `checkpoint_every` steps, on a stop signal (SIGTERM,
  SIGUSR1, SIGINT, SIGHUP; then exit code 3) and at the end; `--resume auto` continues from the
  newest valid one, only under the settings it records (`runtime.train_state`: another length
  needs `train.extend` and a constant schedule).
- A non-finite loss on any rank stops every rank with an error naming the step and the terms;
  nothing is saved after it, so the last checkpoint stays the last good one.
- The final artefact (weights, config, metrics log, provenance) is written atomically to the
  output folder; the run folder (checkpoints, live log) lives outside it, so Snakemake never
  deletes checkpoints of a failed or interrupted job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import config as config_mod
from .. import spectral
from ..data.reader import SplitReader
from ..errors import SpecmatchError
from ..runtime import distributed, seeding
from ..runtime.curves import Curves
from ..runtime.provenance import Provenance
from ..runtime.signals import StopRequest
from ..runtime.train_state import TrainingState, final_weights
from ..runtime.training import (METRICS_FILE, AttemptLog, NonFiniteLoss, TrainSettings, batch_indices, check_finite,
                                compile_forward, end_of_step, identity_fingerprint, lr_factor, make_ema, prepare_rank,
                                run_folder, trim_metrics, write_output)
from . import artifact
from . import model as ae_model
from .discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss, sync_batchnorm
from .model import to_float
from .objectives import Mask, Objective, adaptive_weight, draw_mask, objective

log = logging.getLogger(__name__)

KIND = artifact.KIND
STAGE = "train-ae"

__all__ = ["train", "AETrainSettings", "NonFiniteLoss"]


@dataclass(frozen=True)
class AETrainSettings(TrainSettings):
    """`train` of an autoencoder run (schema `$defs/ae_train`): the shared settings and these."""

    disc_lr: float | None  # None = lr
    hflip: float  # probability of a horizontal flip


@dataclass(frozen=True)
class _Job:
    """One autoencoder run as the loop sees it: its parameters, typed, and where it reads and writes."""

    params: dict[str, Any]  # the validated `ae_run` parameters, as provenance records them
    name: str
    train: AETrainSettings
    cfg: ae_model.AEConfig
    obj: Objective
    fp: str  # the run's fingerprint: keys its run folder and checkpoints
    settings: dict[str, Any]  # its `identity`, recorded in each checkpoint and compared on resume
    info: distributed.DistInfo
    dataset: Path
    run_dir: Path
    out: Path
    resume: str


# `train` settings that leave the result alone: where it is computed, how often it is saved and
# logged, whether another length may continue it, and whether the forwards are compiled (another
# kernel schedule of the same arithmetic: a run may be resumed compiled or eager).
_BOOKKEEPING = ("checkpoint_every", "keep_checkpoints", "log_every", "device", "extend", "compile")


def identity(run: dict[str, Any], images_sha256: str) -> dict[str, Any]:
    """Everything that shapes an autoencoder run's result: the training settings (not the device
    or bookkeeping intervals), the architecture resolved (a named config's fields, the padding
    included, so a change of a config's defaults starts a fresh run), variant, loss,
    discriminator and the sha256 of the train images (the data it was trained on). Checkpoints
    record it; a resume compares it (`runtime.train_state`)."""
    train = {k: v for k, v in run["train"].items() if k not in _BOOKKEEPING}
    config = dataclasses.asdict(ae_model.config(run["config"]))
    if not config["identity"]:
        del config["identity"]  # a field newer than the run folders it would otherwise re-key
    return {"dataset": run.get("dataset"), "config": config,
            "variant": run["variant"], "loss": run.get("loss", {}), "disc": run.get("disc", {}),
            "train": train, "data": images_sha256}


def fingerprint(run: dict[str, Any], images_sha256: str) -> str:
    """What makes a checkpoint belong to an autoencoder run: the hash of its `identity`, its length
    left out where the schedule does not depend on it (`runtime.training.identity_fingerprint`).
    The DAG keys run folders by it, so a parameter change starts a fresh run instead of resuming
    a foreign one."""
    return identity_fingerprint(identity(run, images_sha256))


def turns(schedule: str, step: int, gan_start: int) -> tuple[bool, bool]:
    """(generator update, discriminator update) at iteration `step` (0-based) of a schedule."""
    if step < gan_start:
        return True, False
    if schedule == "joint":
        return True, True
    return step % 2 == 0, step % 2 == 1


def prepare_discriminator(disc: torch.nn.Module, sync: bool, info: distributed.DistInfo) -> torch.nn.Module:
    """The discriminator as this process trains it: with SyncBatchNorm when asked for and the job
    has several processes. PyTorch's SyncBatchNorm computes on GPUs only, so several CPU
    processes with `sync` are refused rather than silently run with per-process statistics."""
    if not sync or info.world_size <= 1:
        return disc
    if info.device.type != "cuda":
        raise SpecmatchError(
            f"disc.sync_batchnorm: PyTorch's SyncBatchNorm runs on GPUs only, and this job has "
            f"{info.world_size} {info.device.type} processes; set disc.sync_batchnorm: false for per-process "
            "BatchNorm statistics")
    return sync_batchnorm(disc)


def load_batch(reader: SplitReader, idx: np.ndarray, hflip: float, seed: int, step: int,
               device: torch.device, rows: slice = slice(None)) -> torch.Tensor:
    """Images `idx[rows]` of the step's global batch `idx`, in [-1, 1], NCHW, flipped."""
    images, _ = reader.get(idx[rows])
    x = to_float(images, device)
    if hflip > 0:
        # Flip decisions for the whole global batch, indexed by position: rank-independent.
        flips = (seeding.step_rng(seed, step, "hflip").random(len(idx)) < hflip)[rows]
        sel = torch.from_numpy(flips).to(device)
        x = torch.where(sel[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class _Generator(torch.nn.Module):
    """One generator forward as a module, so DDP sees a single forward per backward."""

    def __init__(self, ae: ae_model.AutoencoderKL):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor, noise: torch.Tensor, mask: Mask, obj: Objective):
        post = self.ae.encode(x)
        z = post.mean + post.std * noise
        x_hat = self.ae.decode(mask.apply(z, obj))
        return x_hat, z, post.kl()


def _flat_all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if world <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _lpips_model(obj: Objective, resources_dir: str | None, device):
    if obj.lpips_weight <= 0:
        return None
    from ..metrics.recon import load_lpips

    return load_lpips(device=device, resources_dir=resources_dir).model


def train(run: dict[str, Any], dataset: str | Path, run_dir: str | Path | None, out: str | Path, name: str,
          resume: str = "auto", runs_root: str | Path | None = None) -> dict[str, Any]:
    """Train one autoencoder. `run`: the resolved run parameters (schema `$defs/ae_run`).
    Working folder: `run_dir`, or `runs_root/<fingerprint[:12]>` (`runtime.training.run_folder`)."""
    run = config_mod.validate(run, "ae_run", where="autoencoder run", source=f"parameters of {name}")
    settings = identity(run, SplitReader(dataset, "train").images_sha256)
    fp = identity_fingerprint(settings)
    t = AETrainSettings.from_params(run["train"], f"train of {name}")
    cfg = ae_model.config(run["config"])
    if cfg.identity != (run["variant"] == "pixels"):
        raise SpecmatchError(f"autoencoder {name}: variant {run['variant']!r} with config {cfg.name!r}: the pixel-space "
                             "identity takes config `pixels` (or any identity config) with variant `pixels`, and "
                             "neither goes with the other")
    info = distributed.setup(t.device)
    try:
        job = _Job(params=run, name=name, train=t, cfg=cfg, obj=objective(run["variant"], run.get("loss")), fp=fp,
                   settings=settings, info=info, dataset=Path(dataset), run_dir=run_folder(run_dir, runs_root, fp),
                   out=Path(out), resume=resume)
        return _write_identity(job) if cfg.identity else _train(job)
    finally:
        distributed.teardown()


def _train(job: _Job) -> dict[str, Any]:
    t, cfg, obj, info, run_dir = job.train, job.cfg, job.obj, job.info, job.run_dir
    dev = info.device
    seed, global_batch, rows, use_bf16 = prepare_rank(t, info)
    reader = SplitReader(job.dataset, "train")
    if reader.resolution % (cfg.down_factor * (obj.dsm_block if obj.dsm_ks else 1)):
        raise SpecmatchError(f"{job.dataset}: {reader.resolution} px images do not tile into the {cfg.down_factor}x "
                             f"down-sampling of config {cfg.name} and DSM blocks of {obj.dsm_block}")

    ae = ae_model.build(cfg).to(dev)
    d = job.params["disc"]
    disc = prepare_discriminator(PatchDiscriminator(3, d["channels"], d["n_layers"], d["init_std"]),
                                 d["sync_batchnorm"], info).to(dev)
    ema = make_ema(ae, t.ema_decay)
    opt_g = torch.optim.AdamW(ae.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr or t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_factor(t))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_factor(t))
    lpips = _lpips_model(obj, job.params["resources_dir"], dev)

    state = TrainingState(KIND, job.fp, run_dir, info, t.keep_checkpoints,
                          modules={"ae": ae, "disc": disc, "ema": ema}, optimizers={"opt_g": opt_g, "opt_d": opt_d},
                          schedulers={"sched_g": sched_g, "sched_d": sched_d}, counters=("step", "g_step", "d_step"),
                          settings=job.settings, extend=t.extend)
    start, counts = state.resume(job.resume)
    step, g_step, d_step = counts["step"], counts["g_step"], counts["d_step"]
    if start:
        log.info("resumed from %s (iteration %d: generator step %d, discriminator step %d)", start, step, g_step,
                 d_step)

    # Compiled after the EMA copy and the resume: both see the plain modules.
    plain_gen = compile_forward(_Generator(ae), t.compile, fullgraph=False)
    compile_forward(disc, t.compile)
    gen = DDP(plain_gen) if info.world_size > 1 else plain_gen
    disc_params = list(disc.parameters())
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        trim_metrics(run_dir, step)
    log_path = run_dir / METRICS_FILE

    def save_ckpt() -> Path | None:
        return state.save(step=step, g_step=g_step, d_step=d_step)

    steps, schedule, hinge_scale = t.steps, d["schedule"], d["hinge_scale"]
    h = reader.resolution // cfg.down_factor
    bar = tqdm(total=steps, initial=step, desc=f"train-ae {job.name}", unit="it", disable=not info.is_main)
    t_last, n_last = time.perf_counter(), step
    # The attempt lasts until the output is written: a failure of the final save is recorded as one.
    with StopRequest() as stop, AttemptLog(run_dir, info, step, lambda: step) as attempt, \
            Curves(run_dir, step, info.is_main) as curves:
        while step < steps:
            g_turn, d_turn = turns(schedule, step, obj.gan_start)
            idx = batch_indices(len(reader), global_batch, seed, step)
            x = load_batch(reader, idx, t.hflip, seed, step, dev, rows)
            mask = draw_mask(obj, seed, step, info.rank)
            # Posterior noise drawn for the global batch and sliced, like the images: the run
            # does not depend on how many processes share the batch.
            gcpu = torch.Generator().manual_seed(seeding.step_seed(seed, step, "posterior"))
            noise = torch.randn((global_batch, cfg.z_channels, h, h), generator=gcpu)[rows].to(dev)
            x_target = mask.apply(x, obj)
            terms: dict[str, torch.Tensor] = {}

            if g_turn:
                for p in disc_params:
                    p.requires_grad_(False)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    x_hat, z, kl = gen(x, noise, mask, obj)
                    x_hat = x_hat.float()
                    l1 = (x_target - x_hat).abs().mean()
                    terms.update(l1=l1, kl=kl.mean())
                    rec = obj.l1_weight * l1
                    if lpips is not None:
                        terms["lpips"] = lpips(x_hat, x_target).mean()
                        rec = rec + obj.lpips_weight * terms["lpips"]
                    loss = rec + obj.kl_weight * terms["kl"]
                    if obj.esm_weight > 0:
                        terms["esm"] = spectral.esm_loss(x, z, obj.esm_delta, obj.esm_n_bins, obj.esm_blur)
                        loss = loss + obj.esm_weight * terms["esm"]
                    if step >= obj.gan_start:
                        g_adv = generator_adv_loss(disc(x_hat))
                        lam = adaptive_weight(rec, g_adv, ae.last_layer, obj.adaptive_weight_max)
                        terms["g_adv"], terms["lambda"] = g_adv, lam
                        loss = loss + obj.gan_weight * lam * g_adv
                terms["loss"] = loss
                check_finite(terms, step, info, run_dir, "iteration")
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(ae.parameters(), t.grad_clip)
                opt_g.step()
                sched_g.step()
                if ema is not None:
                    ema.update_parameters(ae)
                g_step += 1
            elif d_turn:
                # The authors' discriminator iteration: this batch's reconstruction by the current
                # generator (no update of it, so no graph), then the discriminator's update.
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    x_hat = plain_gen(x, noise, mask, obj)[0].float()

            if d_turn:
                for p in disc_params:
                    p.requires_grad_(True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    d_loss = hinge_d_loss(disc(x_target.detach()), disc(x_hat.detach()), hinge_scale)
                check_finite({"d_loss": d_loss}, step, info, run_dir, "iteration")
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                _flat_all_reduce_grads(disc_params, info.world_size)
                torch.nn.utils.clip_grad_norm_(disc_params, t.grad_clip)
                opt_d.step()
                sched_d.step()
                d_step += 1
                terms["d_loss"] = d_loss
            step += 1
            bar.update(1)

            if info.is_main and (step % t.log_every == 0 or step == steps):
                now = time.perf_counter()
                rec_ = {"step": step, "g_step": g_step, "d_step": d_step,
                        "update": "G+D" if g_turn and d_turn else "G" if g_turn else "D",
                        "k": mask.k, "factor": mask.factor, "lr": sched_g.get_last_lr()[0],
                        "images_per_s": (step - n_last) * global_batch / max(now - t_last, 1e-9),
                        **{k: float(v.detach()) for k, v in terms.items()}}
                t_last, n_last = now, step
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec_) + "\n")
                curves.log(step, rec_)
                bar.set_postfix({k: f"{rec_[k]:.4f}" for k in ("loss", "l1", "d_loss") if k in rec_})
            end_of_step(step, steps, t.checkpoint_every, stop, info, save_ckpt, bar)
        bar.close()
        save_ckpt()
        distributed.barrier()
        result = {"steps": step, "generator_steps": g_step, "discriminator_steps": d_step}
        if info.is_main:
            result = _write_final(job, ae, ema, reader, step, g_step, d_step, attempt.as_finished())
        distributed.barrier()
    return result


def _write_identity(job: _Job) -> dict[str, Any]:
    """The pixel-space identity, written as a trained autoencoder of no weights and no steps: the
    stages after it read it like any other (`artifact.load`)."""
    result: dict[str, Any] = {"steps": 0, "generator_steps": 0, "discriminator_steps": 0}
    if job.info.is_main:
        reader = SplitReader(job.dataset, "train")
        result = _write_final(job, ae_model.build(job.cfg), None, reader, 0, 0, 0, [])
    distributed.barrier()
    return result


def _write_final(job: _Job, ae, ema, reader: SplitReader, step: int, g_step: int, d_step: int,
                 attempts: list[dict]) -> dict[str, Any]:
    cfg, obj = job.cfg, job.obj
    prov = Provenance(STAGE, job.name, job.params, seeds={"train": job.train.seed})
    prov.add_input(job.dataset, "dataset")
    summary = {"name": job.name, "kind": KIND, "fingerprint": job.fp,
               "config": cfg.__dict__ | {"channels": list(cfg.channels)},
               "variant": obj.variant, "objective": {**obj.__dict__, "dsm_ks": list(obj.dsm_ks),
                                                     "scale_factors": list(obj.scale_factors)},
               "iterations": step, "generator_steps": g_step, "discriminator_steps": d_step,
               "schedule": job.params["disc"]["schedule"],
               "discriminator_norm": ("SyncBatchNorm" if job.params["disc"]["sync_batchnorm"] and job.info.world_size > 1
                                      else "BatchNorm"),
               "world_size": job.info.world_size,
               "ema": ema is not None, "dataset_images_sha256": reader.images_sha256,
               "parameters": ae_model.count_parameters(ae)}
    weights = final_weights("ae", ae, ema)
    write_output(job.out, job.run_dir, prov, lambda tmp: artifact.write(tmp, weights, summary, job.fp), attempts)
    log.info("autoencoder %s: %d iterations (%d generator, %d discriminator updates), weights in %s", job.name, step,
             g_step, d_step, job.out)
    return summary
