"""Shared test setup: make `src/` importable without installing the package."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SRC = str(REPO / "src")
SRC = _SRC
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)


import pytest  # noqa: E402

# The micro autoencoder of the trainer tests: 32 px images -> 4x16x16 latents in a second.
MICRO_AE = {"name": "micro", "channels": [8, 16], "z_channels": 4, "num_res_blocks": 1, "norm_groups": 4}
MICRO_AE_RUN = {"dataset": "embedded", "config": MICRO_AE, "variant": "sdvae",
                "train": {"steps": 2, "batch_size": 4, "device": "cpu", "ema_decay": 0.0, "log_every": 1},
                "loss": {"lpips_weight": 0.0},
                "latents": {"batch_size": 7, "shard_size": 10, "device": "cpu"}}


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """The embedded set at 32 px, 24 train and 8 test images (shards of 10): the dataset of the
    micro runs. Read-only for the tests that share it."""
    from specmatch.data.prepare import prepare

    out = tmp_path_factory.mktemp("micro-data") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 24, "n_test": 8, "shard_size": 10},
            "embedded", out)
    return out


@pytest.fixture(scope="session")
def micro_latents(tmp_path_factory, micro_data):
    """(dataset, autoencoder folder, latent cache) of the embedded set at 32 px (24 train images,
    8 test) and a 2-step micro autoencoder: 48 cache entries (flips included) of 4x16x16."""
    from specmatch.autoencoder import latents
    from specmatch.autoencoder import train as ae_train

    root = tmp_path_factory.mktemp("micro-latents")
    data = micro_data
    ae_train.train(MICRO_AE_RUN, data, root / "aerun", root / "ae", "micro")
    man = latents.extract(MICRO_AE_RUN, root / "ae", data, "micro", root / "lat")
    assert man["count"] == 48 and man["shape"] == [4, 16, 16] and man["num_classes"] > 1
    return data, root / "ae", root / "lat"


def weights(folder) -> dict:
    """The tensors of a trainer output's model.safetensors."""
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def load_split(folder, split: str):
    """All uint8 images and int64 labels of a dataset-format split, through the product's reader
    (which checks every shard's sha256 against the manifest)."""
    import numpy as np

    from specmatch.data.reader import SplitReader

    r = SplitReader(folder, split)
    return r.get(np.arange(len(r)))


