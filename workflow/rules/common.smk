# Resolution of the parameters and helpers shared by every rule file.
import json
from pathlib import Path

import specmatch.config


def _command_line_config():
    # Precedence: params.yaml < presets/<preset>.yaml < --configfile < --config. Snakemake has
    # already merged the command line into `config`; re-apply it over the preset, with the
    # scalars of nested --config values typed as YAML (Snakemake leaves them strings).
    settings = workflow.config_settings
    merged = {}
    for f in settings.configfiles:
        if Path(f).resolve() != (Path(workflow.basedir) / "params.yaml").resolve():
            merged = specmatch.config.deep_merge(merged, specmatch.config.load_yaml(f) or {})
    return specmatch.config.deep_merge(merged, specmatch.config.typed_command_line(dict(settings.config or {})))


_resolved = specmatch.config.resolve(
    config, presets_dir=Path(workflow.basedir) / "presets", overrides=_command_line_config()
)
validate(_resolved, "../schemas/params.schema.yaml")
config.clear()
config.update(_resolved)

RESULTS = f"{config['results']}/{config['preset']}"
DATASETS = config["grid"]["datasets"]


wildcard_constraints:
    dataset="[a-z0-9][a-z0-9_]*",


def as_json(obj):
    """Parameters go to a stage as one JSON argument (quote it with {params.x:q})."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
