"""`specmatch <stage>`: the command-line contract shared by Snakemake rules, DVC stages,
SLURM jobs and people (docs/parameters.md). Each stage reads explicit inputs and its resolved
parameters (`--params`, a JSON object or a YAML/JSON file) and writes one output folder
atomically, with a provenance record."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import sys
import textwrap
from types import ModuleType
from typing import Any, Callable, Mapping

from . import __version__, stages
from .errors import SpecmatchError
from .stages import Stage

# Compute nodes have no internet: no library may try to reach a model hub from any process.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


# --- the parser, from the table of stages ----------------------------------------------------------

# What `main` returns, for every command's help (the help is printed as written, not re-wrapped).
EXIT_STATUS = ("exit status: 0 when done; 2 with a message naming what is wrong (a file, a key or value, a\n"
               "failed check); any other status is the command's own, described above")


class _CommandParser(argparse.ArgumentParser):
    """A command's parser, whose description (its module's docstring) is read only when its help
    is printed: every stage run builds the whole parser, and reading every stage module's source
    each time would slow down each start."""

    def format_help(self) -> str:
        stage = self.get_default("stage")
        if stage is not None and self.description is None:
            self.description = describe(stage)
        return super().format_help()


def describe(stage: Stage) -> str:
    """The help text of a command: the docstrings of its module (or of those its entry names),
    then what the CLI prints for it."""
    parts = [stages.docstring(ref) for ref in stage.doc_sources]
    adapter = ADAPTERS.get(stage.words)
    if adapter is not None and adapter.__doc__:
        parts.append(inspect.cleandoc(adapter.__doc__))
    elif stage.prints is not None:
        fields = ", ".join(stage.prints.fields)
        if stage.prints.table:
            printed = f"Prints the columns {fields} of its result table."
        elif stage.prints.omit:
            printed = f"Prints its result as a JSON line, without {fields}."
        else:
            printed = f"Prints {fields} of its result as a JSON line."
        parts.append(textwrap.fill(printed, 95))
    return "\n\n".join(parts)


def _add_arguments(p: argparse.ArgumentParser, stage: Stage) -> None:
    for item in stage.options():
        if isinstance(item, stages.OneOf):
            group = p.add_mutually_exclusive_group(required=item.required)
            for a in item.args:
                group.add_argument(a.flag, **a.argparse_options())
        else:
            p.add_argument(item.flag, **item.argparse_options())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmatch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"specmatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", required=True, metavar="<stage>", parser_class=_CommandParser)
    groups: dict[tuple[str, ...], Any] = {(): top}
    for stage in stages.STAGES:
        for depth in range(1, len(stage.words)):
            prefix = stage.words[:depth]
            if prefix not in groups:
                about = stages.GROUPS[" ".join(prefix)]
                g = groups[prefix[:-1]].add_parser(prefix[-1], help=about, description=about)
                groups[prefix] = g.add_subparsers(dest=f"{'_'.join(prefix)}_command", required=True)
        p = groups[stage.words[:-1]].add_parser(stage.words[-1], help=stage.summary, epilog=EXIT_STATUS,
                                                formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(p, stage)
        p.set_defaults(stage=stage)
    return parser


# --- running a command ------------------------------------------------------------------------------

def call(stage: Stage, args: argparse.Namespace, module: ModuleType) -> Any:
    """The stage function called with its arguments by keyword, `--params` parsed."""
    kwargs = {a.parameter: getattr(args, a.dest) for a in stage.inputs()}
    if stage.params is not None:
        from . import config

        kwargs[stage.params.keyword] = config.parse_params_arg(args.params)
    return getattr(module, stage.function)(**kwargs)


def printed_text(spec: stages.Prints, result: Any) -> str:
    if spec.table:
        return result[list(spec.fields)].to_string(index=False)
    if spec.omit:
        return json.dumps({k: v for k, v in result.items() if k not in spec.fields})
    if isinstance(result, Mapping):
        return json.dumps({k: result[k] for k in spec.fields})
    return json.dumps({k: getattr(result, k) for k in spec.fields})


def run(stage: Stage, args: argparse.Namespace) -> None:
    """A parsed command: its entry's hooks, its module, then its adapter, or its function and the
    summary of the result."""
    for hook in stage.before:
        module_name, _, function = hook.partition(":")
        getattr(importlib.import_module(module_name), function)()
    module = importlib.import_module(stage.module)
    adapter = ADAPTERS.get(stage.words)
    if adapter is not None:
        adapter(stage, args, module)
        return
    result = call(stage, args, module)
    if stage.prints is not None and result is not None:
        print(printed_text(stage.prints, result))


# --- commands that do more than one call of their stage function ----------------------------------
# Each receives its table entry, the parsed arguments and the module the entry names, already
# imported; they import nothing else of the package (beyond config), so that the DVC code deps of
# a command stay its module's import closure (ops/dvc_stages.py).

def _fid_calc(stage: Stage, args: argparse.Namespace, scoring: ModuleType) -> None:
    """Prints the protocol and the numbers of metrics.json as one JSON line: the distance under
    its metric name (FID for inception-fid, FD-EffNetLite0 for efficientnet-lite0), sFID under
    adm, IS, precision and recall, and with metrics.bootstrap > 0 the distance's standard error."""
    result = call(stage, args, scoring)
    summary = result.to_json()
    print(json.dumps({"protocol": result.protocol_name,
                      **{k: v for k, v in summary.items() if k not in ("protocol", "samples", "reference", "sampling")}}))


