"""The `fid calc` stage: a sample folder (npz shards with a manifest: the output of
`prepare-data` or of `specmatch sample`) scored against reference statistics (`reference.py`),
written as `metrics.json` (`record.py`) with the sampling protocol the samples carry."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..data import sample_folder
from ..data.reader import SplitReader
from ..data.shards import iter_image_batches
from ..errors import SpecmatchError
from ..runtime.atomic import atomic_dir
from ..runtime.provenance import Provenance
from . import record
from .reference import Reference, too_few

log = logging.getLogger(__name__)


def calc(samples: str | Path, split: str, ref_dir: str | Path, params: dict[str, Any], name: str,
         out: str | Path, n_images: int | None = None) -> record.GenerationMetrics:
    """FID (sFID, IS, precision/recall) of a sample set against reference statistics; `n_images`:
    a seeded subset of that many images of the split (the real floor at a sample count)."""
    reference = Reference(ref_dir, params)
    s = reference.settings
    folder = Path(samples)
    where = f"{folder} ({split})"
    n = len(SplitReader(folder, split))
    if n_images is not None:
        if not 0 < n_images <= n:
            raise SpecmatchError(f"{where}: --n-images {n_images} is not in [1, {n}], the images of the split")
        n = n_images
    if n < s.min_samples:
        raise too_few(where, n, s)
    prov = Provenance("fid-calc", name, {**s.params, "samples_split": split, "n_images": n_images},
                      seeds={"seed": s.seed})
    prov.add_input(folder, "samples")
    reference.add_inputs(prov)
    m = reference.measure(iter_image_batches(folder, split, s.batch_size, n_images, s.seed), where)
    # Samples from `specmatch sample`: their protocol goes with the metric.
    m = dataclasses.replace(m, name=name, samples={"path": str(folder), "split": split, **m.samples},
                            sampling=sample_folder.read(folder))
    prov.protocol = {**m.protocol, "reference_stats_sha256": m.reference["stats_sha256"]}
    with atomic_dir(out) as tmp:
        record.write(tmp, m)
        prov.write(out, tmp)
    log.info("fid calc %s: %s = %.4f (protocol %s) over %d samples", name, m.metric, m.value, m.protocol_name,
             m.samples["n"])
    return m
