"""The generation metrics record: what `fid calc` writes (`metrics.json`) and what every
consumer (`fid-progress`, the generation table, the paper report) reads back, as one typed object.

On disk the distance sits under its metric's name (`"FID": 5.1` for the Inception,
`"FD-EffNetLite0-128": ...` otherwise) and the Inception Score under a name derived from the
same feature net (`IS`, `IS-EffNetLite0-128`, with `<name>_std`), so that a number in the file
can never be read as another metric's; `metric` names the distance and `protocol.name` the
evaluation protocol (`adm`, `pytorch-fid`) that every number of the file was measured under.
Protocol `adm` adds `sFID`; a bootstrap of the distance adds `<metric>_bootstrap` (its standard
error and 95% interval). Only this module knows that layout: readers get `GenerationMetrics`
fields, never a key search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sample_folder import SamplingProtocol
from ..errors import SpecmatchError
from ..runtime.jsonfile import read_json
from .bootstrap import Bootstrap

FILE = "metrics.json"
INCEPTION_NETS = ("inception-fid", "inception-adm")
SFID = "sFID"


def inception_score_name(feature_net: str, metric: str) -> str:
    """`IS` for the Inception; `IS-<net>` for a score from another net's logits."""
    return "IS" if feature_net in INCEPTION_NETS else f"IS-{metric.removeprefix('FD-')}"


@dataclass(frozen=True)
class InceptionScore:
    name: str
    mean: float               # the reported score: the mean over parts of is_split_size samples
    std: float | None = None  # over the parts; None with a single part


@dataclass(frozen=True)
class GenerationMetrics:
    """One scored image set. `samples`: n, images_sha256 (and path, split for `fid calc`);
    `reference`: the statistics scored against (path, stats_sha256, dataset, split, n,
    images_sha256, source); `protocol`: its name, feature net, weights, sizes; `sampling`: the
    `specmatch sample` protocol of the images, when they are samples; `uncertainty`: the
    bootstrap of the distance (metrics.bootstrap > 0)."""

    metric: str
    value: float
    precision: float
    recall: float
    samples: dict[str, Any]
    reference: dict[str, Any]
    protocol: dict[str, Any]
    inception_score: InceptionScore | None = None
    warnings: list[str] = field(default_factory=list)
    sampling: SamplingProtocol | None = None
    name: str | None = None
    sfid: float | None = None
    uncertainty: Bootstrap | None = None

    @property
    def protocol_name(self) -> str:
        """`adm` or `pytorch-fid`: printed beside every number of this record."""
        return self.protocol["name"]

    @property
    def feature_weights_sha256(self) -> str:
        return self.protocol["weights_sha256"]

    @property
    def reference_label(self) -> str:
        r = self.reference
        n = "its stored statistics" if r.get("n") is None else f"n={r['n']}"
        return f"{r['dataset']}/{r['split']} ({n})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.name is None else {"name": self.name}
        out.update({"metric": self.metric, self.metric: self.value})
        if self.sfid is not None:
            out[SFID] = self.sfid
        if self.uncertainty is not None:
            out[f"{self.metric}_bootstrap"] = self.uncertainty.to_json()
        out.update({"precision": self.precision, "recall": self.recall})
        if self.inception_score is not None:
            s = self.inception_score
            out.update({s.name: s.mean, f"{s.name}_std": s.std})
        out.update({"samples": self.samples, "reference": self.reference, "protocol": self.protocol,
                    "warnings": list(self.warnings)})
        if self.sampling is not None:
            out["sampling"] = self.sampling.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "GenerationMetrics":
        try:
            metric = d["metric"]
            if d["protocol"].get("name") is None:
                raise KeyError("protocol.name")
            is_name = inception_score_name(d["protocol"]["feature_net"], metric)
            score = None
            if is_name in d:
                std = d.get(f"{is_name}_std")
                score = InceptionScore(is_name, float(d[is_name]), None if std is None else float(std))
            boot = d.get(f"{metric}_bootstrap")
            return cls(metric=metric, value=float(d[metric]), precision=float(d["precision"]),
                       recall=float(d["recall"]), samples=d["samples"], reference=d["reference"],
                       protocol=d["protocol"], inception_score=score, warnings=list(d.get("warnings", [])),
                       sampling=None if d.get("sampling") is None else SamplingProtocol.from_json(
                           d["sampling"], f"{where}: sampling"),
                       name=d.get("name"), sfid=None if d.get(SFID) is None else float(d[SFID]),
                       uncertainty=None if boot is None else Bootstrap.from_json(boot))
        except (KeyError, TypeError, ValueError) as e:
            raise SpecmatchError(f"{where}: not a generation metrics record ({type(e).__name__}: {e}; expected a "
                                 "`specmatch fid calc` output of this version: run it again)") from None


def write(folder: Path, record: GenerationMetrics) -> Path:
    """`metrics.json` in `folder` (a temporary output folder: the stage's atomic_dir)."""
    path = Path(folder) / FILE
    path.write_text(json.dumps(record.to_json(), indent=1) + "\n")
    return path


def read(folder: str | Path) -> GenerationMetrics:
    """The record of a `fid calc` output folder."""
    path = Path(folder) / FILE
    data = read_json(path, f"{folder}: no {FILE} (expected a `specmatch fid calc` output)")
    return GenerationMetrics.from_json(data, str(path))
