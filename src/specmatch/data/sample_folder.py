"""The protocol of a `specmatch sample` output (`sampling.json`): how its images were made. The
sampler writes it; `fid calc` copies it into the metrics record of those images, and the
generation table, `fid-progress` and the report read it back here, as one typed object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError
from ..runtime.jsonfile import read_json

FILE = "sampling.json"
# Fields an older sampling.json may lack: read back as their default (None).
OPTIONAL = ("train_seed",)


@dataclass(frozen=True)
class SamplingProtocol:
    name: str  # the sample set
    fingerprint: str  # of the settings and of the model and autoencoder weights
    model: str  # registry name, e.g. SiT-B/2
    diffusion: str  # the diffusion run
    process: str  # vp-linear | linear
    trained_steps: int
    alignment: str  # 'none' or e.g. 'dog (dinov2-vitb14, depth 8, lambda 0.5)'
    weights: str  # ema | raw
    autoencoder: str
    scale_factor: float
    sampler: str
    steps: int
    nfe_per_sample: int
    order: int
    t_min: float | None
    cfg_scale: float
    cfg_interval: tuple[float, float]
    class_balanced: bool | None  # None for unconditional models
    n_samples: int
    seed: int
    batch_size: int
    world_size: int
    generated_now: int  # made by this invocation (the rest came from an earlier, interrupted one)
    seconds: float
    images_per_s: float | None
    # The diffusion run's training seed (train.seed); None for samples of imported models and for
    # records written before it was recorded.
    train_seed: int | None = None

    @property
    def cfg_label(self) -> str:
        """The guidance interval as tables print it: '0-0.7'."""
        return "-".join(f"{v:g}" for v in self.cfg_interval)

    @property
    def describe(self) -> str:
        """'euler-maruyama 250 steps, cfg 1.5 on 0-0.7'."""
        return f"{self.sampler} {self.steps} steps, cfg {self.cfg_scale:g} on {self.cfg_label}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "SamplingProtocol":
        if not isinstance(d, dict):
            raise SpecmatchError(f"{where}: not a sampling protocol (expected the {FILE} of `specmatch sample`)")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in OPTIONAL]
        if missing:
            raise SpecmatchError(f"{where}: not a sampling protocol (missing keys {missing}; expected the "
                                 f"{FILE} of `specmatch sample`)")
        values = {n: d[n] for n in names if n in d}
        values["cfg_interval"] = tuple(float(v) for v in d["cfg_interval"])
        return cls(**values)


def write(folder: Path, protocol: SamplingProtocol) -> Path:
    path = Path(folder) / FILE
    path.write_text(json.dumps(protocol.to_json(), indent=1) + "\n")
    return path


def read(folder: str | Path) -> SamplingProtocol | None:
    """The protocol of a `sample` output folder, or None when the folder holds no `sampling.json`
    (images of a dataset split, not samples)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    return SamplingProtocol.from_json(read_json(path, f"{path}: missing"), str(path))
