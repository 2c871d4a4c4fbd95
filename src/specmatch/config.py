"""Parameters: params.yaml, the preset overlay, schema validation with defaults.

One resolution path serves Snakemake (the Snakefile), the CLI (`specmatch params show`) and
the stages (which validate the section they receive), so every consumer sees the same values.
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
    if out["report"]["baselines"]["untrained"]:
        for name, entry in untrained_baselines(out).items():
            out["diffusions"][name] = entry
            out["grid"]["diffusions"].append(name)
    for name in out.get("samplers") or {}:
        sampler(out, name)  # each named sampler, resolved over diffusion.sample, must validate
    missing = [d for d in out["grid"]["datasets"] if d not in out["datasets"]]
    if missing:
        raise SpecmatchError(f"grid.datasets names unknown datasets {missing}; defined: {sorted(out['datasets'])}")
    return out


UNTRAINED = "-untrained"


def _baseline_key(resolved: Mapping[str, Any], name: str) -> tuple:
    e = resolved["diffusions"][name]
    t = deep_merge((resolved.get("diffusion") or {}).get("train") or {}, e.get("train") or {})
    return (e["autoencoder"], e["model"], json.dumps(e["process"], sort_keys=True), bool(e.get("conditional", False)),
            t.get("seed", 0))


def untrained_baselines(resolved: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`report.baselines.untrained`: for each group of grid runs that share an autoencoder, a
    network, a process and a seed (they differ in alignment or length only), the same network
    untrained (train.steps 0: its seeded initial weights), sampled with every sampler of the
    group, so that each generation number can be read against what no training gives. Named
    after the group's first run, `<run>-untrained`."""
    groups: dict[tuple, list[str]] = {}
    for name in resolved["grid"]["diffusions"]:
        if name in resolved["diffusions"] and not name.endswith(UNTRAINED):
            groups.setdefault(_baseline_key(resolved, name), []).append(name)
    out = {}
    for runs in groups.values():
        first = resolved["diffusions"][runs[0]]
        samplers = list(dict.fromkeys(s for r in runs for s in resolved["diffusions"][r].get("samplers", [])))
        out[runs[0] + UNTRAINED] = {"autoencoder": first["autoencoder"], "model": first["model"],
                                    "process": copy.deepcopy(first["process"]),
                                    "conditional": first.get("conditional", False), "samplers": samplers,
                                    "train": {"steps": 0, "snapshot_steps": []}, "alignment": {"kind": "none"}}
    return out


def untrained_baseline_of(resolved: Mapping[str, Any], name: str) -> str | None:
    """The `-untrained` run that `name` is read against, when the preset makes them."""
    if not resolved["report"]["baselines"]["untrained"] or name.endswith(UNTRAINED):
        return None
    key = _baseline_key(resolved, name)
    for other in resolved["grid"]["diffusions"]:
        if other.endswith(UNTRAINED) and _baseline_key(resolved, other) == key:
            return other
    return None


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


AE_SECTIONS = ("train", "disc", "loss", "eval", "latents")


