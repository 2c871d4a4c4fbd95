"""`specmatch train-ae`: the autoencoder trainer (docs/method.md §5), for one process or torchrun.

Runtime guarantees:
- Data order, flips, the DSM/scale mask and the posterior noise of step s are functions of
  (seed, s, rank) only (`seeding.step_rng`), so a run resumed from a checkpoint at step s
  follows the uninterrupted trajectory bit for bit on the CPU, and every rank draws the same k.
- The global batch is split over ranks: rank r takes rows [r*B/W, (r+1)*B/W) of the step's
  global batch. The generator is wrapped in DistributedDataParallel. The discriminator is not:
  its hinge loss needs two forwards (real, fake) before one backward, which DDP's reducer does
  not allow with BatchNorm kept per pass, so its gradients are averaged with one all-reduce of
  the flattened gradient vector.
- `steps` counts generator updates; after `gan_start` every step also makes one discriminator
  update on the same batch (the two-optimiser scheme of the LDM code base), counted apart.
- Checkpoints (runtime.checkpoint) every `checkpoint_every` steps, on SIGTERM/SIGUSR1 (then
  exit code 3) and at the end; `--resume auto` continues from the newest valid one.
- A non-finite loss on any rank stops every rank with an error naming the step and the terms;
  nothing is saved after it, so the last checkpoint stays the last good one.
- The final artefact (weights, config, metrics log, provenance) is written atomically to the
  output folder; the run folder (checkpoints, live log) lives outside it, so Snakemake never
  deletes checkpoints of a failed or interrupted job.
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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .. import config as config_mod
from .. import spectral
from ..data.reader import SplitReader
from ..errors import SpecmatchError
from ..runtime import distributed, seeding
from ..runtime.provenance import Provenance
from ..runtime.signals import StopRequest
from ..runtime.training import (AttemptLog, NonFiniteLoss, TrainSettings, batch_indices, check_finite, end_of_step, final_weights,
                                load_packed, make_ema, pack_state, prepare_rank, resume_point, run_folder,
                                save_checkpoint, warmup, write_output)
from . import artifact
from . import model as ae_model
from .discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss
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
    info: distributed.DistInfo
    dataset: Path
    run_dir: Path
    out: Path
    resume: str


def fingerprint(run: dict[str, Any], images_sha256: str) -> str:
    return config_mod.ae_fingerprint(run, images_sha256)


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
    fp = fingerprint(run, SplitReader(dataset, "train").images_sha256)
    t = AETrainSettings.from_params(run["train"], f"train of {name}")
    info = distributed.setup(t.device)
    try:
        return _train(_Job(params=run, name=name, train=t, cfg=ae_model.config(run["config"]),
                           obj=objective(run["variant"], run.get("loss")), fp=fp, info=info, dataset=Path(dataset),
                           run_dir=run_folder(run_dir, runs_root, fp), out=Path(out), resume=resume))
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
    disc = PatchDiscriminator(3, d["channels"], d["n_layers"], d["init_std"]).to(dev)
    ema = make_ema(ae, t.ema_decay)
    opt_g = torch.optim.AdamW(ae.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr or t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup(t.warmup_steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup(t.warmup_steps))
    lpips = _lpips_model(obj, job.params["resources_dir"], dev)

    g_step = d_step = 0
    resumed = resume_point(run_dir, job.resume, KIND, job.fp, info)
    if resumed:
        start, tensors, state = resumed
        load_packed(tensors, ae=ae, disc=disc, ema=ema)
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sched_g.load_state_dict(state["sched_g"])
        sched_d.load_state_dict(state["sched_d"])
        g_step, d_step = int(state["g_step"]), int(state["d_step"])
        log.info("resumed from %s (generator step %d, discriminator step %d)", start, g_step, d_step)

    gen = DDP(_Generator(ae)) if info.world_size > 1 else _Generator(ae)
    disc_params = list(disc.parameters())
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "metrics.jsonl"

    def save_ckpt() -> Path | None:
        return save_checkpoint(info, run_dir, g_step, lambda: pack_state(ae=ae, disc=disc, ema=ema),
                               lambda: {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                        "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
                                        "g_step": g_step, "d_step": d_step},
                               KIND, job.fp, t.keep_checkpoints)

    steps = t.steps
    bar = tqdm(total=steps, initial=g_step, desc=f"train-ae {job.name}", unit="step", disable=not info.is_main)
    t_last, n_last = time.perf_counter(), g_step
    with StopRequest() as stop, AttemptLog(run_dir, info, g_step, lambda: g_step):
        while g_step < steps:
            idx = batch_indices(len(reader), global_batch, seed, g_step)
            x = load_batch(reader, idx, t.hflip, seed, g_step, dev, rows)
            mask = draw_mask(obj, seed, g_step)
            # Posterior noise drawn for the global batch and sliced, like the images: the run
            # does not depend on how many processes share the batch.
            gcpu = torch.Generator().manual_seed(seeding.step_seed(seed, g_step, "posterior"))
            h = reader.resolution // cfg.down_factor
            noise = torch.randn((global_batch, cfg.z_channels, h, h), generator=gcpu)[rows].to(dev)
            gan_on = g_step >= obj.gan_start
            x_target = mask.apply(x, obj)

            for p in disc_params:
                p.requires_grad_(False)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                x_hat, z, kl = gen(x, noise, mask, obj)
                x_hat = x_hat.float()
                l1 = (x_target - x_hat).abs().mean()
                terms = {"l1": l1, "kl": kl.mean()}
                rec = obj.l1_weight * l1
                if lpips is not None:
                    terms["lpips"] = lpips(x_hat, x_target).mean()
                    rec = rec + obj.lpips_weight * terms["lpips"]
                loss = rec + obj.kl_weight * terms["kl"]
                if obj.esm_weight > 0:
                    terms["esm"] = spectral.esm_loss(x, z, obj.esm_delta, obj.esm_n_bins, obj.esm_blur)
                    loss = loss + obj.esm_weight * terms["esm"]
                if gan_on:
                    g_adv = generator_adv_loss(disc(x_hat))
                    lam = adaptive_weight(rec, g_adv, ae.last_layer, obj.adaptive_weight_max)
                    terms["g_adv"], terms["lambda"] = g_adv, lam
                    loss = loss + obj.gan_weight * lam * g_adv
            terms["loss"] = loss
            check_finite(terms, g_step, info, run_dir, "generator step")
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(ae.parameters(), t.grad_clip)
            opt_g.step()
            sched_g.step()
            if ema is not None:
                ema.update_parameters(ae)

            if gan_on:
                for p in disc_params:
                    p.requires_grad_(True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    d_loss = hinge_d_loss(disc(x_target.detach()), disc(x_hat.detach()))
                check_finite({"d_loss": d_loss}, g_step, info, run_dir, "generator step")
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                _flat_all_reduce_grads(disc_params, info.world_size)
                torch.nn.utils.clip_grad_norm_(disc_params, t.grad_clip)
                opt_d.step()
                sched_d.step()
                d_step += 1
                terms["d_loss"] = d_loss
            g_step += 1
            bar.update(1)

            if info.is_main and (g_step % t.log_every == 0 or g_step == steps):
                now = time.perf_counter()
                rec_ = {"step": g_step, "d_step": d_step, "k": mask.k, "factor": mask.factor,
                        "lr": sched_g.get_last_lr()[0],
                        "images_per_s": (g_step - n_last) * global_batch / max(now - t_last, 1e-9),
                        **{k: float(v.detach()) for k, v in terms.items()}}
                t_last, n_last = now, g_step
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec_) + "\n")
                bar.set_postfix(loss=f"{rec_['loss']:.4f}", l1=f"{rec_['l1']:.4f}")
            end_of_step(g_step, steps, t.checkpoint_every, stop, info, save_ckpt, bar)
    bar.close()
    save_ckpt()
    distributed.barrier()
    result = {"steps": g_step, "d_steps": d_step}
    if info.is_main:
        result = _write_final(job, ae, ema, reader, g_step, d_step)
    distributed.barrier()
    return result


def _write_final(job: _Job, ae, ema, reader: SplitReader, g_step: int, d_step: int) -> dict[str, Any]:
    cfg, obj = job.cfg, job.obj
    prov = Provenance(STAGE, job.name, job.params, seeds={"train": job.train.seed})
    prov.add_input(job.dataset, "dataset")
    summary = {"name": job.name, "kind": KIND, "fingerprint": job.fp,
               "config": cfg.__dict__ | {"channels": list(cfg.channels)},
               "variant": obj.variant, "objective": {**obj.__dict__, "dsm_ks": list(obj.dsm_ks),
                                                     "scale_factors": list(obj.scale_factors)},
               "generator_steps": g_step, "discriminator_steps": d_step, "world_size": job.info.world_size,
               "ema": ema is not None, "dataset_images_sha256": reader.images_sha256,
               "parameters": ae_model.count_parameters(ae)}
    weights = final_weights("ae", ae, ema)
    write_output(job.out, job.run_dir, prov, lambda tmp: artifact.write(tmp, weights, summary, job.fp))
    log.info("autoencoder %s: %d steps, weights in %s", job.name, g_step, job.out)
    return summary
