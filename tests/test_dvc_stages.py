"""dvc.yaml knows what each stage depends on: the code deps are generated from the package's
import graph (`specmatch dvc deps`), each stage reports its numbers as DVC metrics
(`specmatch dvc metrics`), and `dvc exp run -S` runs one-parameter experiments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo, dag_env, job_stats, run_checked
from specmatch import stages
from specmatch.ops import dvc_stages
from specmatch.cli import main as cli_main
from specmatch.errors import SpecmatchError
from specmatch.ops import dvc_metrics as summary

BIN = Path(sys.executable).parent


def test_dvc_yaml_deps_are_those_of_the_import_graph():
    old, new = dvc_stages.check(REPO, stages.by_words())
    diff = dvc_stages.differences(old, new)
    assert not diff, "dvc.yaml is out of date; run `specmatch dvc deps --write`:\n" + "\n".join(diff)


def test_stage_deps_follow_commands_imports_and_workflow_files():
    deps = dvc_stages.stage_deps(REPO, stages.by_words())
    assert set(deps) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    common = {"Snakefile", "presets/${preset}.yaml", "workflow/rules/common.smk", "src/specmatch/cli.py",
              "src/specmatch/stages.py", "src/specmatch/config.py", "src/specmatch/schemas/params.schema.yaml"}
    for stage, files in deps.items():
        assert common <= set(files), (stage, common - set(files))
        assert "params.yaml" not in files  # DVC's params file: tracked key by key, not as a file
        assert all((REPO / f).is_file() for f in files if "$" not in f)
    # what the hand-written lists missed: the diffusion stage reads the autoencoder (decoding,
    # the latent cache), the spectral DoG targets, the config and its schema
    d = set(deps["diffusion"])
    assert {"src/specmatch/autoencoder/model.py", "src/specmatch/spectral.py", "src/specmatch/diffusion/train.py",
            "src/specmatch/ops/dvc_metrics.py", "workflow/rules/diffusion.smk"} <= d
    # and no more than the commands reach: the data stage runs no trainer, evaluation no DataLoader
    assert not [f for f in deps["data"] if "/diffusion/" in f or "/autoencoder/" in f]
    assert "workflow/rules/diffusion.smk" not in deps["data"]
    assert "src/specmatch/resource_manifest.yaml" in deps["evaluation"]  # named by resources.py


def test_commands_of_a_shell_text_are_those_of_the_table_of_stages():
    text = ("{params.launch} train-diffusion --latents {input.latents} --name x\n"
            "specmatch fid calc --samples s && specmatch dvc metrics a b --out m.json; python -m specmatch.cli x")
    assert dvc_stages.commands_in(text, stages.by_words()) == [("train-diffusion",), ("fid", "calc"), ("dvc", "metrics")]
    with pytest.raises(SpecmatchError, match="specmatch fid-calc"):
        dvc_stages.commands_in("specmatch fid-calc --samples s", stages.by_words())


def test_a_command_runs_its_table_module_with_its_parents_and_hooks_only():
    modules = dvc_stages.command_modules([("train-ae",), ("fid", "ref")], stages.by_words())
    assert {"specmatch", "specmatch.cli", "specmatch.stages", "specmatch.autoencoder", "specmatch.autoencoder.train",
            "specmatch.runtime", "specmatch.runtime.signals", "specmatch.metrics", "specmatch.metrics.reference"
            } == modules
    with pytest.raises(SpecmatchError, match="`specmatch fid`: no such command"):
        dvc_stages.command_modules([("fid",)], stages.by_words())


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_every_rule_of_the_dag_runs_in_exactly_one_dvc_stage(tmp_path, preset):
    """`dvc repro` runs each stage as `snakemake --allowed-rules ...`: a rule of the DAG left out
    of every stage fails the stage that needs its output (MissingInputException), and one in two
    stages writes into another stage's outputs."""
    repo = copy_repo(tmp_path / "repo")
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--forceall", "--config", f"preset={preset}"],
                          cwd=repo, env=dag_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job stats:" in proc.stdout, proc.stdout[-3000:]
    planned = set(job_stats(proc.stdout))
    planned.discard("all")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    allowed = {name: set(dvc_stages.allowed_rules(st["cmd"])) for name, st in stages.items()}
    for rule in planned:
        owners = [name for name, rules in allowed.items() if rule in rules]
        assert len(owners) == 1, (rule, owners)
    if preset != "paper":  # the report's floors at each sample count (report.baselines.real_floor)
        assert "fid_real_floor_n" in planned and "fid_real_floor_n" in allowed["evaluation"]


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


# --------------------------------------------------------------------------- Snakemake runs, DVC versions