def autoencoder_run(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The parameters of autoencoder run `name`: its `autoencoders` entry over the shared
    `autoencoder` settings, validated with defaults (`$defs/ae_run`)."""
    runs = resolved.get("autoencoders") or {}
    if name not in runs:
        raise SpecmatchError(f"no autoencoder run {name!r} under `autoencoders` (defined: {sorted(runs)})")
    shared, entry = resolved.get("autoencoder") or {}, runs[name]
    run = {k: copy.deepcopy(entry[k]) for k in ("dataset", "config", "variant", "pretrained") if k in entry}
    for key in AE_SECTIONS:
        run[key] = deep_merge(shared.get(key) or {}, entry.get(key) or {})
    run["resources_dir"] = shared.get("resources_dir")
    return validate(run, "ae_run", where=f"autoencoders.{name}", source=f"parameters of autoencoder run {name}")


_AE_BOOKKEEPING = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "device")


def ae_fingerprint(run: Mapping[str, Any], data_identity: str | None = None) -> str:
    """What makes a checkpoint belong to an autoencoder run: everything that shapes the
    trajectory, not the run's length, its device or its bookkeeping intervals (so a longer
    `steps` continues the same run). The DAG keys run folders by it, so a parameter change
    starts a fresh run instead of resuming a foreign one. `data_identity` (the sha256 of the
    train images) ties the checkpoints to the data they were trained on."""
    from .runtime.hashing import sha256_json

    train = {k: v for k, v in run["train"].items() if k not in _AE_BOOKKEEPING}
    return sha256_json({"dataset": run.get("dataset"), "config": run["config"], "variant": run["variant"],
                        "loss": run.get("loss", {}), "disc": run.get("disc", {}), "train": train,
                        **({"data": data_identity} if data_identity else {})})


def diffusion_run(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The parameters of diffusion run `name`: its `diffusions` entry with `train` over the shared
    `diffusion.train`, validated with defaults (`$defs/diff_run`)."""
    runs = resolved.get("diffusions") or {}
    if name not in runs:
        raise SpecmatchError(f"no diffusion run {name!r} under `diffusions` (defined: {sorted(runs)})")
    entry = runs[name]
    shared = (resolved.get("diffusion") or {}).get("train") or {}
    run = {k: copy.deepcopy(v) for k, v in entry.items() if k not in ("train", "alignment")}
    run["train"] = deep_merge(shared, entry.get("train") or {})
    run["alignment"] = deep_merge((resolved.get("diffusion") or {}).get("alignment") or {},
                                  entry.get("alignment") or {})
    unknown = [s for s in run.get("samplers", []) if s not in (resolved.get("samplers") or {})]
    if unknown:
        raise SpecmatchError(f"diffusions.{name}.samplers names undefined samplers {unknown}; "
                             f"defined under `samplers`: {sorted(resolved.get('samplers') or {})}")
    run = validate(run, "diff_run", where=f"diffusions.{name}", source=f"parameters of diffusion run {name}")
    run["alignment"] = effective_alignment(run["alignment"])
    return run


def effective_alignment(a: Mapping[str, Any]) -> dict[str, Any]:
    """The alignment settings that act on a run: {"kind": "none"} for none; otherwise without the
    keys of other kinds (DoG sigmas unless dog, irepa_gamma unless irepa, the MLP width with a
    conv projector) and with the projector made explicit. Runs are compared (Snakemake's
    parameter check, the checkpoint fingerprint) on these, so a change of the DoG sigmas does not
    re-run a REPA run."""
    from .alignment.specs import DEFAULT_PROJECTOR

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


def sampler(resolved: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Named sampling settings: `samplers.<name>` over the shared `diffusion.sample`."""
    named = resolved.get("samplers") or {}
    if name not in named:
        raise SpecmatchError(f"no sampler {name!r} under `samplers` (defined: {sorted(named)})")
    shared = (resolved.get("diffusion") or {}).get("sample") or {}
    return validate(deep_merge(shared, named[name]), "diff_sampler", where=f"samplers.{name}",
                    source=f"settings of sampler {name}")


_DIFF_BOOKKEEPING = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "device",
                     "snapshot_steps")


def diffusion_fingerprint(run: Mapping[str, Any], latents_identity: str, targets_identity: str | None = None) -> str:
    """What makes a checkpoint belong to a diffusion run: the network, the process, the
    trajectory-shaping training settings, the alignment and the identity of the latent cache
    (and target cache) it reads (so re-extracted latents start a fresh run rather than resume
    on other data). A run without alignment keeps the fingerprint it had before alignment existed."""
    from .runtime.hashing import sha256_json

    train = {k: v for k, v in run["train"].items() if k not in _DIFF_BOOKKEEPING}
    ident = {"model": run["model"], "process": run["process"], "conditional": run.get("conditional"),
             "train": train, "latents": latents_identity}
    align = effective_alignment(run.get("alignment") or {})
    if align["kind"] != "none":
        ident.update(alignment=align, targets=targets_identity)
    return sha256_json(ident)
