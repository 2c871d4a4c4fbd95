"""`specmatch sample`: images from a trained diffusion model, decoded by its autoencoder.

Sample i (a global index in [0, N)) takes its initial noise from a generator seeded by
(seed, i) and its label from a seeded class-balanced list (N / num_classes per class, permuted)
or an i.i.d. draw seeded by (seed, i). Shard j holds samples [j * shard_size, (j + 1) *
shard_size), generated in fixed batches; the shards are spread round-robin over torchrun
ranks, so 1 and 4 processes produce the same images (the SDE's per-step noise is seeded per
batch, so it depends on `batch_size`, which is part of the sampling settings).

Finished shards stay in the work folder, so an interrupted job resumes where it stopped. The
folder belongs to one fingerprint: the sha256 of the model's and the autoencoder's weights and
the sampler settings, written to its `settings.json` before the first shard. A folder holding
another fingerprint, or shards without a `settings.json`, is refused with what differs, never
merged: an explicit --work-dir is the user's folder, whose shards may be hours of work, so it is
neither deleted nor mixed (--work-root, which the DAG passes, keys the folder by the
fingerprint, so a change of weights or settings gets a fresh folder). The model must also be
the one trained on this autoencoder's latents: where the lineage in the provenance records can
be followed (model -> latents -> autoencoder), an autoencoder other than the one that made the
latents is refused even when its name is the same.

Each shard's sha256 is recorded beside it (`<shard>.sha256`) once a pass over the shards is
complete; a resumed job checks every shard it keeps against that record, or, for shards of an
interrupted pass, reads the shard whole (zip CRCs, keys, shapes, sample indices), and makes
a damaged one again, saying which.

The shards are written in the dataset shard format (images, labels, sources = sample index), so
the output, a dataset-format folder (a `samples` split, uint8) that `specmatch fid calc --split
samples` reads directly, is made of the same files: hard-linked from the work folder, so a sample
set is stored once (50k ImageNet samples are ~10 GB), plus `sampling.json` (the protocol), a
sample grid and provenance. Where the output lies on another file system the shards are copied,
never moved: the work folder keeps every finished shard whatever happens to the merge.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from ..runtime import atomic, distributed, integrity, seeding
from ..runtime.hashing import sha256_json
from ..runtime.jsonfile import read_json
from ..runtime.provenance import RECORD_NAME, Provenance
from ..runtime.signals import StopRequest
from ..runtime.training import Interrupted, compile_forward, run_folder
from . import artifact, samplers, transport

log = logging.getLogger(__name__)

SPLIT = "samples"
WORK_SETTINGS = "settings.json"
SHARD_SHA = ".sha256"  # suffix of the sidecar holding a work shard's sha256
SHARD_MEMBERS = ("images", "labels", "sources", "nfe")
# Where the samples are computed and whether the network is compiled (another kernel schedule of
# the same arithmetic) leave the sample set's identity alone.
_SETTINGS_NOT_IN_FINGERPRINT = ("device", "compile")
_REMAKE = "run `specmatch sample` again with the same arguments: it makes a damaged work shard again"


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
    check_autoencoder(model_dir, summary, ae_dir, ae_summary)
    if p["cfg_scale"] != 1.0 and not summary["num_classes"]:
        raise SpecmatchError(f"cfg_scale={p['cfg_scale']} but {model_dir} is unconditional; use cfg_scale 1")
    path = transport.from_params(summary["process"])
    samplers.check(p["method"], path)  # e.g. DPM-Solver needs the VP path
    return path


def check_autoencoder(model_dir: Path, summary: dict[str, Any], ae_dir: Path, ae_summary: dict[str, Any]) -> None:
    """That `ae_dir` is the autoencoder whose latents the model at `model_dir` learnt: its name, its
    latent channels and, where the records allow, the very folder its latent cache was made from."""
    trained_on = summary["latents"]["autoencoder"]
    if trained_on != ae_summary["name"]:
        raise SpecmatchError(f"{model_dir} was trained on the latents of autoencoder {trained_on!r}, but "
                             f"--autoencoder {ae_dir} is {ae_summary['name']!r}")
    if summary["in_channels"] != ae_summary["config"]["z_channels"]:
        raise SpecmatchError(f"{model_dir}: {summary['in_channels']} latent channels, but {ae_dir} decodes "
                             f"{ae_summary['config']['z_channels']}")
    _check_lineage(model_dir, ae_dir, ae_summary["name"])


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((folder / RECORD_NAME).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _input(rec: dict[str, Any] | None, role: str) -> dict[str, Any] | None:
    found = [i for i in (rec or {}).get("inputs") or [] if isinstance(i, dict) and i.get("role") == role]
    return found[0] if len(found) == 1 else None


def _check_lineage(model_dir: Path, ae_dir: Path, ae_name: str) -> None:
    """Refuse an autoencoder other than the one whose latents trained the model. Names are not
    enough: a retrained autoencoder, or another run's, keeps its run name, and decoding a model's
    latents with it gives plausible-looking wrong images. The model's provenance names its latent
    cache (and the hash of that cache's record), whose record names the autoencoder (and the hash
    of its record). Where that chain cannot be followed (an imported model, a moved or re-made
    latent cache: the record hashes differ) only the names were compared, which is logged."""
    lat = _input(_record(model_dir), "latents")
    if lat is None:  # an imported model: no latent cache of ours
        return
    lat_dir = Path(lat.get("path", ""))
    lat_rec_path = lat_dir / RECORD_NAME
    if not lat_rec_path.is_file() or integrity.file_sha256(lat_rec_path) != lat.get("provenance_sha256"):
        log.info("%s: the latent cache it was trained on (%s) is not there as it was, so only the autoencoder's "
                 "name (%r) was compared", model_dir, lat_dir, ae_name)
        return
    ae_in = _input(_record(lat_dir), "autoencoder")
    want = (ae_in or {}).get("provenance_sha256")
    if not want:
        return
    ae_rec = ae_dir / RECORD_NAME
    have = integrity.file_sha256(ae_rec) if ae_rec.is_file() else None
    if have != want:
        raise SpecmatchError(
            f"{model_dir} was trained on the latents {lat_dir}, extracted by the autoencoder {ae_in.get('path')} "
            f"whose {RECORD_NAME} has sha256 {want} (input 'autoencoder' in {lat_rec_path}), but --autoencoder "
            f"{ae_dir} has {'no ' + RECORD_NAME if have is None else f'{RECORD_NAME} sha256 {have}'}: another "
            f"autoencoder with the same name {ae_name!r} (retrained, or another run's). Sample with the autoencoder "
            "the model was trained with, or extract its latents and train the model again")


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
    compile_forward(net, p["compile"])
    ae, ae_summary = ae_artifact.load(ae_dir, True, dev)
    path = check_compatible(p, model_dir, summary, ae_dir, ae_summary)
    scale = float(summary["latents"]["scale_factor"])
    # file_sha256: the loaders have just hashed both files (unless $SPECMATCH_VERIFY=0).
    ident = {"settings": {k: v for k, v in p.items() if k not in _SETTINGS_NOT_IN_FINGERPRINT},
             "model": integrity.file_sha256(model_dir / artifact.WEIGHTS),
             "autoencoder": integrity.file_sha256(ae_dir / ae_artifact.WEIGHTS)}
    fp = sha256_json(ident)
    work = run_folder(work_dir, work_root, fp)
    n = int(p["n_samples"])
    if info.is_main:
        _claim(work, fp, ident, p, model_dir, ae_dir)
    distributed.barrier()

    stop = StopRequest()

    def make(ids: np.ndarray) -> dict[str, np.ndarray]:
        if stop.should_stop():  # SIGTERM/USR1/INT/HUP: the shards written so far are the run's checkpoint
            raise Interrupted(f"interrupted by {stop.signal_name}; the finished shards stay in {work}")
        images, labels, nfe = generate(net, path, ae, scale, p, ids, n, dev, progress=info.is_main)
        return {"images": images, "labels": labels.astype(np.int64), "sources": ids, "nfe": np.array([nfe], np.int64)}

    with stop:
        written = write_round_robin(work, "shard", n, int(p["shard_size"]), make, info, f"sample {name}",
                                    done=_kept_shard(int(p["shard_size"])))
    rates = distributed.all_gather_object((written.made, written.seconds))
    distributed.barrier()
    result = None
    if info.is_main:
        _record_shards(work, written.shards)
        result = _merge(p, fp, summary, ae_summary, model_dir, ae_dir, work, n, written.shards, name, out, rates,
                        info.world_size)
    distributed.barrier()
    return result


def _claim(work: Path, fp: str, ident: dict[str, Any], p: dict[str, Any], model_dir: Path, ae_dir: Path) -> None:
    """Bind the work folder to one fingerprint (weights of model and autoencoder, settings):
    shards made with other weights or settings are never merged into this output. A folder of
    another fingerprint, or with shards but no settings.json to tell whose they are, is refused
    naming what differs (see the module's docstring for why it is not emptied instead)."""
    settings = work / WORK_SETTINGS
    if settings.is_file():
        held = read_json(settings, f"{settings}: missing")
        if not isinstance(held, dict):
            raise SpecmatchError(f"{settings}: not a JSON object (the sampling settings of the work folder)")
        if held.get("fingerprint") == fp:
            return
        raise SpecmatchError(
            f"{work} holds the shards of another sampling run (fingerprint {str(held.get('fingerprint'))[:12]}, this "
            f"run {fp[:12]}): {'; '.join(_differences(held, ident, model_dir, ae_dir))}. Its shards are not merged "
            "into this output: use another --work-dir, or --work-root (which keys the folder by the fingerprint), "
            f"or remove {work} to sample afresh")
    orphans = sorted(work.glob("shard-*.npz")) if work.is_dir() else []
    if orphans:
        raise SpecmatchError(
            f"{work}: {len(orphans)} shard(s) ({orphans[0].name}, ...) but no {WORK_SETTINGS}, which says which model, "
            "autoencoder and settings made them, so they cannot be told from another run's and are not merged: "
            f"remove them (or {work}) to sample afresh, or use another --work-dir")
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_text(settings, json.dumps({"fingerprint": fp, "model_sha256": ident["model"],
                                            "autoencoder_sha256": ident["autoencoder"], "model": str(model_dir),
                                            "autoencoder": str(ae_dir), **p}, indent=1) + "\n")


# settings.json keys besides the sampler settings, and settings that do not change the samples
_WORK_KEYS = ("fingerprint", "model_sha256", "autoencoder_sha256", "model", "autoencoder") + _SETTINGS_NOT_IN_FINGERPRINT


def _differences(held: dict[str, Any], ident: dict[str, Any], model_dir: Path, ae_dir: Path) -> list[str]:
    """What differs between a work folder's settings.json and this run, one phrase each."""
    out = []
    for what, folder in (("model", model_dir), ("autoencoder", ae_dir)):
        was = held.get(f"{what}_sha256")
        if was is not None and was != ident[what]:
            out.append(f"the {what}'s weights: sha256 {was} ({held.get(what, '?')}) in {WORK_SETTINGS}, "
                       f"{ident[what]} ({folder}) now")
    now = json.loads(json.dumps(ident["settings"]))  # tuples as lists, as the file holds them
    for k in sorted(set(now) | {k for k in held if k not in _WORK_KEYS}):
        if held.get(k) != now.get(k):
            out.append(f"key {k!r}: {held.get(k)!r} in {WORK_SETTINGS}, {now.get(k)!r} now")
    if not out:  # a settings.json written before the weights' sha256s were recorded in it
        out.append(f"the model's or the autoencoder's weights ({WORK_SETTINGS} predates recording their sha256)")
    return out


def _sidecar(shard: Path) -> Path:
    return shard.with_name(shard.name + SHARD_SHA)


def _record_shards(work: Path, shards: list[dict[str, Any]]) -> None:
    """Each shard's sha256 beside it, once every shard of the pass exists: a resumed job checks
    its shards against these."""
    for rec in shards:
        side = _sidecar(work / rec["file"])
        if not side.is_file() or side.read_text().strip() != rec["sha256"]:
            atomic.write_text(side, rec["sha256"] + "\n")


def _shard_problem(shard: Path, ids: np.ndarray) -> str | None:
    """Why a work shard left by an earlier attempt cannot be kept, or None when it can: its
    sha256 differs from the one recorded beside it, or (no record: a pass that was interrupted)
    it does not read whole (zip CRCs) with the arrays of these samples."""
    side = _sidecar(shard)
    recorded = side.read_text().strip() if side.is_file() else ""
    if recorded:
        found = integrity.file_sha256(shard)
        return None if found == recorded else f"sha256 {found}, but {side.name} records {recorded}"
    try:
        z = integrity.load_npz(shard, SHARD_MEMBERS)
    except SpecmatchError as e:
        return str(e).removeprefix(f"{shard}: ")
    n = len(ids)
    images, labels, sources = z["images"], z["labels"], z["sources"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[-1] != 3:
        return f"key 'images' is {images.dtype}{images.shape}, expected uint8 ({n}, H, W, 3)"
    if labels.shape != (n,):
        return f"key 'labels' has shape {labels.shape}, expected ({n},)"
    if sources.shape != (n,) or not np.array_equal(sources, ids):
        return f"key 'sources' does not hold the sample indices {ids[0]}..{ids[-1]}"
    if z["nfe"].size != 1:
        return f"key 'nfe' has shape {z['nfe'].shape}, expected one number"
    return None


def _kept_shard(shard_size: int):
    """`done` for `write_round_robin`: whether the work shard an earlier attempt left can be
    kept (`_shard_problem`); a damaged one is logged and made again, its record removed first so
    that the record never describes a file other than the shard beside it."""
    def done(shard: Path, count: int) -> bool:
        if not shard.is_file():
            _sidecar(shard).unlink(missing_ok=True)
            return False
        j = int(shard.stem.rsplit("-", 1)[1])
        problem = _shard_problem(shard, np.arange(j * shard_size, j * shard_size + count, dtype=np.int64))
        if problem is None:
            return True
        log.warning("%s: damaged work shard (%s); generating it again", shard, problem)
        _sidecar(shard).unlink(missing_ok=True)
        return False
    return done


def _stage(shard: Path, tmp: Path) -> Path:
    """A name for the work shard inside the output's temporary folder that the shard writer may
    consume (it links, or moves where it cannot link): a hard link where the file system allows
    one, a copy otherwise (another file system), so the work shard itself is never moved and a
    failed merge (the temporary folder removed) loses nothing."""
    staged = tmp / f".work-{shard.name}"
    try:
        os.link(shard, staged)
    except OSError:
        shutil.copyfile(shard, staged)
    return staged


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
            nfe = max(nfe, int(integrity.load_npz(shard, ("nfe",), _REMAKE)["nfe"].reshape(-1)[0]))
            staged = _stage(shard, tmp)
            writer.add_shard(staged, rec["sha256"])  # linked where it can be: the sample set is stored once
            staged.unlink(missing_ok=True)
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
            generated_now=made, seconds=busy, images_per_s=made / busy if made and busy > 0 else None,
            train_seed=summary.get("seed"))
        sample_folder.write(tmp, protocol)
        with np.load(tmp / entry["shards"][0]["file"], allow_pickle=False) as z:
            image_grid(z["images"][:64], tmp / "grid.png", title=f"{name}: {p['method']} {p['steps']} steps")
        prov.protocol = protocol.to_json()
        prov.write(out, tmp)
    log.info("sample %s: %d images (%d made now) in %s", name, n, made, out)
    return protocol
