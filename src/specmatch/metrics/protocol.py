"""The evaluation protocols and the `metrics` parameters, resolved once into a typed object.

A protocol fixes how a number is measured, so that it can be compared with the literature:

- `adm`: the ADM evaluator's (openai/guided-diffusion `evaluations/evaluator.py`), what the
  ImageNet numbers of ADM, DiT, SiT, REPA and U-ViT use: the Inception fed as the evaluator's TF
  graph feeds it (`features.inception-adm`), FID and sFID, IS, precision/recall; reference
  batches in ADM's npz layout are accepted (`fid ref --reference-batch`).
- `pytorch-fid`: pytorch-fid's input path to the same Inception (`features.inception-fid`), FID
  (no sFID: pytorch-fid has none); IS and precision/recall by the same definitions as `adm`.
  Other feature nets (EfficientNet-Lite0 of the tiny preset) are measured under this protocol:
  the statistics as pytorch-fid computes them, on that net's features, under the net's own
  metric name.

`metrics.protocol: null` picks `adm` for the Inception and `pytorch-fid` for other nets.
`metrics.datasets.<dataset>` overrides any key of the section for the reference statistics of
that dataset and every number measured against them (the stage looks the override up by the
reference's dataset name), e.g. `celebahq: {protocol: pytorch-fid}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import config
from ..errors import SpecmatchError

PROTOCOLS = ("adm", "pytorch-fid")
INCEPTION = "inception-fid"


@dataclass(frozen=True)
class Settings:
    """The resolved `metrics` section of one dataset (params: the same as a dict, for provenance)."""

    protocol: str
    net: str
    split: str
    max_images: int | None
    batch_size: int
    device: str
    pr_k: int
    pr_ref_size: int | None
    is_split_size: int
    bootstrap: int
    resources_dir: str | None
    seed: int
    reference_batch: str | None
    params: dict[str, Any]

    @property
    def feature_net(self) -> str:
        """The registry name of the feature net and its input path (`features.REGISTRY`)."""
        return "inception-adm" if self.protocol == "adm" else self.net

    @property
    def min_samples(self) -> int:
        """The fewest images the protocol scores: a covariance needs 2, a k-th nearest
        neighbour among the images (precision/recall radii) k + 1."""
        return max(2, self.pr_k + 1)


def settings(params: dict[str, Any], dataset: str | None = None, source: str = "metrics parameters") -> Settings:
    """Validate the `metrics` section (filling defaults), apply `datasets.<dataset>` over it,
    and resolve the protocol. Errors name the key."""
    p = config.validate(params, ref="metrics", where="metrics", source=source)
    overrides = p.pop("datasets", {}) or {}
    if dataset is not None and dataset in overrides:
        over = overrides[dataset] or {}
        if "datasets" in over:
            raise SpecmatchError(f"invalid {source}: metrics.datasets.{dataset} may not hold another `datasets`")
        p = config.validate({**p, **over}, ref="metrics", where="metrics", source=f"{source} (datasets.{dataset})")
        p.pop("datasets", None)
    where = f"metrics.datasets.{dataset}" if dataset in overrides else "metrics"
    protocol = p["protocol"] or ("adm" if p["net"] == INCEPTION else "pytorch-fid")
    if protocol == "adm" and p["net"] != INCEPTION:
        raise SpecmatchError(f"invalid {source}: {where}.protocol is 'adm', which is defined on the Inception "
                             f"(net: {INCEPTION}), but net is {p['net']!r}; use protocol pytorch-fid for other nets")
    if p["reference_batch"] is not None and protocol != "adm":
        raise SpecmatchError(f"invalid {source}: {where}.reference_batch is an ADM reference batch, which needs "
                             f"protocol adm (got {protocol!r})")
    if p["pr_ref_size"] is not None and p["pr_ref_size"] <= p["pr_k"]:
        raise SpecmatchError(f"invalid {source}: {where}.pr_ref_size ({p['pr_ref_size']}) must exceed pr_k "
                             f"({p['pr_k']}): a reference image's radius is its k-th nearest neighbour")
    if p["bootstrap"] == 1:
        raise SpecmatchError(f"invalid {source}: {where}.bootstrap must be 0 (off) or at least 2 redraws, got 1")
    p["protocol"] = protocol
    return Settings(protocol=protocol, net=p["net"], split=p["split"], max_images=p["max_images"],
                    batch_size=p["batch_size"], device=p["device"], pr_k=p["pr_k"], pr_ref_size=p["pr_ref_size"],
                    is_split_size=p["is_split_size"], bootstrap=p["bootstrap"], resources_dir=p["resources_dir"],
                    seed=p["seed"], reference_batch=p["reference_batch"], params=p)
