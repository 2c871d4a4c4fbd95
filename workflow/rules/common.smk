# Resolution of the parameters and helpers shared by every rule file.
import json
import re
from pathlib import Path

import specmatch.config
from specmatch.alignment import specs as _encoders


def _command_line_config():
    # Precedence: params.yaml < presets/<preset>.yaml < --configfile < --config. Snakemake has
    # already merged the command line into `config`; re-apply it over the preset, with the
    # scalars of nested --config values typed as YAML (Snakemake leaves them strings).
    settings = workflow.config_settings
    merged = {}
    for f in settings.configfiles:
        if Path(f).resolve() != (Path(workflow.basedir) / "params.yaml").resolve():
            merged = specmatch.config.deep_merge(merged, specmatch.config.load_yaml(f) or {})
    return specmatch.config.deep_merge(merged, specmatch.config.typed_command_line(dict(settings.config or {})))


_resolved = specmatch.config.resolve(
    config, presets_dir=Path(workflow.basedir) / "presets", overrides=_command_line_config()
)
validate(_resolved, "../schemas/params.schema.yaml")
config.clear()
config.update(_resolved)

RESULTS = f"{config['results']}/{config['preset']}"
DATASETS = config["grid"]["datasets"]


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_]*",
    ae="[a-z0-9][a-z0-9_-]*",
    diff="[a-z0-9][a-z0-9_-]*",
    sampler="[a-z0-9][a-z0-9_-]*",
    encoder="[a-z0-9][a-z0-9-]*",
    size="[0-9]+",
    n="[0-9]+",


