"""Reading weight files with errors that name the file and say what is wrong, and writing
safetensors files whose bytes depend only on their content.

`safetensors` and `torch.load` report a truncated or foreign file with a low-level error
(`SafetensorError: MetadataIncompleteBuffer`, `UnpicklingError`, ...) and a traceback. These
helpers check what is cheap to check first (present, header complete, data as long as the
header says) and turn any remaining failure into a SpecmatchError naming the file.
`load_stage_weights` reads the weights of a stage output, checked against the sha256 that the
stage recorded in the folder's provenance.json (`integrity.check_recorded`): a flipped byte gives
finite-looking nonsense that no structural check sees, and another run's weights copied in are
well-formed.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header (tensor
name -> dtype, shape, data_offsets; optional `__metadata__`), then the tensor data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError
from . import integrity

# safetensors refuses headers above 100 MB; a larger length means the file is not one.
_MAX_HEADER = 100_000_000


def _fail(path: Path, what: str, hint: str = "") -> SpecmatchError:
    return SpecmatchError(f"{path}: {what}" + (f"; {hint}" if hint else ""))


_HINT = ("the file is truncated (a copy cut short, a full disk) or corrupt: copy it again or rerun the stage "
         "that wrote it")


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file, after checking that the file is complete:
    SpecmatchError naming the file when it is missing, truncated, or not a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "weights file is missing" if not path.exists() else "is not a file (weights expected)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", _HINT)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise _fail(path, f"not a safetensors file (header length {n} bytes is implausible)",
                        "is it a PyTorch .pt/.bin file or another format?")
        first = f.read(1)
        if first and first != b"{":
            raise _fail(path, "not a safetensors file (no JSON header after the 8-byte length)",
                        "is it a PyTorch .pt/.bin file or another format?")
        f.seek(8)
        if 8 + n > size:
            raise _fail(path, f"truncated safetensors file: the header says {n} bytes, the file has only "
                              f"{size - 8} after the length", _HINT)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"corrupt safetensors header (not valid JSON: {e})", _HINT) from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)", _HINT)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise _fail(path, f"corrupt safetensors header (tensor {name!r} has no valid data_offsets)",
                        _HINT) from None
        if not 0 <= start <= stop:
            raise _fail(path, f"corrupt safetensors header (tensor {name!r} has data_offsets {[start, stop]})", _HINT)
        end = max(end, stop)
    data = size - 8 - n
    if end > data:
        raise _fail(path, f"truncated safetensors file: its tensors need {end} bytes of data, the file holds {data}",
                    _HINT)
    return header


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a safetensors file, {name: torch.Tensor} on `device`; SpecmatchError
    naming the file and what is wrong (missing, truncated, corrupt header, not safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    safetensors_header(path)
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # SafetensorError, OSError, RuntimeError: name the file, no traceback
        raise _fail(path, f"cannot be read as safetensors ({type(e).__name__}: {e})", _HINT) from e


def load_stage_weights(folder: str | os.PathLike, rel: str, device: str = "cpu", verify: bool | None = None,
                       remedy: str = "") -> dict[str, Any]:
    """`load_safetensors` of the file `rel` of the stage output `folder`, after checking it
    against the sha256 the folder's provenance.json lists for it (once per process and file
    version; `verify` None follows `$SPECMATCH_VERIFY`, and a skipped check is recorded in the
    provenance of what the stage makes). `remedy`: what remakes the file (the stage), named in
    the error."""
    path = Path(folder) / rel
    # The header first: a truncated file gets the precise message rather than a hash mismatch.
    safetensors_header(path)
    integrity.check_recorded(path, folder, verify, remedy)
    return load_safetensors(path, device)


def load_torch_weights(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` of a pretrained weight file (a state dict); a
    missing, truncated or corrupt file gives a SpecmatchError naming it instead of a traceback."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise _fail(path, "weights file is missing" if not path.exists() else "is not a file (weights expected)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError: name the file
        raise _fail(path, f"cannot be read as PyTorch weights with weights_only=True ({type(e).__name__}: {e})",
                    "the file is truncated or corrupt, or not a plain state dict: replace it "
                    "(`specmatch resources check` compares it with its checksum)") from e


def mismatch_problems(missing, unexpected, misshaped) -> list[str]:
    """What keeps a converted state dict from fitting a network, one phrase per kind (missing
    and unexpected keys sorted, misshaped tensors as given): the importers of released
    checkpoints join these into their error."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {sorted(unexpected)}")
    if misshaped:
        problems.append(f"misshaped {len(misshaped)}: {list(misshaped)}")
    return problems


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` with the `__metadata__` keys in sorted order. safetensors keeps the
    metadata in a hash map whose order changes from one process to the next, so the same weights
    would give a file with another sha256 at each run (DVC hashes, checkpoint records and the
    fingerprints that hash weight files would all differ). Reordering keys leaves the header's
    length, and so every data offset, unchanged."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # safetensors writes compact JSON too; a longer text means another encoding
        raise SpecmatchError(f"safetensors header re-encoded to {len(text)} bytes, more than its {n}")
    return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `safetensors_bytes(tensors, metadata)` to `path` (inside a temporary output folder:
    the caller renames the folder into place)."""
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))
