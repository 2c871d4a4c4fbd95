# Resolution of the parameters, the grid of runs and the helpers shared by every rule file.
# Which runs exist and where each writes is `specmatch.grid` (GRID, PATHS); what each rule asks
# of the scheduler is `specmatch.ops.scheduler` (job_threads, job_resources, launch).
import json
import re
from pathlib import Path

import specmatch.config
import specmatch.grid
import specmatch.ops.scheduler


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

GRID = specmatch.grid.Grid.build(config)
PATHS = GRID.paths
RESULTS = PATHS.root


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


def names_regex(names):
    """A wildcard constraint matching exactly these names ("(?!)" matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# Autoencoder runs (workflow/rules/autoencoders.smk).
def ae_dataset(wildcards):
    return PATHS.data(GRID.dataset_of(wildcards.ae))


def ae_json(*sections):
    """A rule's parameters: the run's identity plus only the sections its stage reads, so that
    (Snakemake's params trigger) changing `eval` re-runs evaluation, not training."""
    keys = ("dataset", "config", "variant", "pretrained", "resources_dir") + sections
    return lambda wildcards: as_json({k: v for k, v in GRID.autoencoders[wildcards.ae].items() if k in keys})


# Diffusion runs (workflow/rules/diffusion.smk).
def diff_ae(wildcards):
    return PATHS.autoencoder(GRID.diffusions[wildcards.diff]["autoencoder"])


def diff_latents(wildcards):
    return PATHS.latents(GRID.diffusions[wildcards.diff]["autoencoder"])


def diff_ref(wildcards):
    return PATHS.fid_ref(GRID.dataset_of(wildcards.diff))


def diff_json(wildcards):
    return as_json(GRID.diffusions[wildcards.diff])


def sampler_json(wildcards):
    return as_json(GRID.samplers[wildcards.sampler])


# Alignment (workflow/rules/alignment.smk): an aligned run reads its target cache, or with
# `targets: on-the-fly` the dataset.
def diff_align_input(wildcards):
    """What an aligned run reads besides its latents: its target cache, or the dataset."""
    a = GRID.diffusions[wildcards.diff]["alignment"]
    if a["kind"] == "none":
        return []
    if a["targets"] == "cached":
        return [PATHS.targets(*GRID.target_cache(wildcards.diff))]
    return [PATHS.data(GRID.dataset_of(wildcards.diff))]


def diff_align_args(wildcards, input):
    a = GRID.diffusions[wildcards.diff]["alignment"]
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
# `specmatch`.
REQUESTS = specmatch.ops.scheduler.Requests(config["resources"])
job_threads = REQUESTS.threads
job_resources = REQUESTS.resources
launch = REQUESTS.launch
