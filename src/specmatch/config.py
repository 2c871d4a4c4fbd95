"""Parameters: params.yaml, the preset overlay, schema validation with defaults.

One resolution path serves Snakemake (the Snakefile), the CLI (`specmatch params show`) and
the stages (which validate the section they receive), so every consumer sees the same values.
Which runs those parameters make, and each run's own view of them, is `grid.py`'s.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

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


UNTRAINED = "-untrained"  # the suffix of an untrained baseline's name (grid.untrained_baselines)


def suggest(value: Any, known: Iterable[str]) -> str:
    """' (did you mean X?)' with the known name closest to `value`, or ''."""
    close = difflib.get_close_matches(str(value), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _references(out: Mapping[str, Any]):
    """(key path, value, section that must define it) for every name the parameters cross-reference."""
    untrained = bool(((out.get("report") or {}).get("baselines") or {}).get("untrained"))
    g = out.get("grid") or {}
    for i, name in enumerate(g.get("datasets") or []):
        yield ("grid", "datasets", i), name, "datasets"
    for i, name in enumerate(g.get("autoencoders") or []):
        yield ("grid", "autoencoders", i), name, "autoencoders"
    for i, name in enumerate(g.get("diffusions") or []):
        if not (untrained and str(name).endswith(UNTRAINED)):  # made by the grid, checked there
            yield ("grid", "diffusions", i), name, "diffusions"
    for run, entry in (out.get("autoencoders") or {}).items():
        if "dataset" in entry:
            yield ("autoencoders", run, "dataset"), entry["dataset"], "datasets"
    for run, entry in (out.get("diffusions") or {}).items():
        if "autoencoder" in entry:
            yield ("diffusions", run, "autoencoder"), entry["autoencoder"], "autoencoders"
        for i, name in enumerate(entry.get("samplers") or []):
            yield ("diffusions", run, "samplers", i), name, "samplers"
    for name in ((out.get("metrics") or {}).get("datasets") or {}):
        yield ("metrics", "datasets", name), name, "datasets"
    report = out.get("report") or {}
    for exp, lists in (report.get("experiments") or {}).items():
        for kind in ("autoencoders", "diffusions", "datasets"):
            for i, name in enumerate((lists or {}).get(kind) or []):
                if not (kind == "diffusions" and untrained and str(name).endswith(UNTRAINED)):
                    yield ("report", "experiments", exp, kind, i), name, kind
    for i, name in enumerate((report.get("progress") or {}).get("diffusions") or []):
        yield ("report", "progress", "diffusions", i), name, "diffusions"


def check_references(out: Mapping[str, Any], origin=None) -> None:
    """Refuse a name that names nothing: a diffusion run's `autoencoder`, an autoencoder's
    `dataset`, a run's `samplers`, the grid's and the report's run lists, `metrics.datasets`.
    A misspelt one would otherwise drop its run from the DAG without a word (the grid keeps the
    runs whose autoencoder and dataset it runs). `origin(key path)` names the file that set a key."""
    errors = []
    for path, value, section in _references(out):
        known = sorted(out.get(section) or {})
        if value in known:
            continue
        key = ".".join(str(k) for k in (path[:-1] if isinstance(path[-1], int) else path))
        where = origin(path) if origin else "parameters"
        what = f"{value!r}" + (f" (item {path[-1]})" if isinstance(path[-1], int) else "")
        errors.append(f"- {where}: {key}: {what} names no entry of `{section}`{suggest(value, known)}; "
                      f"expected one of {known}")
    if errors:
        more = f"\n- ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise SpecmatchError("parameters name runs, datasets or samplers that are not defined:\n"
                             + "\n".join(errors[:10]) + more)


def _has(tree: Any, path: tuple) -> bool:
    for k in path:
        if isinstance(k, int):
            return isinstance(tree, list)
        if not isinstance(tree, Mapping) or k not in tree:
            return False
        tree = tree[k]
    return True


def resolve(params: Mapping[str, Any], presets_dir: str | os.PathLike = "presets",
            overrides: Mapping[str, Any] | None = None, params_file: str | os.PathLike = "params.yaml"
            ) -> dict[str, Any]:
    """params.yaml content -> resolved parameters: apply presets/<preset>.yaml (`paper.yaml` is
    the empty overlay), then command-line overrides, then validate and fill defaults. A name that
    refers to nothing (a run's autoencoder, dataset or sampler, the grid's lists) is refused,
    naming the file that set it (`check_references`)."""
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

    def origin(key: tuple) -> str:
        # The last layer that wrote the key (a list is written whole by one layer).
        if _has(overrides, key):
            return "the command line (--config, --configfile)"
        return str(path) if _has(overlay, key) else str(params_file)

    check_references(out, origin)
    return out


def load(params_path: str | os.PathLike = "params.yaml", preset: str | None = None) -> dict[str, Any]:
    params = load_yaml(params_path)
    presets_dir = Path(params_path).parent / "presets"
    return resolve(params, presets_dir, {"preset": preset} if preset else None, params_file=params_path)


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

