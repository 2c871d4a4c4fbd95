"""The alignment registries as plain data (no torch import), for the DAG and the parameters:
the target encoders (`encoders.py` builds them), each target kind's default projector, and the
alignment settings that act on a run (`effective`, `input_size`): every alignment default is
resolved here, once."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import SpecmatchError

DEFAULT_PROJECTOR = {"repa": "mlp", "irepa": "conv", "dog": "mlp"}


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str          # "dinov2" or "effnet"
    resource: str        # key in the resources manifest
    image_size: int      # default input size (pixels)
    stride: int          # pixels per token
    dim: int             # channels of a target token
    heads: int = 0       # ViT heads (not recoverable from a checkpoint's shapes)
    what: str = ""


REGISTRY: dict[str, EncoderSpec] = {
    "dinov2-vitb14": EncoderSpec("dinov2-vitb14", "dinov2", "dinov2-vitb14", 224, 14, 768, heads=12,
                                 what="DINOv2 ViT-B/14 x_norm_patchtokens"),
    "efficientnet-lite0": EncoderSpec("efficientnet-lite0", "effnet", "efficientnet-lite0", 256, 32, 1280,
                                      what="EfficientNet-Lite0 final feature map (after the head conv)"),
    "efficientnet-lite0-s16": EncoderSpec("efficientnet-lite0-s16", "effnet", "efficientnet-lite0", 128, 16, 112,
                                          what="EfficientNet-Lite0 stride-16 feature map (112 channels)"),
    "efficientnet-lite0-s8": EncoderSpec("efficientnet-lite0-s8", "effnet", "efficientnet-lite0", 64, 8, 40,
                                         what="EfficientNet-Lite0 stride-8 feature map (40 channels)"),
}


def spec(name: str) -> EncoderSpec:
    if name not in REGISTRY:
        raise SpecmatchError(f"unknown target encoder {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def grid_of(name: str, image_size: int | None = None) -> int:
    s = spec(name)
    size = resolved_size(name, image_size)
    if size % s.stride:
        raise SpecmatchError(f"target encoder {name}: image_size {size} is not a multiple of its stride {s.stride}")
    return size // s.stride


def resolved_size(name: str, size: int | None = None) -> int:
    """The input size (pixels) of encoder `name`: `size`, or the encoder's default."""
    return int(size or spec(name).image_size)


def input_size(alignment: Mapping[str, Any]) -> int:
    """The encoder input size of a run's alignment settings (`image_size`: null for the default)."""
    return resolved_size(alignment["encoder"], alignment.get("image_size"))


def effective(a: Mapping[str, Any]) -> dict[str, Any]:
    """The alignment settings that act on a run: {"kind": "none"} for none; otherwise without the
    keys of other kinds (DoG sigmas unless dog, irepa_gamma unless irepa, the MLP width with a
    conv projector) and with the projector made explicit. Runs are compared (Snakemake's
    parameter check, the checkpoint fingerprint) on these, so a change of the DoG sigmas does not
    re-run a REPA run."""
    a = copy.deepcopy(dict(a))
    kind = a.get("kind", "none")
    if kind == "none":
        return {"kind": "none"}
    a["projector"] = a.get("projector") or DEFAULT_PROJECTOR[kind]
    if kind != "dog":
        a.pop("dog", None)
    if kind != "irepa":
        a.pop("irepa_gamma", None)
    if a["projector"] != "mlp":
        a.pop("proj_hidden", None)
    return a
