"""`specmatch sample`: images from a trained diffusion model, decoded by its autoencoder.

Sample i (a global index in [0, N)) takes its initial noise from a generator seeded by
(seed, i) and its label from a seeded class-balanced list (N / num_classes per class, permuted)
or an i.i.d. draw seeded by (seed, i). Shard j holds samples [j * shard_size, (j + 1) *
shard_size), generated in fixed batches; the shards are spread round-robin over torchrun
ranks, so 1 and 4 processes produce the same images (the SDE's per-step noise is seeded per
batch, so it depends on `batch_size`, which is part of the sampling settings).

Finished shards stay in the work folder (keyed by the fingerprint of the model and autoencoder
weights and the settings), so an interrupted job resumes where it stopped. They are written in
the dataset shard format (images, labels, sources = sample index), so the output, a
dataset-format folder (a `samples` split, uint8) that `specmatch fid calc --split samples` reads
directly, is made of the same files: hard-linked from the work folder (moved where the two lie
on different file systems), so a sample set is stored once (50k ImageNet samples are ~10 GB),
plus `sampling.json` (the protocol), a sample grid and provenance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from .. import config as config_mod
from ..autoencoder import artifact as ae_artifact
from ..autoencoder.model import to_uint8
from ..data import sample_folder
from ..data.reader import member_layout
from ..data.round_robin import write_round_robin
from ..data.sample_folder import SamplingProtocol
from ..data.shards import MANIFEST_SCHEMA, ShardWriter, write_manifest
from ..errors import SpecmatchError
from ..runtime import atomic, distributed, seeding
from ..runtime.hashing import sha256_file, sha256_json
from ..runtime.provenance import Provenance
from ..runtime.training import run_folder
from . import artifact, samplers, transport

log = logging.getLogger(__name__)

SPLIT = "samples"
_SETTINGS_NOT_IN_FINGERPRINT = ("device",)


def labels_for(indices: np.ndarray, n_total: int, num_classes: int, seed: int, class_balanced: bool) -> np.ndarray:
    """Labels of the samples at global `indices` (int64; zeros for unconditional models)."""
    if num_classes <= 0:
        return np.zeros(len(indices), np.int64)
    if class_balanced:
        # N / C of each class (the remainder spread over the first classes), in a seeded order.
        balanced = np.arange(n_total, dtype=np.int64) % num_classes
        order = seeding.step_rng(seed, 0, "class-balanced-labels").permutation(n_total)
        return balanced[order][indices]
    return np.array([seeding.step_rng(seed, int(i), "label").integers(num_classes) for i in indices], np.int64)


def noise_for(indices: Iterable[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial noise of each sample, from a generator seeded by (seed, global index)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(seeding.step_seed(seed, int(i), "sample-noise")))
           for i in indices]
    return torch.stack(out)


def generate(net: torch.nn.Module, path, ae, scale_factor: float, p: dict[str, Any], indices, n_total: int,
             device: torch.device, progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """uint8 images (B, H, W, 3), labels and the number of network evaluations per sample, for
    the samples at global `indices` (a list), in batches of p['batch_size']."""
    indices = np.asarray(list(indices), np.int64)
    shape = (net.in_channels, net.input_size, net.input_size)
    labels = labels_for(indices, n_total, net.num_classes, p["seed"], p["class_balanced"])
    images, nfe = [], 0
    kw = {k: p[k] for k in ("t_min",) if p[k] is not None}
    if p["method"] == "dpm-solver":
        kw["order"] = p["order"]
    for b in tqdm(range(0, len(indices), p["batch_size"]), disable=not progress, desc="batches", leave=False):
        ids = indices[b:b + p["batch_size"]]
        x_T = noise_for(ids, shape, p["seed"]).to(device)
        y = torch.from_numpy(labels[b:b + len(ids)]).to(device) if net.num_classes else None
        if y is None:
            def model_fn(x, t):
                return net(x, t, None)
        else:
            model_fn = samplers.guided(net, y, net.null_label, p["cfg_scale"], tuple(p["cfg_interval"]))
        gen = torch.Generator(device=device).manual_seed(seeding.step_seed(p["seed"], int(ids[0]), "sde-noise"))
        with torch.no_grad():
            z, nfe = samplers.sample(p["method"], model_fn, x_T, path, p["steps"], generator=gen, **kw)
            x = ae.decode(z.float() / scale_factor)
        images.append(to_uint8(x))
    if not images:
        return np.zeros((0,) + shape[1:] + (3,), np.uint8), labels, nfe
    return np.concatenate(images), labels, nfe


def _alignment_label(a: dict[str, Any] | None) -> str:
    """'none', or e.g. 'dog (efficientnet-lite0-s8, depth 2, lambda 0.5)' for the tables."""
    if not a or a.get("kind", "none") == "none":
        return "none"
    return f"{a['kind']} ({a['encoder']}, depth {a['depth']}, lambda {a['weight']:g})"


def check_compatible(p: dict[str, Any], model_dir: Path, summary: dict[str, Any], ae_dir: Path,
                     ae_summary: dict[str, Any]):
    """The generative process of the model, after checking that the model, its autoencoder and the
    sampler `p` fit together (so nothing is written before a mismatch is found)."""
    trained_on = summary["latents"]["autoencoder"]
    if trained_on != ae_summary["name"]:
        raise SpecmatchError(f"{model_dir} was trained on the latents of autoencoder {trained_on!r}, but "
                             f"--autoencoder {ae_dir} is {ae_summary['name']!r}")
    if summary["in_channels"] != ae_summary["config"]["z_channels"]:
        raise SpecmatchError(f"{model_dir}: {summary['in_channels']} latent channels, but {ae_dir} decodes "
                             f"{ae_summary['config']['z_channels']}")
    if p["cfg_scale"] != 1.0 and not summary["num_classes"]:
        raise SpecmatchError(f"cfg_scale={p['cfg_scale']} but {model_dir} is unconditional; use cfg_scale 1")
    path = transport.from_params(summary["process"])
    samplers.check(p["method"], path)  # e.g. DPM-Solver needs the VP path
    return path


def sample(model_dir: str | Path, ae_dir: str | Path, params: dict[str, Any], name: str, out: str | Path,
           work_dir: str | Path | None = None, work_root: str | Path | None = None) -> SamplingProtocol | None:
    """Sample `n_samples` images of a trained model (`params`: the sampler's settings, schema
    `$defs/diff_sampler`) into `out`; the protocol on the main rank, None on the others."""
    p = config_mod.validate(params, "diff_sampler", where="sampler", source=f"sampling settings of {name}")
    model_dir, ae_dir, out = Path(model_dir), Path(ae_dir), Path(out)
    info = distributed.setup(p["device"])
    try:
        return _sample(p, info, model_dir, ae_dir, name, out, work_dir, work_root)
    finally:
        distributed.teardown()


def _sample(p, info, model_dir, ae_dir, name, out, work_dir, work_root):
    dev = info.device
    net, summary = artifact.load(model_dir, p["use_ema"], dev)
    ae, ae_summary = ae_artifact.load(ae_dir, True, dev)
    path = check_compatible(p, model_dir, summary, ae_dir, ae_summary)
    scale = float(summary["latents"]["scale_factor"])
    fp = sha256_json({"settings": {k: v for k, v in p.items() if k not in _SETTINGS_NOT_IN_FINGERPRINT},
                      "model": sha256_file(model_dir / artifact.WEIGHTS),
                      "autoencoder": sha256_file(ae_dir / "model.safetensors")})
    work = run_folder(work_dir, work_root, fp)
    n = int(p["n_samples"])
    if info.is_main:
        _claim(work, fp, p)
    distributed.barrier()

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        images, labels, nfe = generate(net, path, ae, scale, p, ids, n, dev, progress=info.is_main)
        return {"images": images, "labels": labels.astype(np.int64), "sources": ids, "nfe": np.array([nfe], np.int64)}

    written = write_round_robin(work, "shard", n, int(p["shard_size"]), make, info, f"sample {name}", done=_finished)
    rates = distributed.all_gather_object((written.made, written.seconds))
    distributed.barrier()
    result = None
    if info.is_main:
        result = _merge(p, fp, summary, ae_summary, model_dir, ae_dir, work, n, written.shards, name, out, rates,
                        info.world_size)
    distributed.barrier()
    return result


def _claim(work: Path, fp: str, p: dict[str, Any]) -> None:
    """Bind the work folder to one fingerprint: shards made with other weights or settings
    (an explicit --work-dir reused by hand) are never merged into this output."""
    settings = work / "settings.json"
    if settings.is_file():
        held = json.loads(settings.read_text()).get("fingerprint")
        if held != fp:
            raise SpecmatchError(f"{work} holds shards of other sampling settings or weights (fingerprint "
                                 f"{str(held)[:12]}, this run {fp[:12]}); use another --work-dir, or --work-root, "
                                 "which keys the folder by the fingerprint")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_text(settings, json.dumps({"fingerprint": fp, **p}, indent=1) + "\n")


def _finished(shard: Path, count: int) -> bool:
    """A shard left by an earlier attempt counts only if it is complete (written atomically, so
    a partial one cannot exist; a damaged one is regenerated)."""
    if not shard.is_file():
        return False
    try:
        with np.load(shard, allow_pickle=False) as z:
            # the dataset shard format (older work folders held `index` instead of `sources`)
            return "sources" in z.files and "nfe" in z.files and z["labels"].shape[0] == count
    except Exception as e:  # noqa: BLE001 - any unreadable shard is simply made again
        log.warning("%s is unreadable (%s); generating it again", shard, e)
        return False


def _merge(p, fp, summary, ae_summary, model_dir, ae_dir, work, n, shards, name, out, rates, world):
    from ..render.figures import image_grid

    made = sum(r[0] for r in rates)
    busy = max(r[1] for r in rates)
    nfe = 0
    prov = Provenance("sample", name, p, seeds={"sample": p["seed"]})
    prov.add_input(model_dir, "diffusion model")
    prov.add_input(ae_dir, "autoencoder")
    with atomic.atomic_dir(out) as tmp:
        res = member_layout(work / shards[0]["file"], "images.npy").shape[1]
        writer = ShardWriter(tmp, SPLIT, res, shard_size=n)
        for rec in shards:
            shard = work / rec["file"]
            with np.load(shard, allow_pickle=False) as z:
                nfe = max(nfe, int(z["nfe"].reshape(-1)[0]))
            writer.add_shard(shard, rec["sha256"])  # linked, not copied: the sample set is stored once
        entry = writer.close()
        write_manifest(tmp, {"schema": MANIFEST_SCHEMA, "name": name, "source": "samples", "resolution": res,
                             "classes": [], "num_classes": int(summary["num_classes"]), "splits": {SPLIT: entry},
                             "files": [], "skipped": [], "params_sha256": sha256_json(p)})
        protocol = SamplingProtocol(
            name=name, fingerprint=fp, model=summary["model"], diffusion=summary["name"],
            process=summary["process"]["kind"], trained_steps=summary["steps"],
            alignment=_alignment_label(summary.get("alignment")),
            weights="ema" if (p["use_ema"] and summary.get("ema")) else "raw",
            autoencoder=ae_summary["name"], scale_factor=summary["latents"]["scale_factor"],
            sampler=p["method"], steps=p["steps"], nfe_per_sample=nfe, order=p["order"],
            t_min=p["t_min"], cfg_scale=p["cfg_scale"], cfg_interval=tuple(p["cfg_interval"]),
            class_balanced=p["class_balanced"] if summary["num_classes"] else None,
            n_samples=n, seed=p["seed"], batch_size=p["batch_size"], world_size=world,
            generated_now=made, seconds=busy, images_per_s=made / busy if made and busy > 0 else None)
        sample_folder.write(tmp, protocol)
        with np.load(tmp / entry["shards"][0]["file"], allow_pickle=False) as z:
            image_grid(z["images"][:64], tmp / "grid.png", title=f"{name}: {p['method']} {p['steps']} steps")
        prov.protocol = protocol.to_json()
        prov.write(out, tmp)
    log.info("sample %s: %d images (%d made now) in %s", name, n, made, out)
    return protocol
