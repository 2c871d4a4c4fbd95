"""Reading a stage output's JSON file with the errors every reader gives: the file, and what was
expected there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError


def read_json(path: str | Path, missing: str) -> Any:
    """The parsed file; `missing`: the whole error message when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise SpecmatchError(missing)
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecmatchError(f"{path}: not valid JSON ({e})") from None


def get_key(data: Any, dotted: str, path: str | Path, what: str = "") -> Any:
    """data[k1][k2]... for a dotted key of a parsed record, or an error naming the file, the key
    and what the file was expected to be."""
    cur = data
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            expected = f"expected {what}; " if what else ""
            raise SpecmatchError(f"{path}: no key {dotted!r} ({expected}an output of an older or another stage?)")
        cur = cur[k]
    return cur
