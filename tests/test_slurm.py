"""`snakemake --profile slurm` on a real local SLURM cluster (tests/slurm_cluster.py), with the
recording `apptainer` stand-in (tests/bin/apptainer): the launch commands of the resources,
a few jobs of the tiny DAG submitted with their requests and run in the container, and a
training job that SLURM sends SIGUSR1 checkpoints, is submitted again and resumes."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

import pytest

from conftest import (REPO, SLURM_AE, SLURM_DAG_CONFIG, SLURM_DAG_TARGETS, SRC, STAND_IN_BIN, copy_repo, dag_env,
                      job_stats, slurm_snakemake)

BIN = Path(sys.executable).parent
STAND_IN = STAND_IN_BIN / "apptainer"
DEF = REPO / "containers" / "specmatch.def"


def _env() -> dict[str, str]:
    return dag_env()


def _dry_run_shell(repo: Path, *config: str) -> str:
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "-p", "--forceall", "--config", *config],
                          cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_profile_is_found_from_the_repository_root():
    cfg = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())
    assert cfg["executor"] == "slurm"
    assert cfg["software-deployment-method"] == "apptainer"
    assert "--nv" in cfg["apptainer-args"] and "container binds" in cfg["apptainer-args"]
    assert cfg["default-resources"]["slurm_partition"]
    # Trainers stop on SIGUSR1; nothing between SLURM and them may die of it first: the batch
    # shell ignores it, and the job step's task must be Snakemake (which ignores it), not a shell.
    assert cfg["precommand"] == "trap '' USR1" and not cfg.get("slurm-pass-command-as-script", False)
    assert cfg["retries"] >= 1
    # Snakemake checks for an `apptainer` >= 1.0 on PATH before it plans (the stand-in answers).
    env = {**_env(), "PATH": f"{STAND_IN_BIN}{os.pathsep}{_env()['PATH']}"}
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", "slurm", "--config", "preset=tiny", "-n",
                           "--executor", "dryrun"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_resource_requests_and_launch_commands(tmp_path):
    """Paper sizes: 8-GPU training starts torchrun with 8 processes; 2 nodes start one torchrun
    per node through srun; a one-process stage asking for 2 GPUs is refused."""
    repo = copy_repo(tmp_path / "repo")
    out = _dry_run_shell(repo, "preset=tiny", "resources={rules: {train_ae: {gpus: 8, cpus_per_gpu: 12}, "
                         "train_diffusion: {gpus: 4, nodes: 2, cpus_per_gpu: 6}}}")
    # Snakemake gives the job's 96 threads to the command; each of the 8 ranks gets its 12.
    assert re.search(r"OMP_NUM_THREADS=12 MKL_NUM_THREADS=12 OPENBLAS_NUM_THREADS=12 torchrun --standalone "
                     r"--nproc-per-node=8 --no-python specmatch train-ae ", out), out[-3000:]
    m = re.search(r"OMP_NUM_THREADS=6 MKL_NUM_THREADS=6 OPENBLAS_NUM_THREADS=6 srun --nodes=2 --ntasks-per-node=1 "
                  r"--kill-on-bad-exit=1 torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d "
                  r"--rdzv-endpoint=.*--no-python specmatch train-diffusion ", out)
    assert m, out[-3000:]
    # a one-GPU stage keeps the plain command
    assert re.search(r"Shell command: specmatch eval-ae ", out)
    bad = subprocess.run([str(BIN / "snakemake"), "-n", "--config", "preset=tiny",
                          "resources={rules: {eval_ae: {gpus: 2}}}"], cwd=repo, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "resources.rules.eval_ae" in bad.stdout + bad.stderr
    bad = subprocess.run([str(BIN / "snakemake"), "-n", "--config", "preset=tiny",
                          "resources={rules: {train_ea: {gpus: 1}}}"], cwd=repo, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "train_ea" in bad.stdout + bad.stderr


def test_each_rank_of_the_launch_command_runs_its_share_of_threads(tmp_path):
    """The launch command of a 2-GPU rule with 1 CPU per GPU, run for real (torchrun, 2 CPU
    processes) in the environment Snakemake gives its job of 2 threads: each rank runs 1 thread
    (torch caps its threads at the machine's cores, so the test stays within 2)."""
    repo = copy_repo(tmp_path / "repo")
    out = _dry_run_shell(repo, "preset=tiny", "resources={rules: {train_diffusion: {gpus: 2, cpus_per_gpu: 1}}}")
    cmd = re.search(r"Shell command: (\S.*?) --no-python specmatch train-diffusion ", out).group(1)
    assert "torchrun --standalone --nproc-per-node=2" in cmd
    probe = "import os, torch; print('rank', os.environ['RANK'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())"
    env = {**_env(), **{v: "2" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    proc = subprocess.run(["bash", "-c", f'{cmd} --no-python "$0" -c "$1"', sys.executable, probe], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert ranks == [["0", "1", "1"], ["1", "1", "1"]], proc.stdout


# --------------------------------------------------------------------------- the signal chain

def _stand_in(image: Path, script: str, env_extra: dict | None = None, ignore_usr1: bool = True):
    """`apptainer exec IMAGE bash -c SCRIPT` through the stand-in, started the way the rule's
    host side starts it under SLURM: SIGUSR1 ignored (the Snakefile's job-step setting)."""
    import signal

    def pre():
        if ignore_usr1:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([str(STAND_IN), "exec", "--nv", str(image), "bash", "-c", script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=pre)


def _wait_line(proc, text: str) -> None:
    line = proc.stdout.readline()
    assert text in line, (line, proc.stderr.read() if proc.poll() is not None else "")


def test_stand_in_gives_the_container_default_signals_and_forwards_them(tmp_path):
    """As Apptainer's starter: the command runs as a child with SIGUSR1 at its default action
    (though the caller ignored it), a SIGUSR1 sent to the starter reaches it, and the starter
    dies of the signal that killed it. A command that ignores SIGUSR1 itself survives it."""
    import signal

    image = tmp_path / "image.sif"
    image.write_bytes(DEF.read_bytes())
    proc = _stand_in(image, "grep SigIgn /proc/$$/status; echo ready; sleep 30")
    ign = int(proc.stdout.readline().split()[1], 16)
    assert not ign & (1 << (signal.SIGUSR1 - 1)), "the container's shell must start with SIGUSR1 at its default"
    _wait_line(proc, "ready")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == -signal.SIGUSR1
    proc = _stand_in(image, "trap '' USR1; echo ready; sleep 2; echo survived")
    _wait_line(proc, "ready")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "survived" in out
    proc = _stand_in(image, "echo ready; exit 3")
    assert proc.wait(timeout=30) == 3  # the command's status passes through


def test_stand_in_sources_the_images_environment_as_apptainer_does(tmp_path):
    """Apptainer empties the environment, sources %environment, then restores only the host
    variables the image did not set: a `${VAR:-default}` there never sees the host's value."""
    text = DEF.read_text()
    assert "SPECMATCH_RESOURCES" not in text.split("%environment", 1)[1].split("\n%", 1)[0]
    old = tmp_path / "old.sif"  # the definition of commit 004e497 set a default resources folder
    old.write_text(text.replace("%environment\n", "%environment\n    export SPECMATCH_RESOURCES="
                                "${SPECMATCH_RESOURCES:-/work/resources}\n", 1))
    new = tmp_path / "new.sif"
    new.write_bytes(DEF.read_bytes())
    script = 'echo "$SPECMATCH_RESOURCES $HF_HUB_OFFLINE $APPTAINER_NAME"'
    env = {"SPECMATCH_RESOURCES": str(tmp_path / "res"), "HF_HUB_OFFLINE": "0"}
    out_old, _ = _stand_in(old, script, env).communicate(timeout=30)
    out_new, _ = _stand_in(new, script, env).communicate(timeout=30)
    assert out_old.split() == ["/work/resources", "1", "old.sif"]  # the image overrides the host
    assert out_new.split() == [str(tmp_path / "res"), "1", "new.sif"]


def test_trainer_keeps_a_stop_signal_received_while_it_starts(tmp_path):
    """`catch_early`, first thing in a trainer's process: a SIGUSR1 that arrives before the
    training loop exists is neither fatal nor lost; the loop's StopRequest sees it."""
    code = """
import os, signal
from specmatch.runtime import signals
signals.catch_early()
os.kill(os.getpid(), signal.SIGUSR1)
import torch  # a slow start
with signals.StopRequest() as stop:
    print(stop.should_stop(), stop.signal_name)
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "SIGUSR1"], proc.stderr


@pytest.mark.slow
def test_sigusr1_checkpoints_then_the_job_is_resubmitted_and_resumes(slurm_cluster, tmp_path):
    """One autoencoder training job on 2 (fake) GPUs, so torchrun runs 2 ranks: SLURM's warning
    signal mid-training makes it checkpoint and stop; Snakemake submits it again and the new
    SLURM job resumes from that checkpoint and finishes."""
    repo = copy_repo(tmp_path / "repo")
    ae = "embedded-tiny-sdvae"
    steps = 60
    config = ["preset=tiny", f"grid={{datasets: [embedded], autoencoders: [{ae}], diffusions: []}}",
              # 2 CPU processes: per-process BatchNorm (PyTorch's SyncBatchNorm computes on GPUs only)
              f"autoencoder={{train: {{steps: {steps}, checkpoint_every: 1000, log_every: 5}}, "
              "disc: {sync_batchnorm: false}}",
              "resources={rules: {train_ae: {gpus: 2, cpus_per_gpu: 1}}}",
              # the report's experiments must name runs of the grid
              f"report={{experiments: {{E1: {{autoencoders: [{ae}], diffusions: []}}, E2: {{autoencoders: [], "
              "diffusions: []}, E3: {diffusions: []}}, progress: {diffusions: []}}"]
    target = f"results/tiny/autoencoders/{ae}"
    proc = slurm_snakemake(repo, ["--config", *config, "--", target], _env(), timeout=1500)
    log = repo / "results" / "tiny" / "logs" / "train_ae" / f"{ae}.log"
    runs = repo / "results" / "tiny" / "runs" / "autoencoders" / ae

    def trained_steps() -> int:
        rows = [json.loads(line) for f in runs.glob("*/metrics.jsonl") for line in f.read_text().splitlines() if line]
        return max((r.get("step", 0) for r in rows), default=0)

    deadline = time.monotonic() + 900
    while trained_steps() < 10:
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(1)
    job = next(j for j in slurm_cluster.jobs() if "rule_train_ae" in j.get("Comment", "")
               and j["JobState"] == "RUNNING")
    subprocess.run(["scancel", "--signal=USR1", job["JobId"]], check=True)
    stdout, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stdout[-4000:]

    jobs = [j for j in slurm_cluster.jobs() if "rule_train_ae" in j.get("Comment", "")
            and j.get("WorkDir") == str(repo)]
    assert [j["JobState"] for j in jobs] == ["FAILED", "COMPLETED"], jobs
    # The first job failed because the trainer stopped (status 3, torchrun's 1), not because
    # the signal killed a process on the way (srun would report the signal).
    first_log = next((repo / ".snakemake" / "slurm_logs").glob(f"rule_train_ae/*/{jobs[0]['JobId']}.log")).read_text()
    assert "User defined signal" not in first_log and "Error in rule train_ae" in first_log, first_log[-3000:]
    assert all(j["TresPerJob"] == "gres:gpu:2" for j in jobs), [j.get("TresPerJob") for j in jobs]
    # Snakemake deletes a job's log before it runs it again: the run folder keeps the evidence.
    # With checkpoint_every beyond the run, only the signal and the end of training save one.
    (run_dir,) = runs.iterdir()
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and 10 <= saved[0] < steps and saved[1] == steps, saved
    text = log.read_text()
    assert re.search(rf"resumed from \S+step-0*{saved[0]} \((iteration {saved[0]}: )?generator step {saved[0]},",
                     text), text[-3000:]
    prov = json.loads((repo / target / "provenance.json").read_text())
    assert prov["scheduler"]["slurm_job_id"] == jobs[1]["JobId"]
    assert prov["environment"]["container"]["image"] == str(repo / "containers" / "specmatch.sif")
    out = json.loads((repo / target / "autoencoder.json").read_text())
    assert out["world_size"] == 2 and out["generator_steps"] == steps, out
    # Both attempts ran in the container call, on their job's two GPUs, under torchrun.
    calls = [json.loads(line) for line in (repo / "apptainer-calls.jsonl").read_text().splitlines()]
    ae_calls = [c for c in calls if "argv" in c and c["argv"][0] == "exec" and "train-ae" in c["argv"][-1]]
    assert [c["env"]["SLURM_JOB_ID"] for c in ae_calls] == [j["JobId"] for j in jobs]
    # The container's process of the first attempt ended with torchrun's status after the
    # trainers' exit 3, not killed by SIGUSR1 on the way (the stand-in records it, minus the
    # signal number when a signal killed it); the second finished.
    exits = {c["pid"]: c["exit"] for c in calls if "exit" in c}
    assert [exits.get(c["pid"]) for c in ae_calls] == [1, 0], (exits, [c["pid"] for c in ae_calls])
    for c in ae_calls:
        assert "--nv" in c["argv"] and c["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        # inside the container the command ignores SIGUSR1 itself (the stand-in, as Apptainer's
        # starter, gives it the default action) before it starts torchrun with 1 thread per rank
        assert re.match(r"set -euo pipefail; trap '' USR1; .*OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "
                        r"OPENBLAS_NUM_THREADS=1 torchrun --standalone --nproc-per-node=2 --no-python specmatch "
                        r"train-ae", c["argv"][-1]), c["argv"][-1]


def _planned_rules(repo: Path) -> collections.Counter:
    """Jobs per rule of the small DAG `slurm_run` submits (a forced dry run's job stats); its
    targets are stages' outputs, so every planned job has a command and is submitted."""
    proc = subprocess.run([str(BIN / "snakemake"), "-n", "--forceall", "--config", *SLURM_DAG_CONFIG, "--",
                           *SLURM_DAG_TARGETS], cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Job stats:" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return collections.Counter(job_stats(proc.stdout))


def _minutes(limit: str) -> int:
    """`scontrol`'s TimeLimit ([days-]hours:minutes:seconds) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (sec > 0)


@pytest.mark.slow
def test_each_job_runs_as_a_slurm_job_with_its_request_in_the_container(slurm_run, slurm_cluster):
    """`--profile slurm` on a few jobs of the tiny DAG (conftest.slurm_run: data, spectra, one
    autoencoder trained on 2 GPUs, its evaluation and latents): every planned job ran as its own
    SLURM job asking for the GPUs, memory and time its rule's `resources` give; its stage ran
    inside one container call (`apptainer exec --nv ... --bind <results>,<resources> IMAGE`),
    on the job's GPUs, the 2-GPU training as torchrun with one rank per GPU; and each output's
    provenance records its job id and the image with its sha256."""
    from specmatch import config as cfg

    params = cfg.resolve(cfg.load_yaml(slurm_run / "params.yaml"), presets_dir=slurm_run / "presets",
                         overrides=cfg.typed_command_line(dict(c.split("=", 1) for c in SLURM_DAG_CONFIG)))
    res = params["resources"]
    planned = _planned_rules(slurm_run)
    # The DAG covers a job without GPUs, jobs on one and a job on two.
    assert planned == {"prepare_data": 1, "data_spectra": 1, "train_ae": 1, "eval_ae": 1, "extract_latents": 1}
    request = {rule: {**res["default"], **res["rules"].get(rule, {})} for rule in planned}
    gpus = {rule: r["gpus"] for rule, r in request.items()}
    assert sorted(gpus.values()) == [0, 1, 1, 1, 2], gpus

    jobs = {j["JobId"]: j for j in slurm_cluster.jobs() if j.get("WorkDir") == str(slurm_run)}
    rule_of = {i: re.match(r"rule_(.+?)(_wildcards_.*)?$", j["Comment"]).group(1) for i, j in jobs.items()}
    assert collections.Counter(rule_of.values()) == planned
    for i, j in jobs.items():
        r = request[rule_of[i]]
        assert j["JobState"] == "COMPLETED", j
        want = f"gres:gpu:{r['gpus']}" if r["gpus"] else ""
        assert j.get("TresPerJob", "").replace("(null)", "") == want, (rule_of[i], j.get("TresPerJob"))
        assert _minutes(j["TimeLimit"]) == r["runtime"], (rule_of[i], j["TimeLimit"])
        assert j["MinMemoryNode"] == f"{r['mem_mb']}M", (rule_of[i], j["MinMemoryNode"])

    calls = [json.loads(line) for line in (slurm_run / "apptainer-calls.jsonl").read_text().splitlines()]
    execs = [c for c in calls if "argv" in c and (c["argv"][0] == "exec" or "exec" in c["argv"][:3])]
    by_job = collections.defaultdict(list)
    for c in execs:
        by_job[c["env"].get("SLURM_JOB_ID")].append(c)
    assert sorted(by_job) == sorted(jobs), "every job, and only jobs, called the container"
    image = slurm_run / "containers" / "specmatch.sif"
    for i, job_calls in by_job.items():
        assert len(job_calls) == 1, (rule_of[i], job_calls)
        (c,) = job_calls
        argv, n = c["argv"], gpus[rule_of[i]]
        assert "--nv" in argv and any(Path(c["cwd"], a).resolve() == image.resolve() for a in argv), argv
        binds = ",".join(argv[k + 1] for k, a in enumerate(argv) if a == "--bind")
        assert str(slurm_run / "results") in binds.split(",") and str(slurm_run / "resources") in binds.split(","), binds
        # SLURM gives the job's GPUs to the container's command; only a multi-GPU rule starts torchrun.
        devices = c["env"].get("CUDA_VISIBLE_DEVICES")
        assert (0 if devices is None else len(devices.split(","))) == n, (rule_of[i], devices)
        command = argv[-1]
        launch = re.search(rf"torchrun --standalone --nproc-per-node={n} --no-python specmatch train-ae ", command)
        assert bool(launch) == (n > 1) and ("torchrun" in command) == (n > 1), (rule_of[i], command)
    ae = json.loads((slurm_run / "results" / "tiny" / "autoencoders" / SLURM_AE / "autoencoder.json").read_text())
    assert ae["world_size"] == 2 and ae["generator_steps"] == 4, ae

    sha = (slurm_run / "containers" / "specmatch.sif.sha256").read_text().split()[0]
    recorded = set()
    for r in (slurm_run / "results" / "tiny").glob("**/provenance.json"):
        if "runs" in r.relative_to(slurm_run).parts:
            continue  # trainers' working folders
        prov = json.loads(r.read_text())
        recorded.add(prov["scheduler"]["slurm_job_id"])
        container = prov["environment"]["container"]
        assert Path(container["image"]).resolve() == image.resolve() and container["sha256"] == sha, (r, container)
    assert recorded == set(jobs), "every job recorded its SLURM job id; every record is of a job"
