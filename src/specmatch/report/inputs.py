"""The stage outputs `report paper` reads, one loader for every kind (`KINDS`).

Each kind names its command-line flag, the reader of the module that writes it (with the checks
the report needs beyond that reader's own), how to get the run (or dataset) name a folder holds,
and its role in the report's provenance record. A folder is known by the name recorded in it,
never by its path, so two folders of one kind holding the same name are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from ..alignment import diagnostics as target_diagnostics
from ..autoencoder import evaluate as ae_evaluate
from ..autoencoder.evaluate import AEEvaluation
from ..data import sample_folder
from ..diffusion import artifact as diffusion_artifact
from ..diffusion import band_error_stage, fid_progress
from ..errors import SpecmatchError
from ..metrics import record
from ..metrics import spectra as data_spectra
from ..metrics.spectra import DataSpectra
from ..runtime.jsonfile import get_key
from ..runtime.provenance import Provenance
from .generation_table import generation_row


def _diffusion(folder: Path) -> dict[str, Any]:
    s = diffusion_artifact.read_summary(folder)
    summary = folder / diffusion_artifact.SUMMARY
    for key in ("name", "model", "steps", "latents.autoencoder", "alignment.kind"):
        get_key(s, key, summary)
    # The alignment as it was trained: encoder, grids, projector and filter settings.
    if s["alignment"]["kind"] == "dog":
        get_key(s, "alignment.dog.sigma2", summary)
    if s["alignment"]["kind"] == "irepa":
        get_key(s, "alignment.irepa_gamma", summary)
    return {**s, "_folder": folder}


def _generation(folder: Path) -> dict[str, Any]:
    return {**generation_row(folder), "_folder": folder}


def _samples(folder: Path) -> sample_folder.SamplingProtocol:
    proto = sample_folder.read(folder)
    if proto is None:
        raise SpecmatchError(f"{folder / sample_folder.FILE}: missing (expected a `specmatch sample` output)")
    # The page shows each sample set by the grid its sampler drew.
    if not (folder / "grid.png").is_file():
        raise SpecmatchError(f"{folder / 'grid.png'}: missing (expected a `specmatch sample` output)")
    return proto


def _floor(folder: Path) -> record.GenerationMetrics:
    m = record.read(folder)
    if m.sampling is not None:
        raise SpecmatchError(f"{folder}: --floors takes scores of real images, these are of samples ({m.name})")
    return m


@dataclass(frozen=True)
class Kind:
    """One kind of input folder (see the module docstring). `runs`: the experiment run kind
    (`grid.RUN_KINDS`) whose names these folders supply; `single`: one optional folder, not a list."""

    flag: str
    read: Callable[[Path], Any]
    name: Callable[[Any], str]
    role: str
    runs: str | None = None
    single: bool = False


# Keyed as `Inputs.load` takes them; this order is the order of the provenance record's inputs.
KINDS: dict[str, Kind] = {
    "spectra": Kind("--spectra", data_spectra.read, lambda sp: sp.dataset, "data spectra", runs="datasets"),
    "ae_eval": Kind("--ae-eval", ae_evaluate.read, lambda m: m.name, "autoencoder evaluation", runs="autoencoders"),
    "diffusion": Kind("--diffusion", _diffusion, lambda s: s["name"], "diffusion model", runs="diffusions"),
    # A scored sample set is known by its samples' name: one diffusion run has one per sampler.
    "gen_metrics": Kind("--gen-metrics", _generation, lambda row: row["samples"], "generation metrics"),
    "samples": Kind("--samples", _samples, lambda proto: proto.name, "samples"),
    "target_spectra": Kind("--target-spectra", target_diagnostics.read, lambda _: "target-spectra",
                           "target spectra", single=True),
    "progress": Kind("--progress", fid_progress.read, lambda named: named[0], "metric over training"),
    "band_error": Kind("--band-error", band_error_stage.read, lambda read: read[0]["diffusion"],
                       "error per band over training"),
    "floors": Kind("--floors", _floor, lambda m: m.name, "real floor"),
}


def _read(kind: Kind, folders: Iterable[str | Path]) -> dict[str, tuple[Path, Any]]:
    """name -> (folder, what its reader returned); every folder is read before names are compared,
    so a folder that cannot be read is named before a duplicate."""
    read = [(d, kind.read(d)) for d in map(Path, folders)]
    out: dict[str, tuple[Path, Any]] = {}
    for folder, value in read:
        name = kind.name(value)
        if name in out:
            raise SpecmatchError(f"two {kind.flag} folders hold {name!r}: {out[name][0]} and {folder}")
        out[name] = (folder, value)
    return out


@dataclass
class Inputs:
    """The stage outputs the report reads, keyed by the run (or dataset) name recorded in them,
    each read through the module that writes it. `generation` groups the scored sample sets by
    diffusion run; `folders` holds every input folder per kind, by name."""

    spectra: dict[str, DataSpectra] = field(default_factory=dict)
    ae_eval: dict[str, AEEvaluation] = field(default_factory=dict)
    diffusion: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    samples: dict[str, Path] = field(default_factory=dict)
    target_spectra: pd.DataFrame | None = None
    progress: dict[str, pd.DataFrame] = field(default_factory=dict)
    band_error: dict[str, tuple[dict[str, Any], list[band_error_stage.Point]]] = field(default_factory=dict)
    floors: list[record.GenerationMetrics] = field(default_factory=list)
    folders: dict[str, dict[str, Path]] = field(default_factory=dict)

    @classmethod
    def load(cls, **given: Iterable[str | Path] | str | Path | None) -> "Inputs":
        """`given`: the folders of each kind of `KINDS` (a kind left out: none)."""
        unknown = sorted(set(given) - set(KINDS))
        if unknown:
            raise TypeError(f"Inputs.load: unknown input kinds {unknown} (known: {list(KINDS)})")
        read = {}
        for key, kind in KINDS.items():
            folders = given.get(key)
            if kind.single:
                folders = () if folders is None else (folders,)
            read[key] = _read(kind, folders or ())
        self = cls(folders={key: {n: d for n, (d, _) in named.items()} for key, named in read.items()})
        self.spectra = {n: sp for n, (_, sp) in read["spectra"].items()}
        self.ae_eval = {n: m for n, (_, m) in read["ae_eval"].items()}
        self.diffusion = {n: s for n, (_, s) in read["diffusion"].items()}
        for _, row in read["gen_metrics"].values():
            self.generation.setdefault(row["diffusion"], []).append(row)
        self.samples = self.folders["samples"]
        self.target_spectra = next((df for _, df in read["target_spectra"].values()), None)
        self.progress = {n: df for n, (_, (_, df)) in read["progress"].items()}
        self.band_error = {n: v for n, (_, v) in read["band_error"].items()}
        self.floors = [m for _, m in read["floors"].values()]
        return self

    def runs(self) -> dict[str, list[str]]:
        """The names of each experiment run kind these inputs hold (`grid.experiment_runs`'s `available`)."""
        return {kind.runs: list(self.folders[key]) for key, kind in KINDS.items() if kind.runs}

    def add_to(self, prov: Provenance) -> None:
        for key, folders in self.folders.items():
            for folder in folders.values():
                prov.add_input(folder, KINDS[key].role)
