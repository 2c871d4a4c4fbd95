"""The CLI is built from the table of stages (specmatch/stages.py): its help is each stage
module's docstring, read without importing torch; each command's arguments reach its function
by keyword; hooks run before the module is imported; errors keep their exit status."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, SRC
from specmatch import cli, stages
from specmatch.errors import SpecmatchError

PKG = REPO / "src" / "specmatch"


def _source(module: str) -> ast.Module:
    parts = module.split(".")[1:]
    folder = PKG.joinpath(*parts)
    path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
    return ast.parse(path.read_text("utf-8"))


def _function(module: str, name: str) -> ast.FunctionDef | None:
    return next((n for n in _source(module).body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.:])\s", text.strip(), maxsplit=1)[0]


def test_help_of_every_command_is_its_docstring_and_leaves_torch_unloaded():
    script = (
        "import contextlib, io, json, sys\n"
        "from specmatch import cli, stages\n"
        "cli.build_parser()\n"
        "helps = {}\n"
        "for s in stages.STAGES:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        try:\n"
        "            cli.main([*s.words, '--help'])\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 0, (s.words, e.code)\n"
        "    helps[s.command] = buf.getvalue()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pandas'))\n"
        "print(json.dumps({'helps': helps, 'heavy': heavy}))\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["heavy"] == []
    for stage in stages.STAGES:
        text = out["helps"][stage.command]
        assert text.startswith(f"usage: specmatch {stage.command} "), text[:200]
        for ref in stage.doc_sources:
            module, _, function = ref.partition(":")
            node = _function(module, function) if function else _source(module)
            doc = ast.get_docstring(node)
            assert doc, f"{ref}: no docstring to show as the help of `specmatch {stage.command}`"
            assert _first_sentence(doc) in text, (stage.command, _first_sentence(doc))
        for item in stage.options():
            for a in (item.args if isinstance(item, stages.OneOf) else (item,)):
                assert a.flag in text, (stage.command, a.flag)
        if stage.params is not None and stage.params.schema:
            assert f"$defs/{stage.params.schema}" in text
        if stage.prints is not None:  # what it prints, from the table
            assert " ".join(stage.prints.fields[-1:]) in text.split("Prints", 1)[1], stage.command


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word, about in stages.GROUPS.items():
        assert re.search(rf"^    {word} +{re.escape(about[:30])}", text, re.M), word
    for stage in stages.STAGES:
        if len(stage.words) == 1:
            assert re.search(rf"^    {stage.command}\s+{re.escape(stage.summary.split()[0])}", text, re.M), stage.words


def test_table_entries_fit_their_functions_and_the_schema():
    """Every keyword the CLI passes is a parameter of the stage function, and every parameter it
    needs is passed: checked on the source, so a renamed parameter fails here, not in a job."""
    defs = yaml.safe_load((PKG / "schemas" / "params.schema.yaml").read_text())["$defs"]
    assert len({s.words for s in stages.STAGES}) == len(stages.STAGES)
    assert set(cli.ADAPTERS) <= {s.words for s in stages.STAGES}
    for stage in stages.STAGES:
        assert stage.module.startswith("specmatch.") and _source(stage.module) is not None
        assert all(" ".join(stage.words[:i]) in stages.GROUPS for i in range(1, len(stage.words)))
        for hook in stage.before:
            assert _function(*hook.split(":")) is not None, hook
        if stage.params is not None and stage.params.schema is not None:
            assert stage.params.schema in defs, (stage.command, stage.params.schema)
        if stage.words in cli.ADAPTERS and not stage.function:
            continue
        fn = _function(stage.module, stage.function)
        assert fn is not None, f"{stage.target}: no such function"
        if stage.words in cli.ADAPTERS:
            continue
        params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
        passed = [a.parameter for a in stage.inputs()] + ([stage.params.keyword] if stage.params else [])
        assert len(passed) == len(set(passed)) and set(passed) <= set(params), (stage.command, passed, params)
        positional = fn.args.posonlyargs + fn.args.args
        needed = {a.arg for a in positional[: len(positional) - len(fn.args.defaults)]}
        needed |= {a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is None}
        assert needed <= set(passed), (stage.command, needed - set(passed))


def test_work_folders_are_those_of_the_stages_that_resume():
    assert {s.command for s in stages.STAGES if s.work_folder} == {"train-ae", "train-diffusion", "sample"}
    parser = cli.build_parser()
    base = ["--dataset", "d", "--name", "n", "--params", "{}", "--out", "o"]
    assert parser.parse_args(["train-ae", *base, "--runs-root", "r"]).resume == "auto"
    for bad in ([], ["--run-dir", "a", "--runs-root", "b"]):  # exactly one work folder
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["train-ae", *base, *bad])
        assert e.value.code == 2


def test_defaults_and_types_of_the_arguments():
    parser = cli.build_parser()
    a = parser.parse_args(["fid", "calc", "--samples", "s", "--ref", "r", "--name", "n", "--out", "o",
                           "--n-images", "64"])
    assert (a.split, a.n_images, a.params, a.command) == ("train", 64, "{}", "fid")
    a = parser.parse_args(["data-spectra", "--dataset", "d", "--grids", "16", "32", "--name", "n", "--out", "o"])
    assert a.grids == [16, 32]
    a = parser.parse_args(["report", "paper", "--name", "tiny", "--params", "p.yaml", "--out", "o"])
    assert (a.spectra, a.floors, a.target_spectra) == ([], [], None)
    assert parser.parse_args(["container", "check"]).definitions == ["containers/specmatch.def"]
    assert parser.parse_args(["resources", "check"]).names == []
    assert parser.parse_args(["export-adm", "--samples", "s", "--name", "n", "--out", "o"]).split == "samples"
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare-data", "--name", "n", "--out", "o"])  # --params is required there


def test_a_command_calls_its_function_with_keywords_after_its_hooks(monkeypatch, capsys):
    calls = []
    fake = {
        "specmatch.runtime.signals": SimpleNamespace(catch_early=lambda: calls.append("catch_early")),
        "specmatch.diffusion.train": SimpleNamespace(train=lambda **kw: calls.append(kw) or {"name": "x"}),
    }
    real_import = cli.importlib.import_module

    def import_module(name):
        if name not in fake:  # what the modules the CLI loads import themselves (config: jsonschema)
            return real_import(name)
        calls.append(name)
        return fake[name]

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    argv = ["train-diffusion", "--latents", "lat", "--runs-root", "runs", "--dataset", "data", "--name", "d",
            "--params", '{"steps": 3}', "--out", "o"]
    args = cli.build_parser().parse_args(argv)
    cli.run(args.stage, args)
    assert calls == ["specmatch.runtime.signals", "catch_early", "specmatch.diffusion.train",
                     {"latents": "lat", "run_dir": None, "runs_root": "runs", "resume": "auto", "targets": None,
                      "dataset": "data", "name": "d", "out": "o", "run": {"steps": 3}}]
    assert capsys.readouterr().out == ""  # a trainer prints no summary


@dataclasses.dataclass
class _Protocol:
    name: str
    n_samples: int
    sampler: str
    steps: int
    nfe_per_sample: int
    images_per_s: float


def test_summaries_of_results():
    import pandas as pd

    sample = stages.by_words()[("sample",)].prints
    assert json.loads(cli.printed_text(sample, _Protocol("s", 8, "euler", 4, 4, 2.5))) == {
        "name": "s", "n_samples": 8, "sampler": "euler", "steps": 4, "nfe_per_sample": 4, "images_per_s": 2.5}
    eval_ae = stages.by_words()[("eval-ae",)].prints
    assert json.loads(cli.printed_text(eval_ae, {"rFID": 1.5, "latent_spectrum": [1], "protocol": {}})) == {
        "rFID": 1.5}
    table = stages.by_words()[("report", "generation")].prints
    df = pd.DataFrame([{"diffusion": "d", "sampler": "s", "metric": "FID", "value": 3.0, "extra": 1}])
    assert cli.printed_text(table, df).split() == ["diffusion", "sampler", "metric", "value", "d", "s", "FID", "3.0"]


def test_errors_exit_2_with_the_message(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert cli.main(["container", "binds", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"--bind {tmp_path / 'data'}\n"
    rc = cli.main(["prepare-data", "--name", "d", "--params", str(tmp_path / "nope.yaml"),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("specmatch prepare-data: error: ") and "nope.yaml" in err


def test_docstring_reads_the_source_and_names_what_is_missing():
    assert stages.docstring("specmatch.stages").startswith("The commands of `specmatch`")
    assert stages.docstring("specmatch.ops.container:binds").startswith("Apptainer bind specifications")
    with pytest.raises(SpecmatchError, match="no top-level function 'nope'"):
        stages.docstring("specmatch.ops.container:nope")
    with pytest.raises(SpecmatchError, match="names no module file"):
        stages.docstring("specmatch.nope")