def _dvc(repo: Path, *args: str, env: dict | None = None):
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env or dag_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _dvc_json(repo: Path, *args: str):
    """The JSON a `dvc ... --json` command prints on stdout."""
    proc = subprocess.run([str(BIN / "dvc"), *args, "--json"], cwd=repo, env=dag_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def adopted(tiny_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny DAG run (`tiny_run`: what `make demo` makes, run locally), made
    a git + DVC repository whose params.yaml names the tiny preset, and adopted by DVC with
    `specmatch dvc adopt`. The results are hard links (the stages write atomically, so nothing
    writes into those files)."""
    import os

    repo = tmp_path_factory.mktemp("adopt") / "repo"
    shutil.copytree(tiny_run, repo, symlinks=True, ignore=shutil.ignore_patterns("results"))
    shutil.copytree(tiny_run / "results", repo / "results", symlinks=True, copy_function=os.link)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("preset: paper", "preset: tiny", 1))
    run_checked(["git", "init", "-q"], repo)
    run_checked(["git", "add", "-A"], repo)
    run_checked(["git", "commit", "-qm", "the tiny run"], repo)
    proc = run_checked([str(BIN / "specmatch"), "dvc", "adopt"], repo)
    assert "dvc.lock" in proc.stdout and "specmatch dvc metrics" in proc.stdout
    return repo


@pytest.mark.slow
def test_dvc_adopts_a_snakemake_run_then_reruns_only_what_a_change_affects(adopted):
    lock = yaml.safe_load((adopted / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(yaml.safe_load((adopted / "dvc.yaml").read_text())["stages"])
    assert "Data and pipelines are up to date" in _dvc(adopted, "status")
    # One diffusion parameter of params.yaml: the stages that read it (diffusion; report, which
    # reads `diffusion` too) and those downstream of them, nothing upstream.
    params = adopted / "params.yaml"
    text = params.read_text()
    old = "    checkpoint_every: 10000\n    log_every: 100\n  # Representation alignment"
    assert old in text
    params.write_text(text.replace(old, old.replace("log_every: 100", "log_every: 50"), 1))
    try:
        dry = _dvc(adopted, "repro", "--dry")
        import re

        assert re.findall(r"Running stage '([\w-]+)'", dry) == ["diffusion", "report"], dry[-3000:]
    finally:
        params.write_text(text)
    assert "Data and pipelines are up to date" in _dvc(adopted, "status")


def test_adopt_refuses_an_incomplete_run(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("preset: paper", "preset: tiny", 1))
    from specmatch.errors import SpecmatchError

    with pytest.raises(SpecmatchError, match=r"(?s)not complete or not up to date.*Jobs left:\nJob stats:.*prepare_data +2\n"):
        dvc_stages.adopt(repo)


def _tree_hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()}


@pytest.mark.slow
def test_dvc_versions_the_run_pushes_pulls_and_audits_it_and_sees_what_a_change_affects(adopted, tmp_path):
    """The adopted tiny run as DVC holds it: `dvc repro` has nothing to do; every stage output
    goes to a remote and comes back byte for byte after the outputs and the cache are lost; the
    audit of a table verifies its whole lineage against the records and dvc.lock; a parameter
    of one phase marks that phase and what reads it as changed, nothing else."""
    lock = yaml.safe_load((adopted / "dvc.lock").read_text())["stages"]
    outs = [o["path"] for st in lock.values() for o in st.get("outs", [])]
    assert {"results/tiny/data", "results/tiny/spectra", "results/tiny/band_error", "results/tiny/report"} <= set(outs)
    assert "didn't change" in _dvc(adopted, "repro")
    # Every trained run's curves as DVC plots, its last values as DVC metrics (`dvc exp show`).
    shown = _dvc_json(adopted, "plots", "show")["data"]
    for stage, runs in (("autoencoders", ("embedded-tiny-sdvae", "embedded-tiny-esm", "embedded-tiny-dsm")),
                        ("diffusion", ("embedded-tiny-sdvae-uvit", "embedded-tiny-pixels-uvit",
                                       "embedded-tiny-dsm-sit-repa"))):
        for run in runs:
            values = shown[f"results/tiny/curves/{stage}/{run}/loss.tsv"][0]["content"]["data"]["values"]
            log = [json.loads(x) for x in (adopted / "results/tiny" / stage / run / "metrics.jsonl").read_text().splitlines()]
            assert [int(v["step"]) for v in values] == [r["step"] for r in log], run
    assert "results/tiny/curves/progress/embedded-tiny-sdvae-uvit/FD-EffNetLite0-128.tsv" in shown
    metrics = _dvc_json(adopted, "metrics", "show")
    training = next(iter(metrics.values()))["data"]["results/tiny/metrics/diffusion_training.json"]["data"]
    last = json.loads((adopted / "results/tiny/diffusion/embedded-tiny-sdvae-uvit/metrics.jsonl").read_text().splitlines()[-1])
    assert training["diffusion/embedded-tiny-sdvae-uvit/curves"]["loss"] == pytest.approx(last["loss"])
    before = {o: _tree_hashes(adopted / o) for o in outs}
    _dvc(adopted, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    _dvc(adopted, "push")
    for o in outs:  # the adopted results are hard links of the shared run's: unlink, never write
        shutil.rmtree(adopted / o) if (adopted / o).is_dir() else (adopted / o).unlink()
    shutil.rmtree(adopted / ".dvc" / "cache")
    _dvc(adopted, "pull")
    assert {o: _tree_hashes(adopted / o) for o in outs} == before
    for table, upstream in (("tables/generation/generation.csv", "results/tiny/data/embedded"),
                            ("report/tables/e1.csv", "results/tiny/progress")):
        audit = run_checked([str(BIN / "specmatch"), "audit", f"results/tiny/{table}"], adopted)
        assert upstream in audit.stdout and "FAILED" not in audit.stdout, audit.stdout[-3000:]
    params = adopted / "params.yaml"
    text = params.read_text()
    try:
        # A parameter of the data phase's spectra: that stage only (the stages downstream see a
        # change once its outputs change, when it has run).
        params.write_text(text.replace("n_bins: 16", "n_bins: 8", 1))
        status = _dvc(adopted, "status")
        assert "data" in status and "spectra" in status
        assert "evaluation" not in status and "report" not in status  # their params did not change
        assert "autoencoders" not in status and "diffusion" not in status and "alignment" not in status
        # A sampler: the diffusion stage (samples, scores) and the report (its metric over
        # training samples with the runs' first sampler); not the alignment targets.
        params.write_text(text.replace("dpm50-10k: {method: dpm-solver, steps: 50",
                                       "dpm50-10k: {method: dpm-solver, steps: 40", 1))
        status = _dvc(adopted, "status")
        assert "diffusion" in status and "report" in status
        assert "alignment" not in status and "autoencoders" not in status
    finally:
        params.write_text(text)
    assert "Data and pipelines are up to date" in _dvc(adopted, "status")


@pytest.mark.slow
def test_dvc_repro_submits_through_the_slurm_profile(adopted, slurm_cluster):
    """`SNAKEMAKE_PROFILE=slurm dvc repro` (docs/cluster.md): the stages' Snakemake submits every
    job through the SLURM profile, here to the local cluster through the apptainer stand-in, and
    the outputs DVC records are those the SLURM jobs wrote (the adopted run was a local one)."""
    from conftest import FAST_STATUS_CHECKS, dag_env, stand_in_env

    data, spectra = (adopted / "results/tiny" / d / "embedded" for d in ("data", "spectra"))
    assert all(not json.loads((d / "provenance.json").read_text())["scheduler"] for d in (data, spectra))
    # DVC runs the stage's own command line: the short test jobs' status checks go in the profile.
    profile = adopted / "slurm" / "config.yaml"
    text, old = profile.read_text(), "\nslurm-init-seconds-before-status-checks: 20\n"
    assert FAST_STATUS_CHECKS[0] == "--" + old.split(":")[0].strip() and old in text
    profile.write_text(text.replace(old, old.replace("20", FAST_STATUS_CHECKS[1]), 1))
    params = adopted / "params.yaml"
    params.write_text(params.read_text().replace("  n_bins: 16\n", "  n_bins: 8\n", 1))
    env = {**stand_in_env(adopted, dag_env()), "SNAKEMAKE_PROFILE": "slurm"}
    out = _dvc(adopted, "repro", "data", env=env)
    assert "Running stage 'data'" in out
    jobs = [j for j in slurm_cluster.jobs() if j.get("WorkDir") == str(adopted)]
    rules = sorted(j["Comment"].split("_wildcards")[0] for j in jobs)
    # the data stage of both tiny datasets (the 64 px images and the 32 px ones of the pixel run)
    assert rules == ["rule_data_spectra"] * 2 + ["rule_prepare_data"] * 2, rules
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    job_of = {j["Comment"].split("_wildcards")[0]: j["JobId"] for j in jobs if "32px" not in j["Comment"]}
    assert len(job_of) == 2, [j["Comment"] for j in jobs]
    for folder, rule in ((data, "rule_prepare_data"), (spectra, "rule_data_spectra")):
        prov = json.loads((folder / "provenance.json").read_text())
        assert prov["scheduler"]["slurm_job_id"] == job_of[rule], (folder, prov["scheduler"])
        assert prov["environment"]["container"]["image"] == str(adopted / "containers" / "specmatch.sif")
    spectra_json = json.loads((spectra / "spectra.json").read_text())
    assert spectra_json["n_bins"] == 8
    lock = yaml.safe_load((adopted / "dvc.lock").read_text())["stages"]["data"]
    assert lock["params"]["params.yaml"]["spectra"]["n_bins"] == 8