def _report_paper(stage: Stage, args: argparse.Namespace, paper: ModuleType) -> None:
    from . import config

    # The stage's own arguments are the input folders, named as `Inputs.load` takes them.
    inputs = paper.Inputs.load(**{a.parameter: getattr(args, a.dest) for a in stage.args})
    tables = paper.write(config.parse_params_arg(args.params), inputs, args.name, args.out)
    print(f"{args.out}/{paper.INDEX}: " + ", ".join(f"{k} ({len(v)} rows)" for k, v in tables.items() if len(v)))


def _data_add(stage: Stage, args: argparse.Namespace, versioning: ModuleType) -> None:
    for path in args.paths:
        pointer = versioning.add(path, args.root)
        print(f"{path}: tracked by DVC ({pointer.name}); next: git add {pointer.name} .gitignore && dvc push")


def _dvc_deps(stage: Stage, args: argparse.Namespace, dvc_stages: ModuleType) -> None:
    old, new = dvc_stages.check(args.root, stages.by_words())
    diff = dvc_stages.differences(old, new)
    if args.write and diff:
        dvc_stages.write(args.root, new)
        print(f"dvc.yaml: deps rewritten ({sum(1 for d in diff if d.startswith(('+ ', '- ')))} lines changed)")
    elif args.write or args.check:
        print("dvc.yaml: deps up to date" if not diff else "\n".join(diff))
        if diff:
            raise SpecmatchError("dvc.yaml: the code deps differ from the import graph; run `specmatch dvc deps --write`")
    else:
        for name, deps in dvc_stages.stage_deps(args.root, stages.by_words()).items():
            print(f"{name}:\n" + "".join(f"  {d}\n" for d in deps), end="")


def _dvc_adopt(stage: Stage, args: argparse.Namespace, dvc_stages: ModuleType) -> None:
    for cmd in dvc_stages.adopt(args.root):
        print(f"ran: {cmd}")
    print("dvc.lock: every stage's dependencies, parameters and outputs recorded (dvc commit --force)")


def _dvc_metrics(stage: Stage, args: argparse.Namespace, dvc_metrics: ModuleType) -> None:
    """Reads every FILE below each FOLDER (e.g. ae_eval/<run>/metrics.json) and writes OUT:
    {<folder>/<run dir>: its numbers}, the `metrics:` output of a dvc.yaml stage."""
    result = call(stage, args, dvc_metrics)
    print(f"{args.out}: {len(result)} run(s)")


def _dvc_curves(stage: Stage, args: argparse.Namespace, dvc_metrics: ModuleType) -> None:
    """Copies every <run>/curves/plots/*.tsv below each FOLDER into OUT/<folder>/<run>/, the
    curves output of a dvc.yaml stage (`plots:` names OUT's parent once)."""
    result = call(stage, args, dvc_metrics)
    print(f"{args.out}: curves of {len(result)} run(s)")


def _container_binds(stage: Stage, args: argparse.Namespace, container: ModuleType) -> None:
    """Prints the Apptainer --bind option that makes data/, resources/ and results/ of the
    repository visible in the container at the paths the rules use (real:path where a folder is a
    symlink to shared storage); folders that do not exist are left out, and nothing is printed
    when none exists. The SLURM profile calls it in apptainer-args."""
    specs = call(stage, args, container)
    # One line for the shell of a rule's container call (slurm/config.yaml: apptainer-args).
    print(f"--bind {','.join(specs)}" if specs else "")


