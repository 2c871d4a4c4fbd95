"""`dvc repro` while a Snakemake run is using the stage's outputs: nothing is removed under the
running job (dvc.yaml's outputs are `persist: true`, and the stage's own Snakemake refuses to
start while the running one holds its lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_repo, dag_env, run_checked

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_dvc_repro_removes_nothing_a_running_snakemake_job_uses(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("preset: paper", "preset: tiny", 1))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run_checked(cmd, repo)
    data = repo / "results" / "tiny" / "data"
    with open(tmp_path / "snakemake.out", "w") as out:
        proc = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", "--config", "preset=tiny", "--",
                                 "results/tiny/data/embedded"], cwd=repo, env=dag_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    # The job is held still (SIGSTOP) once it writes its temporary output inside DVC's output
    # results/tiny/data, for as long as `dvc repro data` runs: the race made certain.
    stage, deadline = None, time.monotonic() + 300
    while stage is None:
        assert proc.poll() is None, (tmp_path / "snakemake.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "prepare_data did not start"
        tmp = [p for p in data.iterdir() if p.name.endswith(".tmp")] if data.is_dir() else []
        stage = int(tmp[0].name.split("@")[1]) if tmp else None
        time.sleep(0.02)
    os.kill(stage, signal.SIGSTOP)
    try:
        repro = subprocess.run([str(BIN / "dvc"), "repro", "data"], cwd=repo, env=dag_env(), capture_output=True,
                               text=True, timeout=600)
        kept = tmp[0].is_dir()
    finally:
        os.kill(stage, signal.SIGCONT)
    said = repro.stdout + repro.stderr
    assert kept, f"dvc repro removed the running job's output:\n{said[-3000:]}"
    assert repro.returncode != 0 and "cannot be locked" in said, said[-3000:]
    assert proc.wait(timeout=600) == 0, (tmp_path / "snakemake.out").read_text()[-3000:]
    # the job's dataset is whole: every file as its record lists it
    audit = subprocess.run([str(BIN / "specmatch"), "audit", "results/tiny/data/embedded", "--no-dvc"], cwd=repo,
                           env=dag_env(), capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout + audit.stderr
