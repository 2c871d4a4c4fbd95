"""Importing torchvision next to PyTorch's CPU build.

PyPI's torchvision wheels are CUDA builds: their compiled operators (`torchvision/_C.so`) link
`libtorch_cuda.so`, which a CPU build of torch does not have, so the extension cannot load.
torchvision's Python code copes with that, except that importing it registers fake kernels
for `torchvision::nms` and `torchvision::qnms` unconditionally, and that fails when the
operators were never defined ("operator torchvision::nms does not exist").

We use none of torchvision's compiled operators, only pure-PyTorch models (Inception v3 for
FID, VGG16 for LPIPS, through pytorch-fid and lpips). So when the extension cannot load, we
declare those two operator schemas, with no kernel, before torchvision is imported: the
import then succeeds, and calling either operator still fails loudly ("no kernel"). With a
torchvision whose extension loads (a CUDA container, or a matching CPU build) nothing is
declared and torchvision is imported as it is.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    libs = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if not libs:
        return False
    try:
        ctypes.CDLL(str(libs[0]))
    except OSError as err:
        log.debug("torchvision's compiled operators cannot load (%s); declaring stand-in schemas", err)
        return False
    return True


@functools.lru_cache(maxsize=1)
def import_torchvision():
    """Import and return torchvision, declaring the two operator schemas it needs when its
    compiled extension cannot load (see the module docstring). Safe to call many times."""
    import sys

    import torch

    if "torchvision" not in sys.modules and not _extension_loads():
        for name, schema in _SCHEMAS.items():
            if not _op_defined(name):
                torch.library.define(f"torchvision::{name}", schema)
    import torchvision

    return torchvision


def _op_defined(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
