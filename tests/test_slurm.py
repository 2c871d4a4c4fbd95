"""`snakemake --profile slurm` on a real local SLURM cluster (tests/slurm_cluster.py), with the
recording `apptainer` stand-in (tests/bin/apptainer): the launch commands of the resources,
and a training job that SLURM sends SIGUSR1 checkpoints, is submitted again and resumes.
The tiny DAG's own run through the profile is checked in test_pipeline.py (one shared run)."""

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

from conftest import REPO, STAND_IN_BIN, copy_repo, dag_env, slurm_snakemake

BIN = Path(sys.executable).parent


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
    out = _dry_run_shell(repo, "preset=tiny", "resources={rules: {train_ae: {gpus: 8}, "
                         "train_diffusion: {gpus: 4, nodes: 2, cpus_per_gpu: 6}}}")
    assert re.search(r"torchrun --standalone --nproc-per-node=8 --no-python specmatch train-ae ", out)
    m = re.search(r"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes=2 "
                  r"--nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=.*--no-python specmatch train-diffusion ", out)
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


def test_sigusr1_checkpoints_then_the_job_is_resubmitted_and_resumes(slurm_cluster, tmp_path):
    """One autoencoder training job on 2 (fake) GPUs, so torchrun runs 2 ranks: SLURM's warning
    signal mid-training makes it checkpoint and stop; Snakemake submits it again and the new
    SLURM job resumes from that checkpoint and finishes."""
    repo = copy_repo(tmp_path / "repo")
    ae = "embedded-tiny-sdvae"
    steps = 60
    config = ["preset=tiny", f"grid={{datasets: [embedded], autoencoders: [{ae}], diffusions: []}}",
              f"autoencoder={{train: {{steps: {steps}, checkpoint_every: 1000, log_every: 5}}}}",
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
    assert re.search(rf"resumed from \S+step-0*{saved[0]} \(generator step {saved[0]},", text), text[-3000:]
    prov = json.loads((repo / target / "provenance.json").read_text())
    assert prov["scheduler"]["slurm_job_id"] == jobs[1]["JobId"]
    assert prov["environment"]["container"]["image"] == str(repo / "containers" / "specmatch.sif")
    out = json.loads((repo / target / "autoencoder.json").read_text())
    assert out["world_size"] == 2 and out["generator_steps"] == steps, out
    # Both attempts ran in the container call, on their job's two GPUs, under torchrun.
    calls = [json.loads(line) for line in (repo / "apptainer-calls.jsonl").read_text().splitlines()]
    ae_calls = [c for c in calls if c["argv"][0] == "exec" and "train-ae" in c["argv"][-1]]
    assert [c["env"]["SLURM_JOB_ID"] for c in ae_calls] == [j["JobId"] for j in jobs]
    for c in ae_calls:
        assert "--nv" in c["argv"] and c["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert "torchrun --standalone --nproc-per-node=2 --no-python specmatch train-ae" in c["argv"][-1]


def _planned_rules(repo: Path) -> collections.Counter:
    """Jobs per rule of the whole tiny DAG (a forced dry run's job stats), the rules without a
    command (`all`, the `*_phase` targets) left out: Snakemake does not submit those."""
    out = _dry_run_shell(repo, "preset=tiny")
    stats = out[out.index("Job stats:"):].splitlines()[3:]
    counts = collections.Counter()
    for line in stats:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        if parts[0] != "all" and not parts[0].endswith("_phase"):
            counts[parts[0]] = int(parts[1])
    return counts


def test_tiny_dag_ran_as_slurm_jobs_in_the_container(tiny_run, slurm_cluster):
    """Every rule of the tiny DAG ran as its own SLURM job, with the GPUs its resources ask for,
    its stage inside the container call (`apptainer exec --nv ... --bind <results> IMAGE`), and
    the job id and image (with its sha256) in the provenance of every output."""
    assert (tiny_run / ".executor").read_text().strip() == "slurm"
    from specmatch import config as cfg

    params = cfg.resolve(cfg.load_yaml(tiny_run / "params.yaml"), presets_dir=tiny_run / "presets",
                         overrides={"preset": "tiny"})
    res = params["resources"]
    gpus = {rule: {**res["default"], **res["rules"].get(rule, {})}["gpus"] for rule in _planned_rules(tiny_run)}

    jobs = {j["JobId"]: j for j in slurm_cluster.jobs() if j.get("WorkDir") == str(tiny_run)}
    rule_of = {i: re.match(r"rule_(.+?)(_wildcards_.*)?$", j["Comment"]).group(1) for i, j in jobs.items()}
    assert collections.Counter(rule_of.values()) == _planned_rules(tiny_run)
    assert any(gpus.values()) and not all(gpus.values())
    for i, j in jobs.items():
        assert j["JobState"] == "COMPLETED", j
        want = f"gres:gpu:{gpus[rule_of[i]]}" if gpus[rule_of[i]] else None
        assert j.get("TresPerJob", "").replace("(null)", "") == (want or ""), (rule_of[i], j.get("TresPerJob"))

    calls = [json.loads(line) for line in (tiny_run / "apptainer-calls.jsonl").read_text().splitlines()]
    execs = [c for c in calls if c["argv"][0] == "exec" or "exec" in c["argv"][:3]]
    by_job = collections.defaultdict(list)
    for c in execs:
        by_job[c["env"].get("SLURM_JOB_ID")].append(c)
    assert sorted(by_job) == sorted(jobs), "every job, and only jobs, called the container once"
    image = tiny_run / "containers" / "specmatch.sif"
    for i, (c,) in by_job.items():
        argv = c["argv"]
        assert "--nv" in argv and any(Path(c["cwd"], a).resolve() == image.resolve() for a in argv), argv
        binds = ",".join(argv[k + 1] for k, a in enumerate(argv) if a == "--bind")
        assert str(tiny_run / "results") in binds.split(",") and str(tiny_run / "resources") in binds.split(","), binds
        assert ("CUDA_VISIBLE_DEVICES" in c["env"]) == bool(gpus[rule_of[i]]), (rule_of[i], c["env"])

    sha = (tiny_run / "containers" / "specmatch.sif.sha256").read_text().split()[0]
    recorded = set()
    for r in (tiny_run / "results" / "tiny").glob("**/provenance.json"):
        if "runs" in r.relative_to(tiny_run).parts:
            continue  # trainers' working folders
        prov = json.loads(r.read_text())
        recorded.add(prov["scheduler"]["slurm_job_id"])
        container = prov["environment"]["container"]
        assert Path(container["image"]).resolve() == image.resolve() and container["sha256"] == sha, (r, container)
    assert recorded == set(jobs), "every job recorded its SLURM job id; every record is of a job"
