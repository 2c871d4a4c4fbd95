"""The commands of `specmatch`, one entry each: the single description of the CLI.

An entry names the words that run it (`train-ae`, `fid calc`), the function of a package module
that does the work, its arguments (flags, help, types, defaults), the `$defs` section of
schemas/params.schema.yaml that its `--params` are validated against, whether it keeps a work
folder to resume in, what must run before its module is imported, and what it prints when done.
The CLI builds its parser from this table and runs each command through it (cli.py); `specmatch
dvc deps` reads it to learn which package module each command runs (ops/dvc_stages.py).

Nothing here imports the modules it names: `specmatch --help` and the DVC code deps read this
table without loading torch, and a command's help text is its module's docstring read from the
source (`docstring`).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from .errors import SpecmatchError

PACKAGE = "specmatch"
PARAMS_HELP = "resolved parameters: a JSON object, or a YAML/JSON file holding one"
SCHEMA_FILE = "schemas/params.schema.yaml"


@dataclass(frozen=True)
class Arg:
    """One command-line argument, as `argparse.add_argument` takes it."""

    flag: str  # "--run-dir", or the name of a positional argument
    help: str
    required: bool = False
    default: Any = None
    type: Callable[[str], Any] | None = None
    nargs: str | None = None
    switch: bool = False  # a flag without a value: True when given
    keyword: str | None = None  # the stage function's parameter it fills, where that is not `dest`

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def parameter(self) -> str:
        return self.keyword or self.dest

    def argparse_options(self) -> dict[str, Any]:
        """Keyword arguments of `add_argument`: only those set, so argparse's own defaults (e.g.
        [] for an empty `nargs="*"` positional) stay as they are."""
        opts: dict[str, Any] = {"help": self.help}
        if self.switch:
            opts["action"] = "store_true"
        if self.required:
            opts["required"] = True
        if self.default is not None:
            opts["default"] = self.default
        if self.type is not None:
            opts["type"] = self.type
        if self.nargs is not None:
            opts["nargs"] = self.nargs
        return opts


@dataclass(frozen=True)
class OneOf:
    """Arguments of which at most one is given (exactly one when `required`)."""

    args: tuple[Arg, ...]
    required: bool = False
    work_folder: bool = False  # the folder a stage keeps its partial work in, to resume after a kill


@dataclass(frozen=True)
class Params:
    """A stage's `--params` and the function parameter that receives them, parsed."""

    schema: str | None  # the `$defs` section of schemas/params.schema.yaml the stage validates them against
    keyword: str = "params"
    required: bool = True
    layout: str = ""  # what the object holds, where no single schema section describes it

    def arg(self) -> Arg:
        where = f"schema $defs/{self.schema} ({SCHEMA_FILE})" if self.schema else self.layout
        if self.required:
            return Arg("--params", f"{PARAMS_HELP}; {where}", required=True)
        return Arg("--params", f"{PARAMS_HELP} (default: all defaults); {where}", default="{}")


@dataclass(frozen=True)
class Prints:
    """What a command prints on stdout from its function's return value: a JSON object of these
    keys (of a mapping) or attributes (of a record), or these columns of a DataFrame as a text
    table. Nothing is printed for None (a rank other than the main one)."""

    fields: tuple[str, ...]
    table: bool = False
    omit: bool = False  # the JSON object of every key of the mapping but `fields`


@dataclass(frozen=True)
class Stage:
    """One command of the CLI."""

    words: tuple[str, ...]
    target: str  # "specmatch.module:function" that does the work ("specmatch.module" where cli.py adapts it)
    summary: str  # its line in `specmatch --help`
    args: tuple[Arg | OneOf, ...] = ()
    name: str | None = "run name, recorded in the outputs"  # help of --name; None: no --name
    params: Params | None = None
    out: str | None = "output folder (replaced atomically)"  # help of --out; None: no --out
    writes: tuple[str, ...] = ()  # what the output folder holds
    before: tuple[str, ...] = ()  # "module:function" called, in order, before the module is imported
    prints: Prints | None = None
    doc: tuple[str, ...] = ()  # "module" or "module:function" whose docstrings are its help (default: its module)

    @property
    def command(self) -> str:
        return " ".join(self.words)

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def function(self) -> str:
        return self.target.partition(":")[2]

    @property
    def work_folder(self) -> bool:
        return any(isinstance(a, OneOf) and a.work_folder for a in self.args)

    @property
    def doc_sources(self) -> tuple[str, ...]:
        return self.doc or (self.module,)

    def options(self) -> tuple[Arg | OneOf, ...]:
        """Every argument, in the order of `--help`: the stage's own, then --name, --params, --out."""
        common: list[Arg | OneOf] = []
        if self.name is not None:
            common.append(Arg("--name", self.name, required=True))
        if self.params is not None:
            common.append(self.params.arg())
        if self.out is not None:
            out_help = self.out + (f": {', '.join(self.writes)}" if self.writes else "")
            common.append(Arg("--out", out_help, required=True))
        return (*self.args, *common)

    def inputs(self) -> list[Arg]:
        """The arguments handed to the stage function by keyword as given (all but --params,
        which is parsed first)."""
        flat: list[Arg] = []
        for a in self.options():
            flat.extend(a.args if isinstance(a, OneOf) else (a,))
        return [a for a in flat if a.flag != "--params"]


