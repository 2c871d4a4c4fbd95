"""`specmatch <stage>`: the command-line contract shared by Snakemake rules, DVC stages,
SLURM jobs and people (docs/parameters.md). Each stage reads explicit inputs and its resolved
parameters (`--params`, a JSON object or a YAML/JSON file) and writes one output folder
atomically, with a provenance record."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__
from .errors import SpecmatchError

# Compute nodes have no internet: no library may try to reach a model hub from any process.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

PARAMS_HELP = "resolved parameters: a JSON object, or a YAML/JSON file holding one"


def _cmd_prepare_data(args) -> None:
    from . import config
    from .data.prepare import prepare

    prepare(config.parse_params_arg(args.params), args.name, args.out)


def _cmd_data_spectra(args) -> None:
    from . import config
    from .metrics import spectra

    spectra.run(args.dataset, config.parse_params_arg(args.params), args.grids, args.name, args.out)


def _cmd_fid_ref(args) -> None:
    from . import config
    from .metrics import fid_stage

    fid_stage.ref(args.dataset, config.parse_params_arg(args.params), args.name, args.out,
                  reference_batch=args.reference_batch)


def _cmd_export_adm(args) -> None:
    from .metrics import adm

    info = adm.export(args.samples, args.split, args.name, args.out)
    print(json.dumps({k: info[k] for k in ("name", "n", "image_shape", "npz_sha256")}))


def _cmd_fid_calc(args) -> None:
    from . import config
    from .metrics import fid_stage

    result = fid_stage.calc(args.samples, args.split, args.ref, config.parse_params_arg(args.params), args.name,
                            args.out, n_images=args.n_images)
    summary = result.to_json()
    print(json.dumps({"protocol": result.protocol_name,
                      **{k: v for k, v in summary.items() if k not in ("protocol", "samples", "reference", "sampling")}}))


def _cmd_train_ae(args) -> None:
    from .runtime.signals import catch_early

    catch_early()  # before torch is imported: a SLURM warning in the first minutes is kept
    from . import config
    from .autoencoder import train

    train.train(config.parse_params_arg(args.params), args.dataset, args.run_dir, args.out, args.name, args.resume,
                runs_root=args.runs_root)


def _cmd_import_ae(args) -> None:
    from . import config
    from .autoencoder import pretrained

    pretrained.import_autoencoder(config.parse_params_arg(args.params), args.name, args.out)


def _cmd_import_model(args) -> None:
    from . import config
    from .diffusion import convert

    summary = convert.import_model(config.parse_params_arg(args.params), args.checkpoint, args.name, args.out)
    print(json.dumps({k: summary[k] for k in ("name", "model", "parameters", "time_scale", "imported")}))


def _cmd_eval_ae(args) -> None:
    from . import config
    from .autoencoder import evaluate

    result = evaluate.evaluate(config.parse_params_arg(args.params), args.autoencoder, args.dataset, args.name,
                               args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("latent_spectrum", "protocol")}))


def _cmd_extract_latents(args) -> None:
    from . import config
    from .autoencoder import latents

    latents.extract(config.parse_params_arg(args.params), args.autoencoder, args.dataset, args.name, args.out)


def _cmd_train_diffusion(args) -> None:
    from .runtime.signals import catch_early

    catch_early()  # before torch is imported: a SLURM warning in the first minutes is kept
    from . import config
    from .diffusion import train

    train.train(config.parse_params_arg(args.params), args.latents, args.out, args.name, run_dir=args.run_dir,
                resume=args.resume, runs_root=args.runs_root, targets=args.targets, dataset=args.dataset)


def _cmd_extract_targets(args) -> None:
    from . import config
    from .alignment import targets

    targets.extract(config.parse_params_arg(args.params), args.dataset, args.name, args.out)


def _cmd_target_spectra(args) -> None:
    from . import config
    from .alignment import diagnostics

    df = diagnostics.run(args.targets, config.parse_params_arg(args.params), args.name, args.out)
    print(df[["encoder", "kind", "RMSC2", "psd_exponent", "grid"]].to_string(index=False))


def _cmd_sample(args) -> None:
    from . import config
    from .diffusion import sample

    result = sample.sample(args.model, args.autoencoder, config.parse_params_arg(args.params), args.name, args.out,
                           work_dir=args.work_dir, work_root=args.work_root)
    if result is not None:
        print(json.dumps({k: getattr(result, k) for k in ("name", "n_samples", "sampler", "steps", "nfe_per_sample",
                                                          "images_per_s")}))


def _cmd_report_generation(args) -> None:
    from .report import tables

    df = tables.write_generation(args.metrics, args.name, args.out)
    print(df[["diffusion", "sampler", "metric", "value"]].to_string(index=False))


def _cmd_fid_progress(args) -> None:
    from . import config
    from .diffusion import progress

    df = progress.run(args.model, args.autoencoder, args.ref, config.parse_params_arg(args.params), args.name, args.out)
    print(df[["diffusion", "step", "source", "metric", "value", "n_samples"]].to_string(index=False))


def _cmd_report_paper(args) -> None:
    from . import config
    from .report import paper

    inputs = paper.Inputs.load(spectra=args.spectra, ae_eval=args.ae_eval, diffusion=args.diffusion,
                               gen_metrics=args.gen_metrics, samples=args.samples,
                               target_spectra=args.target_spectra, progress=args.progress, floors=args.floors)
    tables = paper.write(config.parse_params_arg(args.params), inputs, args.name, args.out)
    print(f"{args.out}/{paper.INDEX}: " + ", ".join(f"{k} ({len(v)} rows)" for k, v in tables.items() if len(v)))


def _cmd_data_add(args) -> None:
    from .data import versioning

    for path in args.paths:
        pointer = versioning.add(path, args.root)
        print(f"{path}: tracked by DVC ({pointer.name}); next: git add {pointer.name} .gitignore && dvc push")


def _cmd_dvc_deps(args) -> None:
    from . import dvc_stages

    old, new = dvc_stages.check(args.root, build_parser())
    diff = dvc_stages.differences(old, new)
    if args.write and diff:
        from .runtime import atomic

        atomic.write_text(f"{args.root}/dvc.yaml", new)
        print(f"dvc.yaml: deps rewritten ({sum(1 for d in diff if d.startswith(('+ ', '- ')))} lines changed)")
    elif args.write or args.check:
        print("dvc.yaml: deps up to date" if not diff else "\n".join(diff))
        if diff:
            raise SpecmatchError("dvc.yaml: the code deps differ from the import graph; run `specmatch dvc deps --write`")
    else:
        for stage, deps in dvc_stages.stage_deps(args.root, build_parser()).items():
            print(f"{stage}:\n" + "".join(f"  {d}\n" for d in deps), end="")


def _cmd_dvc_adopt(args) -> None:
    from . import dvc_stages

    for cmd in dvc_stages.adopt(args.root):
        print(f"ran: {cmd}")
    print("dvc.lock: every stage's dependencies, parameters and outputs recorded (dvc commit --force)")


def _cmd_dvc_metrics(args) -> None:
    from .metrics import summary

    result = summary.write_metrics(args.folders, args.file, args.out)
    print(f"{args.out}: {len(result)} run(s)")


def _cmd_container_binds(args) -> None:
    from . import container

    specs = container.binds(args.root)
    # One line for the shell of a rule's container call (slurm/config.yaml: apptainer-args).
    print(f"--bind {','.join(specs)}" if specs else "")


def _cmd_container_check(args) -> None:
    from . import container

    bad = 0
    for path in args.definitions:
        problems = container.check(path)
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  - {p}")
        bad += bool(problems)
    if bad:
        raise SpecmatchError(f"{bad} definition file(s) failed the check")


class _AuditFailed(Exception):
    exit_code = 1


def _cmd_audit(args) -> None:
    from . import audit

    tree, problems = audit.audit(args.artefact, args.root, dvc=not args.no_dvc)
    failures = [p for p in problems if not p.startswith("note: ")]
    if args.json:
        print(json.dumps({"artefact": args.artefact, "ok": not failures, "problems": problems,
                          "lineage": [{"path": n.path, "role": n.role, "problems": n.problems}
                                      for n in audit.walk(tree)]}, indent=1))
    else:
        print("\n".join(audit.render(tree)))
        for p in problems:
            print(p)
    if failures:
        raise _AuditFailed(f"audit of {args.artefact} failed: {len(failures)} problem(s), e.g. {failures[0]}")


def _cmd_resources_check(args) -> None:
    from . import resources

    names = args.names or sorted(resources.manifest())
    bad = []
    for name in names:
        st = resources.check(resources.get(name), args.dir)
        if not st["present"]:
            state = "MISSING"
        elif not st["ok"]:
            state = "MISMATCH"
        else:
            state = "ok" if st["verified"] else "present (no published checksum)"
        print(f"{name:20s} {state:34s} {st['path']}  expected {st['expected']}"
              + (f", got {st['sha256']}" if st["present"] and not st["ok"] else ""))
        if state in ("MISSING", "MISMATCH"):
            bad.append(name)
    if bad:
        raise SpecmatchError(f"{len(bad)} pretrained file(s) missing or mismatched: {', '.join(bad)} "
                             "(see resources/manifest.yaml for where to obtain each)")


def _cmd_params_show(args) -> None:
    from . import config

    resolved = config.load(args.params_file, args.preset)
    section = resolved
    if args.run:
        # What the DAG passes to a stage: a run's entry merged over the shared settings.
        kind, _, name = args.run.partition(":")
        resolve = {"autoencoder": config.autoencoder_run, "diffusion": config.diffusion_run,
                   "sampler": config.sampler}.get(kind)
        if resolve is None or not name:
            raise SpecmatchError(f"--run {args.run!r}: expected autoencoder:NAME, diffusion:NAME or sampler:NAME")
        section = resolve(resolved, name)
    for key in filter(None, (args.key or "").split(".")):
        if not isinstance(section, dict) or key not in section:
            raise SpecmatchError(f"{args.params_file}: no key {args.key!r} in the resolved parameters")
        section = section[key]
    print(json.dumps(section, indent=None if args.compact else 2, sort_keys=True))


def _stage_io(p: argparse.ArgumentParser, func, name_help: str = "run name, recorded in the outputs",
              params_required: bool = False) -> None:
    """The arguments every stage shares: its run name, its resolved parameters, its output."""
    p.add_argument("--name", required=True, help=name_help)
    if params_required:
        p.add_argument("--params", required=True, help=PARAMS_HELP)
    else:
        p.add_argument("--params", default="{}", help=PARAMS_HELP + " (default: all defaults)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.set_defaults(func=func)


def _run_dir_args(p: argparse.ArgumentParser) -> None:
    """A trainer's working folder (checkpoints, live log) and how to resume in it."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-dir", help="working folder of the run (checkpoints, live log)")
    g.add_argument("--runs-root", help="use RUNS_ROOT/<fingerprint[:12]> as the run folder; the fingerprint covers "
                                       "the parameters that shape training and the identity of the input data, so "
                                       "changed inputs start a fresh run (what the DAG passes)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest valid checkpoint of the run folder, default), none (fresh; refuses a run "
                        "folder that has checkpoints) or a checkpoint folder")


