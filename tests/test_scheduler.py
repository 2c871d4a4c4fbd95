"""What a rule asks of SLURM (`specmatch.ops.scheduler`), computed without Snakemake: the
executor plugin's resource names for one GPU, several GPUs, several nodes and CPU-only rules.
(tests/test_slurm.py checks the same through Snakemake's dry run and a real cluster.)"""

from __future__ import annotations

import pytest

from specmatch import config
from specmatch.errors import SpecmatchError
from specmatch.ops.scheduler import DISTRIBUTED_RULES, Requests

from conftest import REPO

DEFAULT = {"gpus": 0, "nodes": 1, "cpus": 2, "cpus_per_gpu": 4, "mem_mb": 1000, "runtime": 30, "signal_seconds": 0}


def test_cpu_gpu_and_multinode_requests_in_the_plugins_names():
    r = Requests({"default": DEFAULT, "rules": {
        "train_ae": {"gpus": 8, "cpus_per_gpu": 12, "signal_seconds": 600},
        "train_diffusion": {"gpus": 4, "nodes": 2, "cpus_per_gpu": 6},
        "sample": {"gpus": 1}}})
    assert r.resources("fid_ref") == {"mem_mb": 1000, "runtime": 30, "nodes": 1, "cpus_per_task": 2}
    assert r.threads("fid_ref") == 2
    assert r.resources("train_ae") == {"mem_mb": 1000, "runtime": 30, "nodes": 1, "gpu": 8, "cpus_per_gpu": 12,
                                       "slurm_extra": "--signal=USR1@600"}
    assert r.threads("train_ae") == 96
    # several nodes: one task per node (a torchrun each), the GPUs asked per node
    assert r.resources("train_diffusion") == {"mem_mb": 1000, "runtime": 30, "nodes": 2, "mpi": "srun", "tasks": 2,
                                              "cpus_per_task": 24, "slurm_extra": "--gpus-per-node=4"}
    assert r.threads("train_diffusion") == 48
    assert r.launch("sample") == "specmatch"
    assert r.launch("train_ae").endswith("torchrun --standalone --nproc-per-node=8 --no-python specmatch")
    assert r.launch("train_ae").startswith("OMP_NUM_THREADS=12 ")
    assert "srun --nodes=2 --ntasks-per-node=1" in r.launch("train_diffusion")
    assert "torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d" in r.launch("train_diffusion")


def test_a_one_process_stage_may_not_ask_for_several_gpus():
    r = Requests({"default": DEFAULT, "rules": {"eval_ae": {"gpus": 2}, "report": {"nodes": 2}}})
    for rule in ("eval_ae", "report"):
        with pytest.raises(SpecmatchError, match=f"resources.rules.{rule}: .* only .*train_ae"):
            r.request(rule)
    assert "eval_ae" not in DISTRIBUTED_RULES


def test_unknown_rule_names_are_reported():
    r = Requests({"default": DEFAULT, "rules": {"train_ea": {"gpus": 1}, "train_ae": {"gpus": 1}}})
    assert r.unknown_rules({"train_ae", "eval_ae"}) == ["train_ea"]


def test_the_paper_grid_requests_resolve_for_every_rule_it_names():
    resources = config.load(REPO / "params.yaml")["resources"]
    r = Requests(resources)
    for rule in resources["rules"]:
        assert r.threads(rule) >= 1 and r.resources(rule)["runtime"] > 0
