"""Two clones at two commits on one machine share the environment of their lock file, and each
runs its own code: `make install` layers a .venv per clone over the shared third-party
packages (src/specmatch/ops/layered_env.py) and installs the clone there, never into the shared
environment, so the last clone to install no longer decides what `specmatch` runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, copy_repo, dag_env, run_checked


def _shared_env() -> Path:
    """The complete environment this test's third-party packages come from (`.complete`: what
    the Makefile's cache holds), to layer on instead of installing ~195 wheels again."""
    import snakemake

    env = Path(snakemake.__file__).resolve().parents[4]  # <env>/lib/python3.11/site-packages/snakemake
    assert (env / ".complete").is_file(), env
    return env


def _listing(env: Path) -> dict[str, float]:
    sp = next((env / "lib").glob("python3*/site-packages"))
    return {p.name: p.stat().st_mtime for p in [*sp.iterdir(), *(env / "bin").iterdir()] if p.name != "__pycache__"}


def _clone_runs(clone: Path) -> dict:
    """What `specmatch` is in this clone: the console script PATH finds (as a rule's shell), the
    package it imports, its version and the commit its provenance records."""
    env = {**dag_env(), "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    script = subprocess.run(["sh", "-c", "command -v specmatch && specmatch --version"], cwd="/", env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    where, version = script.stdout.split("\n")[:2]
    probe = ("import json, specmatch; from specmatch.runtime import provenance; "
             "print(json.dumps({'file': specmatch.__file__, 'commit': provenance.code_version()['git_commit']}))")
    py = subprocess.run(["python", "-c", probe], cwd="/", env=env, capture_output=True, text=True, timeout=120)
    assert py.returncode == 0, py.stderr
    shebang = Path(where).read_text().split("\n", 1)[0]
    return {"script": where, "shebang": shebang, "version": version, **json.loads(py.stdout)}


@pytest.mark.slow
def test_two_clones_each_run_their_own_specmatch(tmp_path):
    shared = _shared_env()
    before = _listing(shared)
    a = copy_repo(tmp_path / "a")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "A"]):
        run_checked(cmd, a)
    b = tmp_path / "b"
    run_checked(["git", "clone", "-q", str(a), str(b)], tmp_path)
    init = b / "src" / "specmatch" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.0+b"'))
    run_checked(["git", "commit", "-qam", "B"], b)
    commits = {c: run_checked(["git", "rev-parse", "HEAD"], c).stdout.strip() for c in (a, b)}
    assert commits[a] != commits[b]
    # ENV_CACHE holding the shared environment under its lock's name: `make install` reuses it.
    lock_id = hashlib.sha256((REPO / "requirements" / "lock.txt").read_bytes()).hexdigest()[:16]
    cache = tmp_path / "envs"
    cache.mkdir()
    (cache / f"py311-{lock_id}").symlink_to(shared)
    for clone in (a, b):  # b installs last: it used to take a's `specmatch` over
        run_checked(["make", "--no-print-directory", "install", f"ENV_CACHE={cache}", "WHEELS="], clone, timeout=600)
    for clone, version in ((a, "specmatch 0.1.0"), (b, "specmatch 0.1.0+b")):
        runs = _clone_runs(clone)
        assert runs["script"] == str(clone / ".venv" / "bin" / "specmatch"), runs
        assert runs["shebang"] == f"#!{clone / '.venv' / 'bin' / 'python'}", runs
        assert runs["version"] == version, runs
        assert runs["file"] == str(clone / "src" / "specmatch" / "__init__.py"), runs
        assert runs["commit"] == commits[clone], runs
        # the tools every rule and DVC stage start run the clone's Python too
        for tool in ("snakemake", "dvc"):
            assert (clone / ".venv" / "bin" / tool).read_text().startswith(runs["shebang"] + "\n"), tool
    assert _listing(shared) == before, "make install wrote into the shared environment"
    # A rule of b's DAG, started as b/.venv/bin/snakemake while a's environment comes first on
    # PATH (a's venv activated), runs b's `specmatch`: its provenance names b's code.
    env = {**dag_env(), "PATH": f"{a / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(b / ".venv" / "bin" / "snakemake"), "--cores", "1", "--config", "preset=tiny",
                           "datasets={embedded: {n_train: 64, n_test: 16}}", "--", "results/tiny/data/embedded"],
                          cwd=b, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code = json.loads((b / "results/tiny/data/embedded/provenance.json").read_text())["code"]
    assert (code["version"], code["git_commit"]) == ("0.1.0+b", commits[b]), code
    # make again: nothing to redo; a .venv of the earlier layout (a link to the shared
    # environment) is made again as a layered one
    stamp = (a / ".venv.stamp").stat().st_mtime
    run_checked(["make", "--no-print-directory", "install", f"ENV_CACHE={cache}", "WHEELS="], a, timeout=600)
    assert (a / ".venv.stamp").stat().st_mtime == stamp
    (a / ".venv").rename(tmp_path / "a-venv")
    (a / ".venv").symlink_to(shared)
    run_checked(["make", "--no-print-directory", "install", f"ENV_CACHE={cache}", "WHEELS="], a, timeout=600)
    assert not (a / ".venv").is_symlink() and _clone_runs(a)["file"] == str(a / "src" / "specmatch" / "__init__.py")
