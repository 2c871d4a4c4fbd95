"""dvc.yaml knows what each stage depends on: the code deps are generated from the package's
import graph (`specmatch dvc deps`), each stage reports its numbers as DVC metrics
(`specmatch dvc metrics`), and `dvc exp run -S` runs one-parameter experiments."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo, run_checked
from specmatch import dvc_stages
from specmatch.cli import build_parser
from specmatch.cli import main as cli_main
from specmatch.metrics import summary

BIN = Path(sys.executable).parent


def test_dvc_yaml_deps_are_those_of_the_import_graph():
    old, new = dvc_stages.check(REPO, build_parser())
    diff = dvc_stages.differences(old, new)
    assert not diff, "dvc.yaml is out of date; run `specmatch dvc deps --write`:\n" + "\n".join(diff)


def test_stage_deps_follow_commands_imports_and_workflow_files():
    deps = dvc_stages.stage_deps(REPO, build_parser())
    assert set(deps) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    common = {"Snakefile", "presets/${preset}.yaml", "workflow/rules/common.smk", "src/specmatch/cli.py",
              "src/specmatch/config.py", "src/specmatch/schemas/params.schema.yaml"}
    for stage, files in deps.items():
        assert common <= set(files), (stage, common - set(files))
        assert "params.yaml" not in files  # DVC's params file: tracked key by key, not as a file
        assert all((REPO / f).is_file() for f in files if "$" not in f)
    # what the hand-written lists missed: the diffusion stage reads the autoencoder (decoding,
    # the latent cache), the spectral DoG targets, the config and its schema
    d = set(deps["diffusion"])
    assert {"src/specmatch/autoencoder/model.py", "src/specmatch/spectral.py", "src/specmatch/diffusion/train.py",
            "src/specmatch/metrics/summary.py", "workflow/rules/diffusion.smk"} <= d
    # and no more than the commands reach: the data stage runs no trainer, evaluation no DataLoader
    assert not [f for f in deps["data"] if "/diffusion/" in f or "/autoencoder/" in f]
    assert "workflow/rules/diffusion.smk" not in deps["data"]
    assert "src/specmatch/resource_manifest.yaml" in deps["evaluation"]  # named by resources.py


def test_import_graph_of_a_package(tmp_path):
    """Relative imports at every level, `from . import <submodule>`, imports inside functions,
    parent packages' __init__.py and data files named in strings; nothing unreachable."""
    pkg = tmp_path / "src" / "specmatch"
    for f, text in {
        "__init__.py": "",
        "a.py": "from .sub import b\nfrom . import c\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from ..deep.x import y\n    return y\n",
        "c.py": "from pathlib import Path\nTABLE = Path(__file__).with_name('table.yaml')\n",
        "table.yaml": "k: 1\n",
        "deep/__init__.py": "",
        "deep/x.py": "import specmatch.e\ny = 1\n",
        "e.py": "from importlib import resources\nS = resources.files('specmatch').joinpath('s/d.json')\n",
        "s/d.json": "{}",
        "unused.py": "import specmatch.a\n",
    }.items():
        (pkg / f).parent.mkdir(parents=True, exist_ok=True)
        (pkg / f).write_text(text)
    files = {p.relative_to(pkg.resolve()).as_posix() for p in dvc_stages.Package(tmp_path).closure(["specmatch.a"])}
    assert files == {"__init__.py", "a.py", "sub/__init__.py", "sub/b.py", "c.py", "table.yaml", "deep/__init__.py",
                     "deep/x.py", "e.py", "s/d.json"}


def test_render_keeps_upstream_outputs_and_regenerates_the_rest():
    text = ("stages:\n  a:\n    cmd: x\n    deps:\n      - ${results}/data\n      - src/old.py\n    outs:\n"
            "      - o\n  b:\n    cmd: y\n    deps:\n      - z\n\nplots:\n  - p\n")
    new = dvc_stages.render(text, {"a": ["src/new.py"], "b": ["w"]})
    assert new == ("stages:\n  a:\n    cmd: x\n    deps:\n      - ${results}/data\n"
                   f"      {dvc_stages.MARKER}\n      - src/new.py\n    outs:\n      - o\n  b:\n    cmd: y\n"
                   f"    deps:\n      {dvc_stages.MARKER}\n      - w\n\nplots:\n  - p\n")
    assert dvc_stages.render(new, {"a": ["src/new.py"], "b": ["w"]}) == new
    # a hand-written dep above the marker stays
    edited = new.replace("      - ${results}/data\n", "      - ${results}/data\n      - extra.txt\n")
    assert "      - extra.txt\n" in dvc_stages.render(edited, {"a": ["src/new.py"], "b": ["w"]})