def _autoencoder_stage_io(p: argparse.ArgumentParser, func) -> None:
    """Stages that read a trained autoencoder and its dataset."""
    p.add_argument("--autoencoder", required=True, help="train-ae output folder")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from prepare-data)")
    _stage_io(p, func, params_required=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"specmatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = sub.add_parser("prepare-data", help="build a dataset's uint8 shards and manifest",
                       description="Build a dataset (embedded crops, an image folder, or ImageNet class "
                                   "folders) into uint8 npz shards (train-*.npz, test-*.npz) with "
                                   "manifest.json and provenance.json in OUT. Parameters: the "
                                   "`datasets.<name>` section of params.yaml (see docs/parameters.md).")
    _stage_io(p, _cmd_prepare_data, "dataset name (the key under `datasets`)", params_required=True)

    p = sub.add_parser("data-spectra", help="spectrum distributions and PSD exponent of a dataset",
                       description="Spectrum distributions of a prepared dataset at each latent grid "
                                   "size (training setting with the delta-tilted ESM targets, and the "
                                   "analysis setting), and its PSD exponent. Writes spectra.json, "
                                   "spectrum_distribution.png and provenance.json in OUT. Parameters: "
                                   "the `spectra` section of params.yaml.")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from prepare-data)")
    p.add_argument("--grids", type=int, nargs="+", required=True, help="latent grid sizes (h = w)")
    _stage_io(p, _cmd_data_spectra, "dataset name, recorded in the outputs")

    p = sub.add_parser("train-ae", help="train an autoencoder (SD-VAE, ESM-AE, DSM-AE, ...)",
                       description="Train one autoencoder run (docs/method.md §5) on a prepared dataset's train split, "
                                   "in one process or under torchrun (one process per GPU; gloo on CPU). "
                                   "Checkpoints go to RUN_DIR/checkpoints every train.checkpoint_every "
                                   "steps, on SIGTERM/SIGUSR1 (then exit status 3) and at the end; the "
                                   "metrics log to RUN_DIR/metrics.jsonl. The finished model "
                                   "(model.safetensors, autoencoder.json, metrics.jsonl, provenance.json) is "
                                   "written atomically to OUT. Parameters: one resolved autoencoder run "
                                   "(`specmatch params show --key ...`; schema $defs/ae_run).")
    p.add_argument("--dataset", required=True, help="prepared dataset folder (from prepare-data)")
    _run_dir_args(p)
    _stage_io(p, _cmd_train_ae, params_required=True)

    p = sub.add_parser("import-ae", help="a released SD-VAE (diffusers AutoencoderKL files) as an autoencoder",
                       description="Load a diffusers-format AutoencoderKL (config.json and "
                                   "diffusion_pytorch_model.safetensors, e.g. sd-vae-ft-ema) provided as files: the "
                                   "resource `pretrained` of the run (resources/manifest.yaml, sha256-checked), "
                                   "config.json beside it. Maps it onto our autoencoder with SD's down-sampling "
                                   "padding and writes OUT like train-ae (model.safetensors, autoencoder.json, "
                                   "provenance.json with the files' sha256), for eval-ae and extract-latents. "
                                   "Nothing is downloaded. Parameters: one resolved autoencoder run with "
                                   "`pretrained` (docs/autoencoders.md).")
    _stage_io(p, _cmd_import_ae, params_required=True)

    p = sub.add_parser("import-model", help="a released U-ViT / SiT / REPA checkpoint as a trained diffusion model",
                       description="Convert a released diffusion checkpoint provided as a file (baofff/U-ViT, "
                                   "willisma/SiT with its learned-sigma rows, sihyun-yu/REPA with its projectors "
                                   "dropped) to our conventions (time scale, token order, the direction of SiT's "
                                   "interpolant) and write OUT like train-diffusion (model.safetensors, "
                                   "diffusion.json, provenance.json with the file's sha256), for `specmatch sample`. "
                                   "Parameters: schema $defs/import_model (layout, model, autoencoder, ...; "
                                   "docs/diffusion.md).")
    p.add_argument("--checkpoint", required=True, help="the released checkpoint file (.pt, .pth or .safetensors)")
    _stage_io(p, _cmd_import_model, params_required=True)

    p = sub.add_parser("eval-ae", help="reconstruction and spectral metrics of a trained autoencoder",
                       description="Evaluate a train-ae output on a held-out split with deterministic "
                                   "reconstructions (posterior mean): rFID (or rFD-EffNetLite0), PSNR, SSIM, "
                                   "LPIPS, low-pass rFID for each k of eval.lowpass_ks, and the latent spectrum "
                                   "distribution against the image's delta target (KL, ESM loss, PSD exponent). "
                                   "Writes metrics.json, latent_spectrum.png and provenance.json in OUT. "
                                   "Parameters: one resolved autoencoder run (its `eval` section).")
    _autoencoder_stage_io(p, _cmd_eval_ae)

    p = sub.add_parser("extract-latents", help="latent cache (mu, logvar) and scale factor for diffusion",
                       description="Encode the train split (and its mirror images, latents.hflip) into npz "
                                   "shards of mu and logvar with manifest.json (the scale factor 1/std of "
                                   "posterior samples included) and provenance.json in OUT. Runs in one "
                                   "process or under torchrun. Parameters: one resolved autoencoder run "
                                   "(its `latents` section).")
    _autoencoder_stage_io(p, _cmd_extract_latents)

    p = sub.add_parser("train-diffusion", help="train a latent diffusion model (U-ViT, SiT) on a latent cache",
                       description="Train one diffusion run (docs/method.md §6) on an `extract-latents` cache (scaled by its "
                                   "scale factor), in one process or under torchrun. Checkpoints, signals and "
                                   "--resume as in train-ae. The finished model (model.safetensors with the raw "
                                   "and EMA weights, diffusion.json, metrics.jsonl, provenance.json) is written "
                                   "atomically to OUT. Parameters: one resolved diffusion run (`specmatch params "
                                   "show --key ...`; schema $defs/diff_run).")
    p.add_argument("--latents", required=True, help="latent cache folder (from extract-latents)")
    _run_dir_args(p)
    p.add_argument("--targets", default=None, help="extract-targets folder (alignment with targets: cached)")
    p.add_argument("--dataset", default=None, help="prepared dataset of the latents (alignment with targets: on-the-fly)")
    _stage_io(p, _cmd_train_diffusion, params_required=True)

    p = sub.add_parser("extract-targets", help="alignment targets (frozen encoder token grids) of the train split",
                       description="Run a frozen target encoder (DINOv2 ViT-B/14 from resources/, or "
                                   "EfficientNet-Lite0 feature maps) over the train split (and its mirror images, "
                                   "hflip), in the latent cache's entry order, and write npz shards of the raw token "
                                   "grids with manifest.json and provenance.json to OUT. Runs under torchrun "
                                   "(shards round-robin over ranks). Parameters: schema $defs/targets "
                                   "(encoder, image_size, hflip, batch_size, shard_size, dtype, device).")
    p.add_argument("--dataset", required=True, help="prepared dataset folder")
    _stage_io(p, _cmd_extract_targets, params_required=True)

    p = sub.add_parser("target-spectra", help="spectral diagnostics of alignment targets (RMSC^2, spectra)",
                       description="For each target cache and each target kind (repa, irepa, dog): the directional "
                                   "spectral energy RMSC^2 and the spectrum distribution of the target field, as "
                                   "target_spectra.csv/.md, distributions.csv and target_spectra.png in OUT. "
                                   "Parameters: schema $defs/target_spectra.")
    p.add_argument("--targets", required=True, nargs="+", help="extract-targets folders")
    _stage_io(p, _cmd_target_spectra)

    p = sub.add_parser("sample", help="generate images with a trained diffusion model and its autoencoder",
                       description="Draw n_samples images (noise and label of each from its global index and the "
                                   "seed), decode them with the autoencoder, and write OUT as a dataset folder with "
                                   "one split `samples` (uint8 npz + manifest.json), sampling.json (the protocol), "
                                   "grid.png and provenance.json. Runs under torchrun (shards round-robin over "
                                   "ranks); finished shards stay in the work folder, so a killed job resumes. "
                                   "Parameters: one resolved sampler (schema $defs/diff_sampler).")
    p.add_argument("--model", required=True, help="train-diffusion output folder")
    p.add_argument("--autoencoder", required=True, help="train-ae output folder whose latents the model learnt")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--work-dir", help="folder of the finished shards (kept for resumption)")
    g.add_argument("--work-root", help="use WORK_ROOT/<fingerprint[:12]> as the work folder (fingerprint of the "
                                       "weights and settings)")
    _stage_io(p, _cmd_sample, params_required=True)

    p = sub.add_parser("fid-progress", help="generation metric of a diffusion run's snapshots over training",
                       description="Sample every snapshot of a train-diffusion output (train.snapshot_steps) and its "
                                   "final weights with one sampler and n_samples samples (the same noise and labels "
                                   "at every point), decode them with the autoencoder and score them against "
                                   "reference statistics with the metric of `fid calc`. Writes progress.csv (one row "
                                   "per step: metric by name, value, precision, recall, IS and the protocol), "
                                   "progress.json and provenance.json in OUT. Parameters: {\"sampler\": resolved "
                                   "sampler settings (the run's first sampler; n_samples is replaced), \"metrics\": "
                                   "the `metrics` section, \"n_samples\": report.progress.n_samples}.")
    p.add_argument("--model", required=True, help="train-diffusion output folder with snapshots/")
    p.add_argument("--autoencoder", required=True, help="train-ae output folder whose latents the model learnt")
    p.add_argument("--ref", required=True, help="reference statistics folder (from `fid ref`)")
    _stage_io(p, _cmd_fid_progress, params_required=True)

    p = sub.add_parser("fid", help="Fréchet distance: reference statistics and sample metrics")
    fsub = p.add_subparsers(dest="fid_command", required=True)
    q = fsub.add_parser("ref", help="reference statistics of a prepared dataset split or an ADM reference batch",
                        description="Embed a prepared split (metrics.split, or a seeded subset of "
                                    "metrics.max_images) in one streaming pass with the feature net of "
                                    "metrics.net and metrics.protocol (adm, pytorch-fid), or read an ADM reference "
                                    "batch (npz: arr_0, mu, sigma, mu_s, sigma_s), and write stats.npz (float64 mu, "
                                    "sigma, mu_s, sigma_s under adm; pr_features: the precision/recall reference), "
                                    "stats.json (protocol, source and its sha256, images sha256) and provenance.json "
                                    "in OUT. Parameters: the `metrics` section (its datasets.<name> override applies "
                                    "for the dataset's name, or NAME for a reference batch).")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset folder (from prepare-data)")
    src.add_argument("--reference-batch", help="ADM reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    _stage_io(q, _cmd_fid_ref)
    q = fsub.add_parser("calc", help="FID, sFID, IS and precision/recall of samples vs a reference",
                        description="Embed every image of a sample set (npz shards with a manifest) and "
                                    "compare it with reference statistics from `fid ref` made under the same "
                                    "protocol. Writes metrics.json (the protocol name; the distance under its "
                                    "metric name: FID for inception-fid, FD-EffNetLite0 for efficientnet-lite0; "
                                    "sFID under adm; IS; precision and recall; with metrics.bootstrap > 0 the "
                                    "distance's standard error) and provenance.json in OUT.")
    q.add_argument("--samples", required=True, help="folder of npz shards with a manifest")
    q.add_argument("--split", default="train", help="split of the sample folder (default: train)")
    q.add_argument("--ref", required=True, help="reference statistics folder (from `fid ref`)")
    q.add_argument("--n-images", type=int, default=None,
                   help="score a seeded subset of this many images of the split (default: all): the real floor "
                        "at the sample count of a generation metric")
    _stage_io(q, _cmd_fid_calc)

    p = sub.add_parser("export-adm", help="a sample set as an ADM sample batch (npz) for the official evaluator",
                       description="Write the images of a split (the `samples` split of a `specmatch sample` output) "
                                   "in ADM's sample layout, OUT/samples.npz (arr_0 uint8 NHWC, arr_1 int64 labels, no "
                                   "mu), with adm_export.json (count, shape, images sha256 equal to the manifest's, "
                                   "npz sha256, sampling protocol) and provenance.json, for `python evaluator.py "
                                   "<reference batch> OUT/samples.npz` (docs/metrics.md).")
    p.add_argument("--samples", required=True, help="folder of npz shards with a manifest (a `sample` output)")
    p.add_argument("--split", default="samples", help="split of the folder (default: samples)")
    p.add_argument("--name", required=True, help="run name, recorded in the outputs")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.set_defaults(func=_cmd_export_adm)

    p = sub.add_parser("report", help="result tables")
    rsub = p.add_subparsers(dest="report_command", required=True)
    q = rsub.add_parser("generation", help="table of generation metrics with their protocol",
                        description="Collect `fid calc` outputs of `sample` folders into generation.csv and "
                                    "generation.md (one row per sample set: the run, sampler, steps, NFE, "
                                    "guidance, number of samples, the metric by name, precision/recall, IS, the "
                                    "reference and feature weights) plus provenance.json in OUT.")
    q.add_argument("--metrics", nargs="+", required=True, help="`fid calc` output folders")
    q.add_argument("--name", required=True, help="table name, recorded in the outputs")
    q.add_argument("--out", required=True, help="output folder (replaced atomically)")
    q.set_defaults(func=_cmd_report_generation)
    q = rsub.add_parser("paper", help="the paper's tables (E1-E4) and figures, and the report page",
                        description="Collect the stage outputs of the grid into the paper's experiments (docs/method.md §9; "
                                    "which runs form E1-E4: the `report` parameters, docs/report.md) and write OUT: "
                                    "index.md (what each experiment is, its protocol, links), tables/ (e1, e2, e3, "
                                    "e4_data, e4_latents, fid_over_training as .csv and .md, protocol columns beside "
                                    "every number, one metric per column), figures/ (spectrum distributions of "
                                    "images vs latents per dataset and grid, data and target spectra, "
                                    "reconstructions, sample grids, metric over training) and provenance.json "
                                    "listing every input. Each input folder is identified by the run name recorded "
                                    "in it; a run the parameters name without an input folder is an error. "
                                    "Parameters: the `report` section (schema $defs/report: experiments.E1-E4 "
                                    "with autoencoders, diffusions, datasets; progress; reconstructions).")
    q.add_argument("--spectra", nargs="*", default=[], help="data-spectra output folders (one per dataset)")
    q.add_argument("--ae-eval", nargs="*", default=[], help="eval-ae output folders")
    q.add_argument("--diffusion", nargs="*", default=[], help="train-diffusion output folders")
    q.add_argument("--gen-metrics", nargs="*", default=[], help="`fid calc` output folders of `sample` outputs")
    q.add_argument("--samples", nargs="*", default=[], help="sample output folders (their grid.png)")
    q.add_argument("--target-spectra", default=None, help="target-spectra output folder (E3's target diagnostics)")
    q.add_argument("--progress", nargs="*", default=[], help="fid-progress output folders")
    q.add_argument("--floors", nargs="*", default=[], help="`fid calc` outputs of held-out real images at the "
                                                           "samples' counts (the real floor beside each number)")
    _stage_io(q, _cmd_report_paper, "report name (the preset), recorded in the outputs and the page title",
              params_required=True)

    p = sub.add_parser("audit", help="verify the lineage of a result back to raw data and weights",
                       description="Walk the provenance records from ARTEFACT (a table, figure, checkpoint, any "
                                   "file of a stage output folder, or the folder) back to the raw data and the "
                                   "pretrained weights, re-hashing every file on the way, and check dvc.lock with "
                                   "`dvc status` when the repository has one. Prints the lineage tree; exits 1 "
                                   "naming every file that is missing, modified, unrecorded or stale.")
    p.add_argument("artefact", help="a file or folder written by a specmatch stage")
    p.add_argument("--root", default=".", help="repository root the stages ran from (default: .)")
    p.add_argument("--no-dvc", action="store_true", help="skip the dvc.lock cross-check")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("data", help="version a dataset folder or a weights file with DVC")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("add", help="`dvc add` a dataset folder (or a pretrained file) of this repository",
                        description="Check that each path is inside the DVC repository and (for a folder) holds "
                                    "images, then `dvc add` it: DVC caches the content and writes <path>.dvc for "
                                    "git; `dvc push` copies it to the remote (see README, Versioning).")
    q.add_argument("paths", nargs="+", help="dataset folders (e.g. data/raw/celebahq256) or files (resources/x.pth)")
    q.add_argument("--root", default=".", help="repository root (default: .)")
    q.set_defaults(func=_cmd_data_add)

    p = sub.add_parser("dvc", help="what dvc.yaml declares: generated code deps, stage metrics, adopting a run")
    dsub = p.add_subparsers(dest="dvc_command", required=True)
    q = dsub.add_parser("deps", help="each DVC stage's code deps, from the package's import graph",
                        description="From the Snakemake rules each stage of dvc.yaml runs (--allowed-rules), the "
                                    "`specmatch` commands of those rules and the package modules they import "
                                    "(transitively), list the files each stage depends on: the Snakefile and rule "
                                    "files, package modules and data files, the preset overlay. Without options, "
                                    "print them; --check exits 2 when the deps of dvc.yaml differ (printing the "
                                    "diff), --write rewrites them in place (below the `generated` marker of each "
                                    "stage's deps; upstream outputs above it are kept).")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="fail when dvc.yaml is not up to date")
    g.add_argument("--write", action="store_true", help="rewrite the generated deps of dvc.yaml")
    q.add_argument("--root", default=".", help="repository root (default: .)")
    q.set_defaults(func=_cmd_dvc_deps)
    q = dsub.add_parser("adopt", help="record a finished Snakemake run in dvc.lock (no stage runs again)",
                        description="After `snakemake` (or `snakemake --profile slurm`) has run the DAG of the preset "
                                    "named in params.yaml, make DVC adopt its outputs: check that Snakemake has "
                                    "nothing left to do, write the stages' metrics files (`specmatch dvc metrics`, "
                                    "as the stages do), then `dvc commit --force`. `dvc status` then reports "
                                    "nothing to do, and `dvc repro` after a parameter change re-runs only the "
                                    "stages it affects (docs/parameters.md).")
    q.add_argument("--root", default=".", help="repository root (default: .)")
    q.set_defaults(func=_cmd_dvc_adopt)
    q = dsub.add_parser("metrics", help="collect a stage's metrics files into one JSON for `dvc metrics`",
                        description="Read every FILE below each FOLDER (e.g. ae_eval/<run>/metrics.json) and write "
                                    "OUT: {<folder>/<run dir>: its numbers} (lists, strings and the protocol, "
                                    "reference, samples, sampling, config and warnings sections left out), the "
                                    "`metrics:` output of a dvc.yaml stage.")
    q.add_argument("folders", nargs="+", help="stage output folders (missing ones contribute nothing)")
    q.add_argument("--file", default="metrics.json", help="metrics file name (default: metrics.json)")
    q.add_argument("--out", required=True, help="JSON file to write")
    q.set_defaults(func=_cmd_dvc_metrics)

    p = sub.add_parser("container", help="Apptainer definition files")
    csub = p.add_subparsers(dest="container_command", required=True)
    q = csub.add_parser("check", help="validate definition files before `apptainer build`",
                        description="Parse each definition file with spython and check it against Apptainer's "
                                    "section grammar and our rules: Bootstrap and From header, a pinned base image, "
                                    "no unknown (misspelled) section, %post/%environment/%labels/%runscript/%test "
                                    "present, a version label equal to the package's, the pinned requirements "
                                    "installed in %post, no network use at run time. Exit 2 naming every problem.")
    q.add_argument("definitions", nargs="*", default=["containers/specmatch.def"],
                   help="definition files (default: containers/specmatch.def)")
    q.set_defaults(func=_cmd_container_check)
    q = csub.add_parser("binds", help="the --bind option for data/, resources/ and results/",
                        description="Print the Apptainer --bind option that makes data/, resources/ and results/ of "
                                    "the repository visible in the container at the paths the rules use, following "
                                    "symlinks to shared storage (real:path). Folders that do not exist are left out; "
                                    "prints nothing when none exists. The SLURM profile calls it in apptainer-args.")
    q.add_argument("--root", default=".", help="repository root (default: .)")
    q.set_defaults(func=_cmd_container_binds)

    p = sub.add_parser("resources", help="pretrained files")
    rsub = p.add_subparsers(dest="resources_command", required=True)
    q = rsub.add_parser("check", help="verify the pretrained files against resources/manifest.yaml",
                        description="Print, for each pretrained file of the manifest, whether it is "
                                    "present and whether its sha256 matches; exit 2 when any is "
                                    "missing or mismatched.")
    q.add_argument("names", nargs="*", help="resource names (default: all)")
    q.add_argument("--dir", default=None, help="resources folder (default: $SPECMATCH_RESOURCES or resources/)")
    q.set_defaults(func=_cmd_resources_check)

    p = sub.add_parser("params", help="inspect parameters")
    psub = p.add_subparsers(dest="params_command", required=True)
    q = psub.add_parser("show", help="print the resolved parameters (params.yaml + preset + defaults) as JSON")
    q.add_argument("--params-file", default="params.yaml")
    q.add_argument("--preset", default=None, help="override the `preset` key")
    q.add_argument("--key", default=None, help="dotted key of a section, e.g. datasets.embedded")
    q.add_argument("--run", default=None,
                   help="the resolved parameters of one run as its stage receives them: autoencoder:NAME, "
                        "diffusion:NAME or sampler:NAME (then --key selects inside it)")
    q.add_argument("--compact", action="store_true", help="one line")
    q.set_defaults(func=_cmd_params_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .runtime import console

    console.for_log_files()  # before anything imports tqdm: one progress line per interval in log files
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .runtime import provenance

    provenance.mark_stage_start()
    try:
        args.func(args)
    except SpecmatchError as e:
        print(f"specmatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        print(f"specmatch {args.command}: {e}", file=sys.stderr)  # an interrupted trainer
        return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