def as_json(obj):
    """Parameters go to a stage as one JSON argument (quote it with {params.x:q})."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# Autoencoder runs of the grid (workflow/rules/autoencoders.smk).
_unknown = [n for n in config["grid"]["autoencoders"] if n not in config["autoencoders"]]
if _unknown:
    raise ValueError(f"grid.autoencoders names undefined runs {_unknown}; defined: {sorted(config['autoencoders'])}")
AE_RUNS = [n for n in config["grid"]["autoencoders"] if config["autoencoders"][n]["dataset"] in DATASETS]
AE_PARAMS = {n: specmatch.config.autoencoder_run(config, n) for n in AE_RUNS}


# Trained and imported (`pretrained`) runs write the same output folder; train_ae and import_ae
# each take only their own names.
PRETRAINED_AES = [a for a in AE_RUNS if AE_PARAMS[a].get("pretrained")]
TRAINED_AES = [a for a in AE_RUNS if a not in PRETRAINED_AES]


def names_regex(names):
    """A wildcard constraint matching exactly these names ("(?!)" matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def ae_dataset(wildcards):
    return f"{RESULTS}/data/{AE_PARAMS[wildcards.ae]['dataset']}"


def ae_json(*sections):
    """A rule's parameters: the run's identity plus only the sections its stage reads, so that
    (Snakemake's params trigger) changing `eval` re-runs evaluation, not training."""
    keys = ("dataset", "config", "variant", "pretrained", "resources_dir") + sections
    return lambda wildcards: as_json({k: v for k, v in AE_PARAMS[wildcards.ae].items() if k in keys})


def ae_runs_root(wildcards):
    # The trainer keys its run folder by the fingerprint of the parameters and the data.
    return f"{RESULTS}/runs/autoencoders/{wildcards.ae}"


# Diffusion runs of the grid (workflow/rules/diffusion.smk): those whose autoencoder runs.
_unknown = [n for n in config["grid"]["diffusions"] if n not in config["diffusions"]]
if _unknown:
    raise ValueError(f"grid.diffusions names undefined runs {_unknown}; defined: {sorted(config['diffusions'])}")
DIFF_RUNS = [n for n in config["grid"]["diffusions"] if config["diffusions"][n]["autoencoder"] in AE_RUNS]
DIFF_PARAMS = {n: specmatch.config.diffusion_run(config, n) for n in DIFF_RUNS}
SAMPLER_PARAMS = {s: specmatch.config.sampler(config, s) for n in DIFF_RUNS for s in DIFF_PARAMS[n]["samplers"]}
# (run, sampler) pairs: every run is sampled and scored with each sampler it lists.
DIFF_SAMPLES = [(n, s) for n in DIFF_RUNS for s in DIFF_PARAMS[n]["samplers"]]


def diff_ae(wildcards):
    return f"{RESULTS}/autoencoders/{DIFF_PARAMS[wildcards.diff]['autoencoder']}"


def diff_latents(wildcards):
    return f"{RESULTS}/latents/{DIFF_PARAMS[wildcards.diff]['autoencoder']}"


def diff_ref(wildcards):
    return f"{RESULTS}/fid_ref/{AE_PARAMS[DIFF_PARAMS[wildcards.diff]['autoencoder']]['dataset']}"


def diff_json(wildcards):
    return as_json(DIFF_PARAMS[wildcards.diff])


def sampler_json(wildcards):
    return as_json(SAMPLER_PARAMS[wildcards.sampler])


# Alignment (workflow/rules/alignment.smk): a target cache per (dataset, encoder, input size) that
# an aligned run of the grid uses; runs with `targets: on-the-fly` read the dataset instead.
def _alignment(diff):
    return DIFF_PARAMS[diff]["alignment"]


def _target_cache(diff):
    a = _alignment(diff)
    size = a["image_size"] or _encoders.spec(a["encoder"]).image_size
    return f"{RESULTS}/targets/{AE_PARAMS[DIFF_PARAMS[diff]['autoencoder']]['dataset']}/{a['encoder']}-{size}"


ALIGNED_RUNS = [n for n in DIFF_RUNS if _alignment(n)["kind"] != "none"]
TARGET_CACHES = sorted({_target_cache(n) for n in ALIGNED_RUNS})


def diff_align_input(wildcards):
    """What an aligned run reads besides its latents: its target cache, or the dataset."""
    a = _alignment(wildcards.diff)
    if a["kind"] == "none":
        return []
    if a["targets"] == "cached":
        return [_target_cache(wildcards.diff)]
    return [f"{RESULTS}/data/{AE_PARAMS[DIFF_PARAMS[wildcards.diff]['autoencoder']]['dataset']}"]


def diff_align_args(wildcards, input):
    a = _alignment(wildcards.diff)
    if a["kind"] == "none":
        return ""
    return f"--{'targets' if a['targets'] == 'cached' else 'dataset'} {input.align[0]}"


def target_spectra_json():
    # The DoG and iREPA settings of the diagnostics are those the runs train with.
    shared = config["diffusion"].get("alignment") or {}
    p = specmatch.config.deep_merge(config["target_spectra"],
                                    {k: shared[k] for k in ("dog", "irepa_gamma") if k in shared})
    return as_json(p)


# Scheduler requests (params `resources`, docs/cluster.md): every rule declares
#   threads: job_threads("<rule>")   resources: **job_resources("<rule>")
# and a stage that uses GPUs is started by `{params.launch}` (launch("<rule>")) instead of
# `specmatch`. The names are those of the SLURM executor plugin (gpu, cpus_per_gpu, mem_mb,
# runtime, nodes, slurm_extra); locally only `threads` limits what runs side by side.
# The stages that shard their work over torch.distributed ranks: only these may ask for more
# than one GPU or node (any other stage would run as many identical copies).
DISTRIBUTED_RULES = {"train_ae", "extract_latents", "extract_targets", "train_diffusion", "sample"}


def job_request(name):
    r = {**config["resources"]["default"], **config["resources"]["rules"].get(name, {})}
    if (r["gpus"] > 1 or r["nodes"] > 1) and name not in DISTRIBUTED_RULES:
        raise ValueError(f"resources.rules.{name}: {r['gpus']} GPUs on {r['nodes']} node(s), but its stage runs in"
                         f" one process; only {sorted(DISTRIBUTED_RULES)} can use several GPUs or nodes")
    return r


def job_threads(name):
    r = job_request(name)
    return r["gpus"] * r["nodes"] * r["cpus_per_gpu"] if r["gpus"] else r["cpus"]


def job_resources(name):
    r = job_request(name)
    res = {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "nodes": r["nodes"]}
    # SLURM's warning before the time limit: the trainers checkpoint and stop on SIGUSR1, and
    # the profile's `retries` resubmits them (they resume from that checkpoint).
    extra = [f"--signal=USR1@{r['signal_seconds']}"] if r["signal_seconds"] else []
    if r["gpus"] and r["nodes"] == 1:
        res.update(gpu=r["gpus"], cpus_per_gpu=r["cpus_per_gpu"])
    elif r["gpus"]:
        # One task per node (a torchrun of `gpus` processes, started by srun in the rule's own
        # command: `mpi` keeps the job-step executor from wrapping it in `srun -n1`).
        res.update(mpi="srun", tasks=r["nodes"], cpus_per_task=r["gpus"] * r["cpus_per_gpu"])
        extra.append(f"--gpus-per-node={r['gpus']}")
    else:
        res.update(cpus_per_task=r["cpus"])
    if extra:
        res["slurm_extra"] = " ".join(extra)
    return res


def launch(name):
    """How a stage starts: `specmatch` on one GPU or none; torchrun with one process per GPU of
    the allocation; on several nodes, srun starts one torchrun per node (c10d rendezvous on the
    first node of the job). Trainers and extractors shard their work over the ranks. Snakemake
    sets the thread variables to the job's `threads` (all CPUs of the node's share), and torchrun
    keeps values it finds: each rank is given its own share, `cpus_per_gpu`, instead."""
    r = job_request(name)
    per_rank = " ".join(f"{v}={r['cpus_per_gpu']}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                               "OPENBLAS_NUM_THREADS"))
    if r["nodes"] > 1 and r["gpus"]:
        head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
        return (f"{per_rank} srun --nodes={r['nodes']} --ntasks-per-node=1 --kill-on-bad-exit=1"
                f" torchrun --nnodes={r['nodes']} --nproc-per-node={r['gpus']} --rdzv-backend=c10d"
                f" --rdzv-endpoint={head}:29500 --rdzv-id=\"$SLURM_JOB_ID\" --no-python specmatch")
    if r["gpus"] > 1:
        return f"{per_rank} torchrun --standalone --nproc-per-node={r['gpus']} --no-python specmatch"
    return "specmatch"
