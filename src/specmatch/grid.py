"""The grid: which runs a preset makes and where each writes.

`Grid.build(resolved)` takes the validated parameters (`config.resolve`) and lists every dataset,
autoencoder, diffusion run, sample set, target cache, untrained baseline and real floor, the
runs of each experiment E1-E4, and the output folder of each (`Paths`). The Snakemake rules
(`workflow/rules/*.smk`), the report stage and the tests read this object; nothing else decides
which runs exist. The per-run views (`autoencoder_run`, `diffusion_run`, `sampler`: a run's entry
over the shared settings, validated with defaults) live here too, since a run's parameters are
what the grid hands to its stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, NamedTuple

from .alignment import registry as encoders
from .config import UNTRAINED, check_references, deep_merge, suggest, validate
from .errors import SpecmatchError


class Experiment(NamedTuple):
    title: str
    description: str


EXPERIMENTS: dict[str, Experiment] = {
    "E1": Experiment(
        "Autoencoders and diffusability (U-ViT)",
        "docs/method.md §9, E1: SD-VAE, ESM-AE and DSM-AE (f8d4 and f16d16 at paper scale) on CelebA-HQ 256, each with "
        "an unconditional U-ViT trained on its latents: reconstruction (rFID, PSNR, SSIM on the held-out split) and "
        "generation (gFID-10k) per autoencoder."),
    "E2": Experiment(
        "Autoencoders and diffusability (SiT)",
        "docs/method.md §9, E2: SD-VAE, DSM-AE and ESM-AE (f16d16) on ImageNet 256, each with a class-conditional SiT: "
        "reconstruction and generation (gFID-50k, without and with guidance) per autoencoder."),
    "E3": Experiment(
        "Representation alignment: none vs REPA vs iREPA vs DoG-REPA",
        "docs/method.md §9, E3: the same SiT on the best latents, trained without alignment and with REPA, iREPA and "
        "DoG-REPA at equal steps; each aligned row carries the directional spectral energy (RMSC^2) and PSD "
        "exponent of its target (`target-spectra`)."),
    # E3b: the same comparison on our own latents (the extension of E3; docs/reference-fidelity.md).
    "E3b": Experiment(
        "Representation alignment on our latents (the extension)",
        "E3b: the alignment comparison of E3 on our DSM-AE f16d16 latents (SiT-B/1): an extension of the paper's "
        "E3, whose rows cannot be set beside the published numbers (other latents, another network)."),
    "E4": Experiment(
        "Spectral diagnostics",
        "docs/method.md §9, E4: PSD exponents of the images (full size and on each latent grid) and of each "
        "autoencoder's latents, the KL divergence of the latent spectrum distribution to the image's delta-tilted "
        "target (ESM's objective), and the low-pass reconstruction distance per k (DSM's diagnostic: LP_k(x) against "
        "Dec(LP_k(z)); k = 0 is the plain reconstruction distance)."),
}

# What an experiment lists, per kind: report.experiments.<E>.<kind> (null: every one available).
RUN_KINDS = ("autoencoders", "diffusions", "datasets")


def experiment_runs(experiments: Mapping[str, Any], available: Mapping[str, Iterable[str]],
                    where: str = "report.experiments") -> dict[str, dict[str, list[str]]]:
    """The runs of each experiment, per kind: the names `report.experiments` lists, or (null) every
    one `available` holds; a listed name not available is an error naming the key. The DAG calls
    this with the grid's runs, the report stage with the runs of its inputs."""
    have = {k: list(available[k]) for k in RUN_KINDS}
    out: dict[str, dict[str, list[str]]] = {}
    for exp in EXPERIMENTS:
        e = experiments[exp]
        out[exp] = runs = {k: list(have[k] if e[k] is None else e[k]) for k in RUN_KINDS}
        for k in RUN_KINDS:
            missing = [n for n in runs[k] if n not in have[k]]
            if missing:
                raise SpecmatchError(f"{where}.{exp}.{k} names {missing}, which are not among the {k} available "
                                     f"({sorted(have[k])})")
    return out


# --------------------------------------------------------------------------- per-run parameters

AE_SECTIONS = ("train", "disc", "loss", "eval", "latents")