def _container_check(stage: Stage, args: argparse.Namespace, container: ModuleType) -> None:
    """Prints `ok` or the problems of each definition file; exit status 2 when any fails."""
    bad = 0
    for path in args.definitions:
        problems = container.check(path)
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  - {p}")
        bad += bool(problems)
    if bad:
        raise SpecmatchError(f"{bad} definition file(s) failed the check")


class _AuditFailed(Exception):
    exit_code = 1


def _audit(stage: Stage, args: argparse.Namespace, audit: ModuleType) -> None:
    tree, problems = audit.audit(args.artefact, args.root, dvc=not args.no_dvc)
    failures = [p for p in problems if not p.startswith("note: ")]
    if args.json:
        print(json.dumps({"artefact": args.artefact, "ok": not failures, "problems": problems,
                          "lineage": [{"path": n.path, "role": n.role, "problems": n.problems}
                                      for n in audit.walk(tree)]}, indent=1))
    else:
        print("\n".join(audit.render(tree)))
        for p in problems:
            print(p)
    if failures:
        raise _AuditFailed(f"audit of {args.artefact} failed: {len(failures)} problem(s), e.g. {failures[0]}")


def _resources_check(stage: Stage, args: argparse.Namespace, resources: ModuleType) -> None:
    """Prints, for each pretrained file of the manifest (or each NAME), whether it is present and
    whether its sha256 matches; exit status 2 when any is missing or mismatched."""
    names = args.names or sorted(resources.manifest())
    bad = []
    for name in names:
        st = resources.check(resources.get(name), args.dir)
        if not st["present"]:
            state = "MISSING"
        elif not st["ok"]:
            state = "MISMATCH"
        else:
            state = "ok" if st["verified"] else "present (no published checksum)"
        print(f"{name:20s} {state:34s} {st['path']}  expected {st['expected']}"
              + (f", got {st['sha256']}" if st["present"] and not st["ok"] else ""))
        if state in ("MISSING", "MISMATCH"):
            bad.append(name)
    if bad:
        raise SpecmatchError(f"{len(bad)} pretrained file(s) missing or mismatched: {', '.join(bad)} "
                             "(see resources/manifest.yaml for where to obtain each)")


def _params_show(stage: Stage, args: argparse.Namespace, grid: ModuleType) -> None:
    """Prints the resolved parameters (params.yaml, the preset, the schema's defaults) as JSON, or
    the section --key names; with --run, one run's parameters as the DAG hands them to its stage."""
    from . import config

    resolved = config.load(args.params_file, args.preset)
    section = resolved
    if args.run:
        # What the DAG passes to a stage: a run's entry merged over the shared settings.
        kind, _, name = args.run.partition(":")
        resolve = {"autoencoder": grid.autoencoder_run, "diffusion": grid.diffusion_run,
                   "sampler": grid.sampler}.get(kind)
        if resolve is None or not name:
            raise SpecmatchError(f"--run {args.run!r}: expected autoencoder:NAME, diffusion:NAME or sampler:NAME")
        section = resolve(resolved, name)
    for key in filter(None, (args.key or "").split(".")):
        if not isinstance(section, dict) or key not in section:
            raise SpecmatchError(f"{args.params_file}: no key {args.key!r} in the resolved parameters")
        section = section[key]
    print(json.dumps(section, indent=None if args.compact else 2, sort_keys=True))


ADAPTERS: dict[tuple[str, ...], Callable[[Stage, argparse.Namespace, ModuleType], None]] = {
    ("fid", "calc"): _fid_calc,
    ("report", "paper"): _report_paper,
    ("data", "add"): _data_add,
    ("dvc", "deps"): _dvc_deps,
    ("dvc", "adopt"): _dvc_adopt,
    ("dvc", "metrics"): _dvc_metrics,
    ("dvc", "curves"): _dvc_curves,
    ("container", "binds"): _container_binds,
    ("container", "check"): _container_check,
    ("audit",): _audit,
    ("resources", "check"): _resources_check,
    ("params", "show"): _params_show,
}


def main(argv: list[str] | None = None) -> int:
    from .runtime import console

    console.for_log_files()  # before anything imports tqdm: one progress line per interval in log files
    from .ops import lifeline

    lifeline.watch()  # a job of a Snakemake that is killed stops too (SIGTERM: trainers checkpoint)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .runtime import provenance

    provenance.mark_stage_start()
    try:
        run(args.stage, args)
    except SpecmatchError as e:
        print(f"specmatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        print(f"specmatch {args.command}: {e}", file=sys.stderr)  # an interrupted trainer
        return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