# --- arguments several stages share ----------------------------------------------------------------

DATASET = Arg("--dataset", "prepared dataset folder (from prepare-data)", required=True)
AUTOENCODER = Arg("--autoencoder", "train-ae output folder", required=True, keyword="ae_dir")
ROOT = Arg("--root", "repository root (default: .)", default=".")
REF = Arg("--ref", "reference statistics folder (from `fid ref`)", required=True, keyword="ref_dir")
MODEL_AUTOENCODER = Arg("--autoencoder", "train-ae output folder whose latents the model learnt", required=True,
                        keyword="ae_dir")

RUN_FOLDER = OneOf((
    Arg("--run-dir", "working folder of the run (checkpoints, live log)"),
    Arg("--runs-root", "use RUNS_ROOT/<fingerprint[:12]> as the run folder; the fingerprint covers the parameters "
                       "that shape training and the identity of the input data, so changed inputs start a fresh run "
                       "(what the DAG passes)"),
), required=True, work_folder=True)
RESUME = Arg("--resume", "auto (newest valid checkpoint of the run folder, default), none (fresh; refuses a run folder "
                         "that has checkpoints) or a checkpoint folder", default="auto")
SAMPLE_WORK_FOLDER = OneOf((
    Arg("--work-dir", "folder of the finished shards (kept for resumption)"),
    Arg("--work-root", "use WORK_ROOT/<fingerprint[:12]> as the work folder (fingerprint of the weights and settings)"),
), required=True, work_folder=True)

# First thing in a trainer's process, before torch is imported: a stop signal (SLURM's warning)
# that arrives while the trainer starts is kept for its training loop, not lost or fatal.
CATCH_SIGNALS_EARLY = "specmatch.runtime.signals:catch_early"

# The first word of the commands that have sub-commands, with their line in `specmatch --help`.
GROUPS = {
    "fid": "Fréchet distance: reference statistics and sample metrics",
    "report": "result tables",
    "data": "version a dataset folder or a weights file with DVC",
    "dvc": "what dvc.yaml declares: generated code deps, stage metrics, adopting a run",
    "container": "Apptainer definition files",
    "resources": "pretrained files",
    "params": "inspect parameters",
}

