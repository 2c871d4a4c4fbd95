"""The embedded default dataset: random crops of natural photographs that ship inside
installed packages (scikit-image, scikit-learn, matplotlib), so it exists on any machine
with the pinned requirements, offline.

Each source image is one class. Its bottom band of rows (`test_region`) is reserved for
held-out crops and the rest for training crops, so held-out crops never overlap training
pixels. Crop sides are drawn log-uniformly as a fraction of the region's short side, so the
set covers several scales (and keeps a natural power-law spectrum), then resized to the
output resolution with PIL's antialiased bicubic filter.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import SpecmatchError
from ..runtime.hashing import sha256_array
from .images import to_rgb


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[0] if name == "stereo_motorcycle" else img  # (left, right, disparity)

    return load


@functools.lru_cache(maxsize=1)
def _sklearn_images() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(load_sample_images().images)


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    return lambda: _sklearn_images()[index]


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        with cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f))

    return load


# Natural photographs only: synthetic patterns (checkerboard, colorwheel, logo, phantom) and
# tiny or binary images (lfw_subset, horse) would distort the spectrum. Order is part of the
# dataset's definition (it fixes the labels): append, never reorder.
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "skimage:astronaut": _skimage("astronaut"),
    "skimage:camera": _skimage("camera"),
    "skimage:brick": _skimage("brick"),
    "skimage:grass": _skimage("grass"),
    "skimage:gravel": _skimage("gravel"),
    "skimage:moon": _skimage("moon"),
    "skimage:chelsea": _skimage("chelsea"),
    "skimage:coffee": _skimage("coffee"),
    "skimage:rocket": _skimage("rocket"),
    "skimage:coins": _skimage("coins"),
    "skimage:hubble_deep_field": _skimage("hubble_deep_field"),
    "skimage:immunohistochemistry": _skimage("immunohistochemistry"),
    "skimage:retina": _skimage("retina"),
    "skimage:stereo_motorcycle": _skimage("stereo_motorcycle"),
    "skimage:text": _skimage("text"),
    "skimage:page": _skimage("page"),
    "skimage:microaneurysms": _skimage("microaneurysms"),
    "skimage:cell": _skimage("cell"),
    "skimage:clock": _skimage("clock"),
    "sklearn:china": _sklearn(0),
    "sklearn:flower": _sklearn(1),
    "matplotlib:grace_hopper": _matplotlib("grace_hopper.jpg"),
}


def load_sources() -> list[tuple[str, np.ndarray]]:
    """Every source image as (name, RGB uint8 array); fails naming the image that is missing."""
    out = []
    for name, load in SOURCES.items():
        try:
            arr = np.asarray(load())
        except Exception as e:  # a package version without the image, or one that needs a download
            raise SpecmatchError(
                f"embedded dataset: cannot load bundled image {name} ({type(e).__name__}: {e}); "
                "install the pinned requirements (requirements/lock.txt)") from None
        if arr.dtype != np.uint8:
            arr = np.clip(arr.astype(np.float64) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        out.append((name, np.asarray(to_rgb(Image.fromarray(arr)))))
    return out


def _regions(h: int, test_region: float) -> dict[str, tuple[int, int]]:
    cut = h - max(1, round(h * test_region))
    return {"train": (0, cut), "test": (cut, h)}


def crops(sources: list[tuple[str, np.ndarray]], split: str, count: int, resolution: int, seed: int,
          crop_scale: tuple[float, float], test_region: float):
    """Yield (image, label) for `count` crops of one split. Labels cycle through the sources,
    so classes are balanced to within one; the order is then shuffled. Deterministic in `seed`."""
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise SpecmatchError(f"embedded dataset: crop_scale must satisfy 0 < min <= max <= 1, got {list(crop_scale)}")
    # One generator per split, derived from the seed, so that n_train does not change test crops.
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    # The split's region of every source as one PIL image: resizing a box of it reads no pixel
    # outside the region (the filter support is clamped at its border), so held-out crops never
    # see training rows.
    regions = []
    for _, img in sources:
        r0, r1 = _regions(img.shape[0], test_region)[split]
        regions.append(Image.fromarray(np.ascontiguousarray(img[r0:r1])))
    labels = rng.permutation(np.arange(count) % len(sources))
    for label in labels:
        region = regions[label]
        width, height = region.size
        short = min(width, height)
        side = math.exp(rng.uniform(math.log(lo * short), math.log(hi * short)))
        side = int(min(short, max(min(resolution, short), round(side))))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        box = (left, top, left + side, top + side)
        if side == resolution:
            crop = region.crop(box)
        else:
            # reducing_gap: integer box reduction first, then bicubic over the last <= 2x (what
            # ADM does for ImageNet too); several times faster on large crops.
            crop = region.resize((resolution, resolution), resample=Image.Resampling.BICUBIC, box=box,
                                 reducing_gap=2.0)
        yield np.asarray(crop), int(label)


def describe_sources(sources: list[tuple[str, np.ndarray]]) -> list[dict]:
    return [{"path": name, "label": i, "shape": list(arr.shape), "sha256": sha256_array(arr)}
            for i, (name, arr) in enumerate(sources)]