def assert_bitwise(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def cli_popen(args: list[str], env_extra: dict | None = None, **kw):
    """`python -m specmatch.cli ARGS` as a child process (text pipes), with src/ importable."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": _SRC, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "specmatch.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def torchrun_command(args: list[str], nproc: int = 2) -> tuple[list[str], dict]:
    """(command, environment) running `specmatch.cli ARGS` under torchrun with `nproc` CPU
    processes on a free port, one thread each (so runs compare across process counts)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": _SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "specmatch.cli", *args]
    return cmd, env


def wait_for(cond, proc, timeout: float = 300) -> None:
    """Poll `cond()` while the child `proc` runs; fail with its stderr if it exits first."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_and_resume(args: list[str], run_dir, out, steps: int) -> None:
    """A trainer CLI run SIGKILLed once its step-2 checkpoint exists (no chance to clean up),
    then started again with the same arguments, which must resume it and finish."""
    import signal

    from specmatch.runtime import checkpoint

    run_dir, out = Path(run_dir), Path(out)
    proc = cli_popen(args)
    wait_for(lambda: (run_dir / "checkpoints" / "step-00000002" / "meta.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = [s for s, _ in checkpoint.list_checkpoints(run_dir)]
    assert done and max(done) < steps
    proc = cli_popen(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in err
    # The record tells how the run was made: the killed attempt (no end) and the resumption,
    # from the checkpoint's step to the end; its time covers the stage, not only its final write.
    import json

    rec = json.loads((out / "provenance.json").read_text())
    a = rec["attempts"]
    assert [x["status"] for x in a] == ["killed or running", "finished"], a
    assert (a[0]["start_step"], a[1]["start_step"], a[1]["end_step"]) == (0, max(done), steps)
    assert rec["time"]["wall_s"] >= a[1]["wall_s"] > 0


def sigterm_run(args: list[str], run_dir, out):
    """A trainer CLI run sent SIGTERM after two log lines: it must write one checkpoint, say so,
    exit with status 3 and leave no output. Returns that checkpoint's folder."""
    import signal

    from specmatch.runtime import checkpoint

    run_dir = Path(run_dir)
    proc = cli_popen(args)
    log = run_dir / "metrics.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-2000:]
    assert "SIGTERM" in err and "checkpoint saved" in err
    ckpts = checkpoint.list_checkpoints(run_dir)
    assert len(ckpts) == 1 and ckpts[0][0] >= 2
    assert not Path(out).exists()
    from specmatch.runtime.training import read_attempts

    attempts = read_attempts(run_dir)
    assert [(x["status"], x["end_step"]) for x in attempts] == [("interrupted", ckpts[0][0])], attempts
    return ckpts[0]


def in_ci() -> bool:
    """Whether this is the CI run (`CI=true`, set by .ci/run): there a real component a test
    needs (the local SLURM cluster, the chroot build) that cannot start fails the test with its
    reason, where elsewhere the test skips."""
    import os

    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip, or in CI fail, with `reason`."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a real component of the tests must start here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster (tests/slurm_cluster.py) for the whole session; the tests
    that need it skip, with the reason, where it cannot be started, and fail in CI (which
    installs slurm-wlm)."""
    import slurm_cluster as sc

    left = sc.orphan()  # a cluster a killed test session left running: used, not restarted
    why = None if left else sc.unavailable()
    if why:
        unavailable(f"no local SLURM cluster: {why}")
    try:
        cluster = sc.LocalSlurm().attach(left) if left else sc.LocalSlurm().start()
    except sc.Busy as e:
        unavailable(f"no local SLURM cluster: {e}")
    yield cluster
    cluster.stop()


STAND_IN_BIN = REPO / "tests" / "bin"  # the recording `apptainer` stand-in


def stand_in_env(repo: Path, env: dict) -> dict:
    """`env` with the recording `apptainer` stand-in first on PATH, its call log in the copy
    `repo`, and a stand-in image where params.yaml's container.image points: the definition file
    it would be built from (the stand-in sources its %environment as Apptainer does), with the
    .sha256 sidecar that provenance records."""
    import hashlib
    import os

    image = repo / "containers" / "specmatch.sif"
    image.write_bytes((repo / "containers" / "specmatch.def").read_bytes())
    image.with_name(image.name + ".sha256").write_text(hashlib.sha256(image.read_bytes()).hexdigest() + "\n")
    return {**env, "PATH": f"{STAND_IN_BIN}{os.pathsep}{env['PATH']}",
            "SPECMATCH_APPTAINER_LOG": str(repo / "apptainer-calls.jsonl")}


# Status checks a second after submission, and again a second after any job ends (the SLURM
# plugin's `init_seconds_before_status_checks` is both; it adds 10 s per check that finds nothing
# finished, up to 3 minutes). The profile's 20 s suits real jobs of hours; the test jobs take
# seconds, and at 20 s most of a short DAG's time went to waiting for the next check. Snakemake's
# own `--seconds-between-status-checks` is not a setting here: the plugin replaces it after its
# first check.
FAST_STATUS_CHECKS = ("--slurm-init-seconds-before-status-checks", "1")


def slurm_snakemake(repo: Path, args: list[str], env: dict, timeout: int = 3000):
    """`snakemake --profile slurm ARGS` in the copy `repo`, through the stand-in (`stand_in_env`),
    with the status checks of short test jobs (FAST_STATUS_CHECKS). Started as a child (Popen);
    SLURM jobs have no way to stop a hung Snakemake, so `timeout -s KILL` bounds it (measured
    with Snakemake 9 here)."""
    import subprocess

    cmd = ["timeout", "-s", "KILL", str(timeout), str(Path(sys.executable).parent / "snakemake"),
           "--profile", "slurm", *FAST_STATUS_CHECKS, *args]
    return subprocess.Popen(cmd, cwd=repo, env=stand_in_env(repo, env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# The end-to-end tests (test_pipeline.py, test_slurm.py) work in temporary copies of the
# repository, so that the developer's results/ are never touched.
COPY_IGNORE = ("results", ".snakemake", ".git", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info",
               ".venv", ".whl", ".gl")


def job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats:" table of a Snakemake run's (or dry run's) output."""
    jobs = {}
    for line in output.split("Job stats:", 1)[-1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def dag_env() -> dict[str, str]:
    """The environment of a DAG run: the venv's executables on PATH, a git identity for DVC."""
    import os

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def copy_repo(dst: Path) -> Path:
    import shutil

    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    return dst


def run_checked(cmd: list[str], cwd: Path, timeout: int = 1800):
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, env=dag_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One run of the whole tiny DAG, shared by the end-to-end tests: `snakemake --cores 2`, what
    `make demo` runs. Submission through `--profile slurm` is tested on a few of its jobs
    (`slurm_run`): the whole DAG through the SLURM executor, each of its 59 jobs waiting on
    status checks and parsing the workflow again, took 28 minutes on 2 cores against 13 here."""
    repo = copy_repo(tmp_path_factory.mktemp("dag") / "repo")
    # A bound on a hang, not on speed: 13 minutes alone, 30 on 2 cores shared with another run.
    run_checked([str(Path(sys.executable).parent / "snakemake"), "--cores", "2", "--config", "preset=tiny"], repo,
                timeout=3600)
    return repo


# The DAG `slurm_run` submits: of the tiny grid, one dataset's preparation (no GPU) and spectra,
# and one autoencoder trained a few steps on 2 (fake) GPUs, so under torchrun with 2 ranks, then
# evaluated and its latents cached (one GPU each): every kind of request and launch the tiny DAG
# makes through the profile, in 5 jobs of seconds.
SLURM_AE = "embedded-tiny-sdvae"
SLURM_DAG_CONFIG = (
    "preset=tiny",
    # 2 CPU processes: per-process BatchNorm (PyTorch's SyncBatchNorm computes on GPUs only)
    "autoencoder={train: {steps: 4, log_every: 1, checkpoint_every: 1000}, disc: {sync_batchnorm: false}}",
    "resources={rules: {train_ae: {gpus: 2, cpus_per_gpu: 1}}}",
)
SLURM_DAG_TARGETS = ("results/tiny/spectra/embedded", f"results/tiny/ae_eval/{SLURM_AE}",
                     f"results/tiny/latents/{SLURM_AE}")


@pytest.fixture(scope="session")
def slurm_run(tmp_path_factory, slurm_cluster) -> Path:
    """The copy of the repository in which `snakemake --profile slurm` ran the small DAG
    (SLURM_DAG_CONFIG, SLURM_DAG_TARGETS) on the session's local cluster, through the recording
    apptainer stand-in (its calls in `<repo>/apptainer-calls.jsonl`)."""
    repo = copy_repo(tmp_path_factory.mktemp("slurm-dag") / "repo")
    proc = slurm_snakemake(repo, ["--config", *SLURM_DAG_CONFIG, "--", *SLURM_DAG_TARGETS], dag_env(), timeout=1200)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-6000:]
    return repo


@pytest.fixture
def fresh_integrity(monkeypatch):
    """A new process's state of the weights and file checks (runtime.integrity): no file hashed,
    checked or skipped yet, and no SPECMATCH_VERIFY from the environment."""
    from specmatch.runtime import integrity

    monkeypatch.delenv(integrity.ENV, raising=False)
    for name in ("_memo", "_checked", "_unchecked"):
        monkeypatch.setattr(integrity, name, type(getattr(integrity, name))())


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from intra-op threads, and on a loaded 2-core machine two
    spinning threads made their runs 50x slower; restored for the other modules."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