STAGES: tuple[Stage, ...] = (
    Stage(("prepare-data",), "specmatch.data.prepare:prepare", "build a dataset's uint8 shards and manifest",
          name="dataset name (the key under `datasets`)", params=Params("dataset"),
          writes=("train-*.npz", "test-*.npz", "manifest.json", "provenance.json")),
    Stage(("data-spectra",), "specmatch.metrics.spectra:run", "spectrum distributions and PSD exponent of a dataset",
          args=(Arg("--dataset", DATASET.help, required=True, keyword="dataset_dir"),
                Arg("--grids", "latent grid sizes (h = w)", required=True, type=int, nargs="+")),
          name="dataset name, recorded in the outputs", params=Params("spectra", required=False),
          writes=("spectra.json", "spectrum_distribution.png", "provenance.json")),
    Stage(("train-ae",), "specmatch.autoencoder.train:train", "train an autoencoder (SD-VAE, ESM-AE, DSM-AE, ...)",
          args=(DATASET, RUN_FOLDER, RESUME), params=Params("ae_run", keyword="run"),
          writes=("model.safetensors", "autoencoder.json", "metrics.jsonl", "provenance.json"),
          before=(CATCH_SIGNALS_EARLY,)),
    Stage(("import-ae",), "specmatch.autoencoder.import_ae:import_autoencoder",
          "a released SD-VAE (diffusers AutoencoderKL files) as an autoencoder",
          params=Params("ae_run", keyword="run"), writes=("model.safetensors", "autoencoder.json", "provenance.json")),
    Stage(("import-model",), "specmatch.diffusion.import_model:import_model",
          "a released U-ViT / SiT / REPA checkpoint as a trained diffusion model",
          args=(Arg("--checkpoint", "the released checkpoint file (.pt, .pth or .safetensors)", required=True),),
          params=Params("import_model"), writes=("model.safetensors", "diffusion.json", "provenance.json"),
          prints=Prints(("name", "model", "parameters", "time_scale", "imported"))),
    Stage(("eval-ae",), "specmatch.autoencoder.evaluate:evaluate",
          "reconstruction and spectral metrics of a trained autoencoder",
          args=(AUTOENCODER, DATASET), params=Params("ae_run", keyword="run"),
          writes=("metrics.json", "latent_spectrum.png", "provenance.json"),
          prints=Prints(("latent_spectrum", "protocol"), omit=True)),
    Stage(("extract-latents",), "specmatch.autoencoder.latents:extract",
          "latent cache (mu, logvar) and scale factor for diffusion",
          args=(AUTOENCODER, DATASET), params=Params("ae_run", keyword="run"),
          writes=("npz shards of mu and logvar", "manifest.json (with the scale factor)", "provenance.json")),
    Stage(("train-diffusion",), "specmatch.diffusion.train:train",
          "train a latent diffusion model (U-ViT, SiT) on a latent cache",
          args=(Arg("--latents", "latent cache folder (from extract-latents)", required=True), RUN_FOLDER, RESUME,
                Arg("--targets", "extract-targets folder (alignment with targets: cached)"),
                Arg("--dataset", "prepared dataset of the latents (alignment with targets: on-the-fly)")),
          params=Params("diff_run", keyword="run"),
          writes=("model.safetensors (raw and EMA weights)", "diffusion.json", "metrics.jsonl", "provenance.json"),
          before=(CATCH_SIGNALS_EARLY,)),
    Stage(("extract-targets",), "specmatch.alignment.targets:extract",
          "alignment targets (frozen encoder token grids) of the train split",
          args=(DATASET,), params=Params("targets", keyword="p"),
          writes=("npz shards of the raw token grids", "manifest.json", "provenance.json")),
    Stage(("target-spectra",), "specmatch.alignment.diagnostics:run",
          "spectral diagnostics of alignment targets (RMSC^2, spectra)",
          args=(Arg("--targets", "extract-targets folders", required=True, nargs="+", keyword="target_dirs"),),
          params=Params("target_spectra", required=False),
          writes=("target_spectra.csv", "target_spectra.md", "distributions.csv", "target_spectra.png",
                  "provenance.json"),
          prints=Prints(("encoder", "kind", "RMSC2", "psd_exponent", "grid"), table=True)),
    Stage(("sample",), "specmatch.diffusion.sample:sample",
          "generate images with a trained diffusion model and its autoencoder",
          args=(Arg("--model", "train-diffusion output folder", required=True, keyword="model_dir"), MODEL_AUTOENCODER,
                SAMPLE_WORK_FOLDER),
          params=Params("diff_sampler"),
          writes=("split `samples` (uint8 npz shards, manifest.json)", "sampling.json", "grid.png", "provenance.json"),
          prints=Prints(("name", "n_samples", "sampler", "steps", "nfe_per_sample", "images_per_s"))),
    Stage(("fid-progress",), "specmatch.diffusion.fid_progress:run",
          "generation metric of a diffusion run's snapshots over training",
          args=(Arg("--model", "train-diffusion output folder with snapshots/", required=True, keyword="model_dir"),
                MODEL_AUTOENCODER, REF),
          params=Params(None, keyword="p", layout='{"sampler": resolved sampler settings (the run\'s first sampler; '
                                                  'n_samples is replaced; schema $defs/diff_sampler), "metrics": the '
                                                  '`metrics` section, "n_samples": report.progress.n_samples}'),
          writes=("progress.csv", "progress.json", "provenance.json"),
          prints=Prints(("diffusion", "step", "source", "metric", "value", "n_samples"), table=True)),
    Stage(("band-error",), "specmatch.diffusion.band_error_stage:run",
          "error per noise level and DCT band of a diffusion run's snapshots, beside the Gaussian optimum (C0)",
          args=(Arg("--model", "train-diffusion output folder (its snapshots/ are measured too)", required=True,
                    keyword="model_dir"), MODEL_AUTOENCODER,
                Arg("--dataset", "prepared dataset folder whose held-out split is measured", required=True)),
          params=Params(None, keyword="p", required=False,
                        layout='{"n_images", "t": noise levels, "n_bins", "seed", "batch_size", "n_boot", '
                               '"loss_draws", "split", "device"} (defaults: diffusion.band_error_stage.DEFAULTS)'),
          writes=("band_error.json", "provenance.json"),
          prints=Prints(("name", "diffusion", "trained_steps", "c0"))),
    Stage(("fid", "ref"), "specmatch.metrics.reference:ref",
          "reference statistics of a prepared dataset split or an ADM reference batch",
          args=(OneOf((Arg("--dataset", DATASET.help),
                       Arg("--reference-batch", "ADM reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz)")),
                      required=True),),
          params=Params("metrics", required=False), writes=("stats.npz", "stats.json", "provenance.json")),
    Stage(("fid", "calc"), "specmatch.metrics.scoring:calc",
          "FID, sFID, IS and precision/recall of samples vs a reference",
          args=(Arg("--samples", "folder of npz shards with a manifest", required=True),
                Arg("--split", "split of the sample folder (default: train)", default="train"),
                REF,
                Arg("--n-images", "score a seeded subset of this many images of the split (default: all): the real "
                                  "floor at the sample count of a generation metric", type=int)),
          params=Params("metrics", required=False), writes=("metrics.json", "provenance.json")),
    Stage(("export-adm",), "specmatch.metrics.adm:export",
          "a sample set as an ADM sample batch (npz) for the official evaluator",
          args=(Arg("--samples", "folder of npz shards with a manifest (a `sample` output)", required=True),
                Arg("--split", "split of the folder (default: samples)", default="samples")),
          writes=("samples.npz", "adm_export.json", "provenance.json"),
          prints=Prints(("name", "n", "image_shape", "npz_sha256"))),
    Stage(("report", "generation"), "specmatch.report.generation_table:write_generation",
          "table of generation metrics with their protocol",
          args=(Arg("--metrics", "`fid calc` output folders", required=True, nargs="+", keyword="metric_dirs"),),
          name="table name, recorded in the outputs",
          writes=("generation.csv", "generation.md", "alignment.csv and .md (runs compared by alignment)",
                  "provenance.json"),
          prints=Prints(("diffusion", "sampler", "metric", "value"), table=True)),
    Stage(("report", "paper"), "specmatch.report.paper:write",
          "the paper's tables (E1-E4) and figures, and the report page",
          args=(Arg("--spectra", "data-spectra output folders (one per dataset)", nargs="*", default=[]),
                Arg("--ae-eval", "eval-ae output folders", nargs="*", default=[]),
                Arg("--diffusion", "train-diffusion output folders", nargs="*", default=[]),
                Arg("--gen-metrics", "`fid calc` output folders of `sample` outputs", nargs="*", default=[]),
                Arg("--samples", "sample output folders (their grid.png)", nargs="*", default=[]),
                Arg("--target-spectra", "target-spectra output folder (E3's target diagnostics)"),
                Arg("--progress", "fid-progress output folders", nargs="*", default=[]),
                Arg("--band-error", "band-error output folders (claim C0)", nargs="*", default=[]),
                Arg("--floors", "`fid calc` outputs of held-out real images at the samples' counts (the real floor "
                                "beside each number)", nargs="*", default=[])),
          name="report name (the preset), recorded in the outputs and the page title", params=Params("report"),
          writes=("index.md", "index.html", "tables/", "figures/", "provenance.json")),
    Stage(("audit",), "specmatch.ops.audit:audit", "verify the lineage of a result back to raw data and weights",
          args=(Arg("artefact", "a file or folder written by a specmatch stage"),
                Arg("--root", "repository root the stages ran from (default: .)", default="."),
                Arg("--no-dvc", "skip the dvc.lock cross-check", switch=True),
                Arg("--json", "machine-readable result", switch=True)),
          name=None, out=None),
    Stage(("data", "add"), "specmatch.ops.versioning:add",
          "`dvc add` a dataset folder (or a pretrained file) of this repository",
          args=(Arg("paths", "dataset folders (e.g. data/raw/celebahq256) or files (resources/x.pth)", nargs="+"),
                ROOT),
          name=None, out=None),
    Stage(("dvc", "deps"), "specmatch.ops.dvc_stages:stage_deps",
          "each DVC stage's code deps, from the package's import graph",
          args=(OneOf((Arg("--check", "fail when dvc.yaml is not up to date", switch=True),
                       Arg("--write", "rewrite the generated deps of dvc.yaml", switch=True))),
                ROOT),
          name=None, out=None),
    Stage(("dvc", "adopt"), "specmatch.ops.dvc_stages:adopt",
          "record a finished Snakemake run in dvc.lock (no stage runs again)",
          args=(ROOT,), name=None, out=None, doc=("specmatch.ops.dvc_stages:adopt",)),
    Stage(("dvc", "metrics"), "specmatch.ops.dvc_metrics:write_metrics",
          "collect a stage's metrics files into one JSON for `dvc metrics`",
          args=(Arg("folders", "stage output folders (missing ones contribute nothing)", nargs="+"),
                Arg("--file", "metrics file name (default: metrics.json)", default="metrics.json",
                    keyword="filename")),
          name=None, out="JSON file to write"),
    Stage(("dvc", "curves"), "specmatch.ops.dvc_metrics:write_curves",
          "collect every run's training curves of a stage into one folder for `dvc plots`",
          args=(Arg("folders", "stage output folders (missing ones contribute nothing)", nargs="+"),),
          name=None, out="folder to write (replaced whole)"),
    Stage(("container", "check"), "specmatch.ops.container:check",
          "validate definition files before `apptainer build`",
          args=(Arg("definitions", "definition files (default: containers/specmatch.def)", nargs="*",
                    default=["containers/specmatch.def"]),),
          name=None, out=None),
    Stage(("container", "binds"), "specmatch.ops.container:binds",
          "the --bind option for data/, resources/ and results/",
          args=(ROOT,), name=None, out=None, doc=("specmatch.ops.container:binds",)),
    Stage(("resources", "check"), "specmatch.resources:check",
          "verify the pretrained files against resources/manifest.yaml",
          args=(Arg("names", "resource names (default: all)", nargs="*"),
                Arg("--dir", "resources folder (default: $SPECMATCH_RESOURCES or resources/)")),
          name=None, out=None),
    Stage(("params", "show"), "specmatch.grid",
          "print the resolved parameters (params.yaml + preset + defaults) as JSON",
          args=(Arg("--params-file", "parameter file (default: params.yaml)", default="params.yaml"),
                Arg("--preset", "override the `preset` key"),
                Arg("--key", "dotted key of a section, e.g. datasets.embedded"),
                Arg("--run", "the resolved parameters of one run as its stage receives them: autoencoder:NAME, "
                             "diffusion:NAME or sampler:NAME (then --key selects inside it)"),
                Arg("--compact", "one line", switch=True)),
          name=None, out=None, doc=("specmatch.config", "specmatch.grid")),
)


def by_words() -> dict[tuple[str, ...], Stage]:
    return {s.words: s for s in STAGES}


def docstring(ref: str) -> str:
    """The docstring of `ref` ("specmatch.module" or "specmatch.module:function"), read from its
    source file: the help of a command may not import its module (and with it torch)."""
    module, _, function = ref.partition(":")
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise SpecmatchError(f"stages.py: {ref!r} is not a module of the {PACKAGE} package")
    folder = resources.files(PACKAGE).joinpath(*parts[1:-1])
    candidates = [folder.joinpath(parts[-1], "__init__.py"), folder.joinpath(f"{parts[-1]}.py")] if parts[1:] \
        else [folder.joinpath("__init__.py")]
    source = next((c for c in candidates if c.is_file()), None)
    if source is None:
        raise SpecmatchError(f"stages.py: {ref!r} names no module file (looked for {', '.join(map(str, candidates))})")
    tree = ast.parse(source.read_text("utf-8"), str(source))
    if not function:
        return ast.get_docstring(tree) or ""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return ast.get_docstring(node) or ""
    raise SpecmatchError(f"stages.py: {source} has no top-level function {function!r} (named by {ref!r})")