def autoencoder_run(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The parameters of autoencoder run `name`: its `autoencoders` entry over the shared
    `autoencoder` settings, validated with defaults (`$defs/ae_run`)."""
    runs = resolved.get("autoencoders") or {}
    if name not in runs:
        raise SpecmatchError(f"no autoencoder run {name!r} under `autoencoders` (defined: {sorted(runs)})")
    shared, entry = resolved.get("autoencoder") or {}, runs[name]
    run = {k: copy.deepcopy(entry[k]) for k in ("dataset", "config", "variant", "pretrained") if k in entry}
    for key in AE_SECTIONS:
        run[key] = deep_merge(shared.get(key) or {}, entry.get(key) or {})
    run["resources_dir"] = shared.get("resources_dir")
    return validate(run, "ae_run", where=f"autoencoders.{name}", source=f"parameters of autoencoder run {name}")


def _diffusion_entries(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """`diffusions` with the untrained baselines the preset asks for."""
    entries = dict(resolved.get("diffusions") or {})
    if resolved["report"]["baselines"]["untrained"]:
        entries.update(untrained_baselines(resolved))
    return entries


def diffusion_run(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The parameters of diffusion run `name` (an untrained baseline included): its `diffusions`
    entry with `train` over the shared `diffusion.train`, validated with defaults (`$defs/diff_run`),
    and the alignment that acts on it (`alignment.registry.effective`)."""
    return _diffusion_run(resolved, _diffusion_entries(resolved), name)


def _diffusion_run(resolved: Mapping[str, Any], runs: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name not in runs:
        raise SpecmatchError(f"no diffusion run {name!r} under `diffusions` (defined: {sorted(runs)})")
    entry = runs[name]
    shared = (resolved.get("diffusion") or {}).get("train") or {}
    run = {k: copy.deepcopy(v) for k, v in entry.items() if k not in ("train", "alignment")}
    run["train"] = deep_merge(shared, entry.get("train") or {})
    run["alignment"] = deep_merge((resolved.get("diffusion") or {}).get("alignment") or {},
                                  entry.get("alignment") or {})
    unknown = [s for s in run.get("samplers", []) if s not in (resolved.get("samplers") or {})]
    if unknown:
        raise SpecmatchError(f"diffusions.{name}.samplers names undefined samplers {unknown}; "
                             f"defined under `samplers`: {sorted(resolved.get('samplers') or {})}")
    run = validate(run, "diff_run", where=f"diffusions.{name}", source=f"parameters of diffusion run {name}")
    run["alignment"] = encoders.effective(run["alignment"])
    return run


def sampler(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Named sampling settings: `samplers.<name>` over the shared `diffusion.sample`."""
    named = resolved.get("samplers") or {}
    if name not in named:
        raise SpecmatchError(f"no sampler {name!r} under `samplers` (defined: {sorted(named)})")
    shared = (resolved.get("diffusion") or {}).get("sample") or {}
    return validate(deep_merge(shared, named[name]), "diff_sampler", where=f"samplers.{name}",
                    source=f"settings of sampler {name}")


def _baseline_key(resolved: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple:
    t = deep_merge((resolved.get("diffusion") or {}).get("train") or {}, entry.get("train") or {})
    return (entry["autoencoder"], entry["model"], json.dumps(entry["process"], sort_keys=True),
            bool(entry.get("conditional", False)), t.get("seed", 0))


def _baseline_groups(resolved: Mapping[str, Any]) -> dict[str, list[str]]:
    """`<run>-untrained` -> the grid runs it stands for: those that share an autoencoder, a
    network, a process and a seed (they differ in alignment or length only), named after the first."""
    defined = resolved.get("diffusions") or {}
    groups: dict[tuple, list[str]] = {}
    for name in resolved["grid"]["diffusions"]:
        if name in defined and not name.endswith(UNTRAINED):
            groups.setdefault(_baseline_key(resolved, defined[name]), []).append(name)
    return {runs[0] + UNTRAINED: runs for runs in groups.values()}


def untrained_baselines(resolved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`report.baselines.untrained`: for each group of grid runs (`_baseline_groups`), the same
    network untrained (train.steps 0: its seeded initial weights), sampled with every sampler of
    the group, so that each generation number can be read against what no training gives."""
    defined = resolved.get("diffusions") or {}
    out = {}
    for baseline, runs in _baseline_groups(resolved).items():
        first = defined[runs[0]]
        samplers = list(dict.fromkeys(s for r in runs for s in defined[r].get("samplers", [])))
        out[baseline] = {"autoencoder": first["autoencoder"], "model": first["model"],
                                    "process": copy.deepcopy(first["process"]),
                                    "conditional": first.get("conditional", False), "samplers": samplers,
                                    "train": {"steps": 0, "snapshot_steps": [],
                                              # the group's seed: the initial weights its runs start from
                                              "seed": _baseline_key(resolved, first)[-1]},
                                    "alignment": {"kind": "none"}}
    return out


# --------------------------------------------------------------------------- output paths


@dataclass(frozen=True)
class Paths:
    """Every output folder of a preset, under `results/<preset>`. Each takes names or Snakemake
    wildcards (`paths.samples("{diff}", "{sampler}")`), so rules and readers spell a path once."""

    root: str

    def data(self, dataset: str) -> str:
        return f"{self.root}/data/{dataset}"

    def spectra(self, dataset: str) -> str:
        return f"{self.root}/spectra/{dataset}"

    def fid_ref(self, dataset: str) -> str:
        return f"{self.root}/fid_ref/{dataset}"

    def fid_floor(self, dataset: str, n: int | str | None = None) -> str:
        return f"{self.root}/fid_floor/{dataset}" + ("" if n is None else f"-n{n}")

    def autoencoder(self, ae: str) -> str:
        return f"{self.root}/autoencoders/{ae}"

    def ae_eval(self, ae: str) -> str:
        return f"{self.root}/ae_eval/{ae}"

    def latents(self, ae: str) -> str:
        return f"{self.root}/latents/{ae}"

    def diffusion(self, diff: str) -> str:
        return f"{self.root}/diffusion/{diff}"

    def samples(self, diff: str, sampler: str) -> str:
        return f"{self.root}/samples/{diff}/{sampler}"

    def gen_metrics(self, diff: str, sampler: str) -> str:
        return f"{self.root}/gen_metrics/{diff}/{sampler}"

    def adm_samples(self, diff: str, sampler: str) -> str:
        return f"{self.root}/adm_samples/{diff}/{sampler}"

    def targets(self, dataset: str, encoder: str, size: int | str) -> str:
        return f"{self.root}/targets/{dataset}/{encoder}-{size}"

    def progress(self, diff: str) -> str:
        return f"{self.root}/progress/{diff}"

    def band_error(self, diff: str) -> str:
        return f"{self.root}/band_error/{diff}"

    def table(self, name: str) -> str:
        return f"{self.root}/tables/{name}"

    def report(self) -> str:
        return f"{self.root}/report"

    def metrics(self, stage: str) -> str:
        return f"{self.root}/metrics/{stage}.json"

    def runs(self, kind: str, *names: str) -> str:
        """A trainer's or sampler's working folders (checkpoints, finished shards), outside the
        rule outputs: `runs("autoencoders", ae)`, `runs("diffusion", diff)`, `runs("samples", diff, sampler)`."""
        return "/".join((f"{self.root}/runs/{kind}", *names))

    def log(self, rule: str, *names: str) -> str:
        return f"{self.root}/logs/{'/'.join((rule, *names))}.log"


# --------------------------------------------------------------------------- the grid


class TargetCache(NamedTuple):
    dataset: str
    encoder: str
    size: int


def _frozen(d: Mapping) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Report:
    """What the report reads: the runs of each experiment, the untrained twins of its diffusion
    runs, their sample sets, the real floors at their sample counts, the datasets whose image
    spectra it shows, whether it shows target spectra, and the runs of the metric over training."""

    experiments: Mapping[str, Mapping[str, tuple[str, ...]]]
    autoencoders: tuple[str, ...]
    diffusions: tuple[str, ...]
    samples: tuple[tuple[str, str], ...]
    floors: tuple[tuple[str, int], ...]
    datasets: tuple[str, ...]
    target_spectra: bool
    progress: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """Every run of a preset with its parameters (see the module docstring)."""

    preset: str
    paths: Paths
    datasets: tuple[str, ...]
    autoencoders: Mapping[str, Mapping[str, Any]]
    diffusions: Mapping[str, Mapping[str, Any]]
    samplers: Mapping[str, Mapping[str, Any]]
    samples: tuple[tuple[str, str], ...]
    untrained: Mapping[str, str]
    report: Report

    @property
    def pretrained_autoencoders(self) -> tuple[str, ...]:
        """Imported (`pretrained`) autoencoders: `import-ae`, not `train-ae`, writes them."""
        return tuple(a for a, p in self.autoencoders.items() if p.get("pretrained"))

    @property
    def trained_autoencoders(self) -> tuple[str, ...]:
        return tuple(a for a in self.autoencoders if a not in self.pretrained_autoencoders)

    def dataset_of(self, run: str) -> str:
        """The dataset of an autoencoder or a diffusion run."""
        ae = self.diffusions[run]["autoencoder"] if run in self.diffusions else run
        return self.autoencoders[ae]["dataset"]

    @property
    def aligned(self) -> tuple[str, ...]:
        return tuple(d for d, p in self.diffusions.items() if p["alignment"]["kind"] != "none")

    def target_cache(self, diff: str) -> TargetCache:
        """The target cache (dataset, encoder, input size) an aligned run reads."""
        a = self.diffusions[diff]["alignment"]
        return TargetCache(self.dataset_of(diff), a["encoder"], encoders.input_size(a))

    @property
    def target_caches(self) -> tuple[TargetCache, ...]:
        """Every target cache an aligned run of the grid uses (with `targets: on-the-fly` too:
        the diagnostics read them)."""
        return tuple(sorted({self.target_cache(d) for d in self.aligned}))

    def untrained_of(self, diff: str) -> str | None:
        """The `-untrained` run that `diff` is read against, when the preset makes them."""
        return next((b for b, of in self.untrained.items() if diff in of), None)

    @classmethod
    def build(cls, resolved: Mapping[str, Any]) -> "Grid":
        # Runs are kept only where their dataset and autoencoder run in the grid, so a reference
        # to nothing (a misspelt `autoencoder:`) would drop a run silently: refused first.
        check_references(resolved)
        grid = resolved["grid"]
        datasets = tuple(grid["datasets"])
        aes = {n: autoencoder_run(resolved, n) for n in grid["autoencoders"]
               if resolved["autoencoders"][n]["dataset"] in datasets}
        entries = _diffusion_entries(resolved)
        undefined = [n for n in grid["diffusions"] if n not in entries]
        if undefined:
            raise SpecmatchError(f"grid.diffusions names undefined runs {undefined}{suggest(undefined[0], entries)}; "
                                 f"defined: {sorted(entries)}")
        groups = _baseline_groups(resolved) if resolved["report"]["baselines"]["untrained"] else {}
        names = list(dict.fromkeys([*grid["diffusions"], *groups]))
        diffs = {n: _diffusion_run(resolved, entries, n) for n in names if entries[n]["autoencoder"] in aes}
        samplers = {s: sampler(resolved, s) for s in resolved.get("samplers") or {}}
        samples = tuple((d, s) for d in diffs for s in diffs[d]["samplers"])
        untrained = {b: tuple(d for d in runs if d in diffs) for b, runs in groups.items() if b in diffs}
        paths = Paths(f"{resolved['results']}/{resolved['preset']}")
        runs = cls(preset=resolved["preset"], paths=paths, datasets=datasets, autoencoders=_frozen(aes),
                   diffusions=_frozen(diffs), samplers=_frozen({s: samplers[s] for _, s in samples}),
                   samples=samples, untrained=_frozen(untrained), report=None)  # type: ignore[arg-type]
        # The report's selection reads the runs above (their datasets, baselines, alignment).
        return dataclasses.replace(runs, report=runs._report(resolved["report"]))

    def _report(self, p: Mapping[str, Any]) -> Report:
        runs = experiment_runs(p["experiments"], {"autoencoders": self.autoencoders, "diffusions": self.diffusions,
                                                  "datasets": self.datasets})
        progress = tuple(p["progress"]["diffusions"])
        outside = [n for n in progress if n not in self.diffusions]
        if outside:
            raise SpecmatchError(f"report.progress.diffusions names {outside}, not among the grid's diffusion runs"
                                 f"{suggest(outside[0], self.diffusions)} ({sorted(self.diffusions)})")
        no_snapshots = [n for n in progress if not self.diffusions[n]["train"]["snapshot_steps"]]
        if no_snapshots:
            raise SpecmatchError(f"report.progress.diffusions names runs without train.snapshot_steps: {no_snapshots}")
        aes = tuple(dict.fromkeys(runs["E1"]["autoencoders"] + runs["E2"]["autoencoders"]
                                  + runs["E4"]["autoencoders"]))
        diffs = list(dict.fromkeys(runs["E1"]["diffusions"] + runs["E2"]["diffusions"] + runs["E3"]["diffusions"]
                                   + runs["E3b"]["diffusions"]))
        diffs += [b for b in dict.fromkeys(self.untrained_of(d) for d in diffs) if b]
        samples = tuple((d, s) for d, s in self.samples if d in diffs)
        floors = tuple(dict.fromkeys((self.dataset_of(d), int(self.samplers[s]["n_samples"])) for d, s in samples)
                       ) if p["baselines"]["real_floor"] else ()
        datasets = tuple(dict.fromkeys(runs["E4"]["datasets"] + [self.autoencoders[a]["dataset"] for a in aes]))
        targets = any(d in self.aligned for d in runs["E3"]["diffusions"] + runs["E3b"]["diffusions"])
        return Report(experiments=_frozen({e: _frozen({k: tuple(v) for k, v in r.items()}) for e, r in runs.items()}),
                      autoencoders=aes, diffusions=tuple(diffs), samples=samples, floors=floors, datasets=datasets,
                      target_spectra=targets, progress=progress)
