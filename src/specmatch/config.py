"""Parameters: params.yaml, the preset overlay, schema validation with defaults.

One resolution path serves Snakemake (the Snakefile), the CLI (`specmatch params show`) and
the stages (which validate the section they receive), so every consumer sees the same values.
Which runs those parameters make, and each run's own view of them, is `grid.py`'s.
"""

from __future__ import annotations

import copy
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

from .errors import SpecmatchError

PAPER = "paper"


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; read it as the float that
    YAML 1.2, JSON and every researcher mean (learning rates are written that way)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SpecmatchError(f"parameter file not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            return parse_yaml(f.read())
    except yaml.YAMLError as e:
        raise SpecmatchError(f"{p}: not valid YAML: {e}") from None


def schema() -> dict[str, Any]:
    text = resources.files("specmatch").joinpath("schemas/params.schema.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; lists and scalars in `overlay` replace those in `base`."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _with_defaults(validator_cls):
    # jsonschema validates but does not fill defaults; this is the documented way to extend a
    # validator so that `default` keywords are applied while validating.
    validate_properties = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _where(err: jsonschema.ValidationError, prefix: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path)
    return ".".join(x for x in (prefix, path) if x) or "(top level)"


def validate(instance: Any, ref: str | None = None, where: str = "", source: str = "parameters") -> Any:
    """Validate (a copy of) `instance` against the whole schema or one of its `$defs` (`ref`),
    filling defaults. Errors name the key, the offending value and what was expected."""
    full = schema()
    sch = full if ref is None else {"$ref": f"#/$defs/{ref}", "$defs": full["$defs"]}
    inst = copy.deepcopy(instance)
    # Two passes: the first fills defaults of nested $ref'd objects, the second reports errors
    # on the completed instance.
    for err in _Validator(sch).iter_errors(inst):
        pass
    errors = sorted(_Validator(sch).iter_errors(inst), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"- {_where(e, where)}: {e.message}" for e in errors[:10]]
        raise SpecmatchError(f"invalid {source}:\n" + "\n".join(lines))
    return inst


def typed_command_line(values: Mapping[str, Any]) -> dict[str, Any]:
    """Snakemake reads a nested `--config key={a: 5}` with YAML's BaseLoader, which keeps every
    scalar inside it a string ('5'); read those strings again as YAML scalars (5, true, 1e-4),
    as the same text in params.yaml would be read. Non-string values pass through."""
    def fix(v):
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, str):
            try:
                return parse_yaml(v) if v.strip() else v
            except yaml.YAMLError:
                return v
        return v

    return {k: fix(v) for k, v in values.items()}


def resolve(params: Mapping[str, Any], presets_dir: str | os.PathLike = "presets",
            overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """params.yaml content -> resolved parameters: apply presets/<preset>.yaml (`paper.yaml` is
    the empty overlay), then command-line overrides, then validate and fill defaults. Unknown
    datasets in grid.datasets are refused."""
    if not isinstance(params, Mapping):
        raise SpecmatchError("params.yaml must be a mapping at the top level")
    overrides = dict(overrides or {})
    preset = overrides.get("preset", params.get("preset", PAPER))
    path = Path(presets_dir) / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))
        raise SpecmatchError(f"preset {preset!r}: no file {path} (known presets: {', '.join(known) or 'none'})")
    overlay = load_yaml(path) or {}
    if not isinstance(overlay, Mapping):
        raise SpecmatchError(f"{path}: a preset must be a mapping, got {type(overlay).__name__}")
    merged = deep_merge(params, overlay)
    merged = deep_merge(merged, overrides)
    merged["preset"] = preset
    out = validate(merged, source=f"parameters (params.yaml + preset {preset})")
    missing = [d for d in out["grid"]["datasets"] if d not in out["datasets"]]
    if missing:
        raise SpecmatchError(f"grid.datasets names unknown datasets {missing}; defined: {sorted(out['datasets'])}")
    return out


def load(params_path: str | os.PathLike = "params.yaml", preset: str | None = None) -> dict[str, Any]:
    params = load_yaml(params_path)
    presets_dir = Path(params_path).parent / "presets"
    return resolve(params, presets_dir, {"preset": preset} if preset else None)


def parse_params_arg(value: str) -> dict[str, Any]:
    """A stage's `--params`: a JSON object, or the path of a YAML/JSON file holding one."""
    text = value.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecmatchError(f"--params: not valid JSON: {e}") from None
    else:
        obj = load_yaml(text)
    if not isinstance(obj, dict):
        raise SpecmatchError(f"--params must be a JSON/YAML mapping, got {type(obj).__name__}")
    return obj

