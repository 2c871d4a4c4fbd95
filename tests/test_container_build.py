"""containers/specmatch.def built for real, as far as a machine without Apptainer allows
(tests/chroot_build.py: the base root from Debian's archive, %files copied, %post run in a
chroot with this machine's package folders offered to pip), then its %test and a stage run in
that root with the environment Apptainer gives a container. What differs from `apptainer build`
is listed in chroot_build's docstring and in docs/cluster.md. Needs root and debootstrap; skips
without them, and fails in CI (CI=true), which installs debootstrap."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

import chroot_build
from conftest import REPO, unavailable

pytestmark = pytest.mark.slow

DEF = REPO / "containers" / "specmatch.def"


def test_definition_builds_and_runs_its_test_and_a_stage(tmp_path):
    why = chroot_build.unavailable()
    if why:
        unavailable(f"no chroot build of the container: {why}")
    log = chroot_build.Log(tmp_path / "build.log")
    root = tmp_path / "root"
    commit = "0123456789abcdef0123456789abcdef01234567"
    chroot_build.build(DEF, REPO, root, log, {"GIT_COMMIT": commit, "GIT_DIRTY": "0"})

    # %post: Debian 12's python3.11 in a venv holding exactly the lock's pins and the package
    assert (root / "etc" / "debian_version").read_text().startswith("12.")
    freeze = chroot_build.run_in_root(root, "/opt/venv/bin/python --version; /opt/venv/bin/pip freeze --all",
                                      {"PATH": chroot_build.DEFAULT_PATH}, log, "freeze")
    assert re.search(r"Python 3\.11\.\d+", freeze), freeze[-2000:]
    def norm(name: str) -> str:  # PEP 503
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {norm(k): v for k, v in (line.split("==") for line in (REPO / "requirements" / "lock.txt").read_text()
                                    .splitlines() if "==" in line and not line.startswith("#"))}
    installed = {norm(k): v for k, v in (line.split("==") for line in freeze.splitlines() if "==" in line)}
    wrong = {k: (v, installed.get(k)) for k, v in pins.items() if installed.get(k) != v}
    assert not wrong, wrong
    assert installed.get("pip") == "25.3" and "specmatch @ file:///opt/specmatch" in freeze

    # %test, as `apptainer test` runs it: a real stage on the CPU, and whether CUDA is visible
    image = "/shared/containers/specmatch.sif"  # where the image would lie; Apptainer sets these
    host = {"HOME": "/root", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "SPECMATCH_RESOURCES": str(tmp_path / "work" / "resources")}
    env = chroot_build.container_env(host, root, image)
    assert env["PATH"].startswith("/opt/venv/bin:") and env["HF_HUB_OFFLINE"] == "1"
    assert env["SPECMATCH_RESOURCES"] == host["SPECMATCH_RESOURCES"]  # the host decides, not the image
    out = chroot_build.run_in_root(root, "exec /.singularity.d/test", env, log, "%test")
    assert re.search(r"torch 2\.14\.1\S* \| CUDA build 13\.0 \| CUDA visible: False \| 0 GPU\(s\)", out), out[-3000:]
    assert "data-spectra ran: 64 images" in out, out[-3000:]

    # One stage through %runscript (`apptainer run IMAGE prepare-data ...`) in a bound working
    # folder: the same bytes as the same stage in the test environment, and the image's code
    # version and path in its provenance.
    work = tmp_path / "work"
    (work / "resources").mkdir(parents=True)
    args = ["prepare-data", "--name", "embedded", "--params",
            '{"source": "embedded", "resolution": 32, "n_train": 40, "n_test": 8}']
    chroot_build.run_in_root(root, "exec /.singularity.d/runscript " + shlex.join(args + ["--out", "data"]), env, log,
                             "stage", writable=(str(work),), cwd=str(work))
    host_run = subprocess.run([sys.executable, "-m", "specmatch.cli", *args, "--out", str(tmp_path / "host")],
                              capture_output=True, text=True, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
                                   "HOME": str(tmp_path)})
    assert host_run.returncode == 0, host_run.stderr[-3000:]
    mine, theirs = (json.loads((p / "manifest.json").read_text()) for p in (work / "data", tmp_path / "host"))
    assert mine["splits"] == theirs["splits"]  # shard files, counts and sha256s
    prov = json.loads((work / "data" / "provenance.json").read_text())
    assert prov["environment"]["container"]["image"] == image
    assert prov["code"]["git_commit"] == commit and prov["code"]["git_dirty"] is False
    assert prov["environment"]["python"].startswith("3.11.")
    print("chroot build, step times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in log.times.items()))