def test_dvc_deps_command_checks_and_writes(tmp_path, capsys):
    repo = copy_repo(tmp_path / "repo")
    dvc_yaml = repo / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("      - src/specmatch/spectral.py\n", "", 1))
    assert cli_main(["dvc", "deps", "--check", "--root", str(repo)]) == 2
    assert "+      - src/specmatch/spectral.py" in capsys.readouterr().out
    assert cli_main(["dvc", "deps", "--write", "--root", str(repo)]) == 0
    assert dvc_yaml.read_text() == (REPO / "dvc.yaml").read_text()
    assert cli_main(["dvc", "deps", "--check", "--root", str(repo)]) == 0
    assert cli_main(["dvc", "deps", "--root", str(repo)]) == 0
    assert "diffusion:\n" in capsys.readouterr().out


def test_dvc_metrics_summary_keeps_the_numbers(tmp_path):
    for run, fd in (("run-a", 12.5), ("run-b/dpm", 9.0)):
        d = tmp_path / "gen_metrics" / run
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({
            "name": run, "metric": "FD", "FD": fd, "precision": 0.5, "ok": True, "lowpass": {"8": 1.0},
            "latent_spectrum": {"grid": [4, 4], "psd_exponent": -2.0}, "protocol": {"n_samples": 10},
            "samples": {"n": 10}}))
        (d / "provenance.json").write_text("{}")
    out = tmp_path / "m" / "diffusion.json"
    assert cli_main(["dvc", "metrics", str(tmp_path / "gen_metrics"), str(tmp_path / "missing"), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {
        f"gen_metrics/{r}": {"FD": fd, "precision": 0.5, "lowpass": {"8": 1.0}, "latent_spectrum": {"psd_exponent": -2.0}}
        for r, fd in (("run-a", 12.5), ("run-b/dpm", 9.0))}
    assert summary.numbers({"a": "x", "b": [1]}) is None


@pytest.mark.slow
def test_dvc_exp_run_sets_one_parameter(tmp_path):
    """`dvc exp run -S key=value` on the data stage of a smaller tiny preset: the experiment runs
    with the new value, its metrics show it, and `dvc metrics diff`/`dvc params diff` compare it
    with the committed baseline; a key the preset sets is changed in the preset file."""
    dvc = str(BIN / "dvc")
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("preset: paper", "preset: tiny", 1))
    preset = repo / "presets" / "tiny.yaml"
    p = yaml.safe_load(preset.read_text())
    p.setdefault("datasets", {}).setdefault("embedded", {}).update(n_train=48, n_test=16)
    p["spectra"]["max_images"] = 32
    preset.write_text(yaml.safe_dump(p, sort_keys=False))
    run_checked(["git", "init", "-q"], repo)
    run_checked(["git", "add", "-A"], repo)
    run_checked(["git", "commit", "-qm", "copy"], repo)
    run_checked([dvc, "repro", "data"], repo)
    metrics = repo / "results/tiny/metrics/data.json"
    base = json.loads(metrics.read_text())["spectra/embedded"]
    assert base["n_bins"] == 16 and base["n_images"] == 32 and "psd_exponent" in base["grids"]["16"]
    shown = json.loads(run_checked([dvc, "metrics", "show", "--json"], repo).stdout)
    assert shown[""]["data"]["results/tiny/metrics/data.json"]["data"]["spectra/embedded"]["n_bins"] == 16
    run_checked(["git", "add", "dvc.lock"], repo)
    run_checked(["git", "commit", "-qm", "baseline"], repo)

    run_checked([dvc, "exp", "run", "data", "-S", "spectra.n_bins=8", "-n", "nbins8"], repo)
    assert "nbins8" in run_checked([dvc, "exp", "list", "--name-only"], repo).stdout
    assert yaml.safe_load(params.read_text())["spectra"]["n_bins"] == 8  # applied to the workspace
    assert json.loads(metrics.read_text())["spectra/embedded"]["n_bins"] == 8
    pdiff = json.loads(run_checked([dvc, "params", "diff", "--json"], repo).stdout)
    assert pdiff["params.yaml"]["spectra.n_bins"]["old"] == 16 and pdiff["params.yaml"]["spectra.n_bins"]["new"] == 8
    mdiff = json.loads(run_checked([dvc, "metrics", "diff", "--json"], repo).stdout)
    assert mdiff["results/tiny/metrics/data.json"]["spectra/embedded.n_bins"]["diff"] == -8
    assert "data" not in run_checked([dvc, "status", "data"], repo).stdout.replace("Data and pipelines", "")

    # spectra.max_images is set by the preset, which overrides params.yaml: set it there
    run_checked([dvc, "exp", "run", "data", "-S", "presets/tiny.yaml:spectra.max_images=16", "-n", "max16"], repo)
    assert json.loads(metrics.read_text())["spectra/embedded"]["n_images"] == 16
    shutil.rmtree(repo)
