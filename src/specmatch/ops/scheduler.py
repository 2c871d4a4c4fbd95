"""What each rule asks of the scheduler (params `resources`, docs/cluster.md), translated for
Snakemake's SLURM executor: `threads`, the `resources` mapping and the command that starts a
stage (`launch`). The rule files call these; run selection is the grid's (`grid.py`), not this.

The resource names are the SLURM executor plugin's (gpu, cpus_per_gpu, mem_mb, runtime, nodes,
tasks, cpus_per_task, mpi, slurm_extra); locally only `threads` limits what runs side by side.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import SpecmatchError

# The stages that shard their work over torch.distributed ranks: only these may ask for more
# than one GPU or node (any other stage would run as many identical copies).
DISTRIBUTED_RULES = frozenset({"train_ae", "extract_latents", "extract_targets", "train_diffusion", "sample"})


class Requests:
    """The `resources` parameters: `default` with each rule's override under `rules`."""

    def __init__(self, resources: Mapping[str, Any]):
        self.default = dict(resources["default"])
        self.rules = dict(resources.get("rules") or {})

    def unknown_rules(self, rules: set[str]) -> list[str]:
        """Names under `resources.rules` that are not rules of the workflow."""
        return sorted(set(self.rules) - set(rules))

    def request(self, rule: str) -> dict[str, Any]:
        r = {**self.default, **self.rules.get(rule, {})}
        if (r["gpus"] > 1 or r["nodes"] > 1) and rule not in DISTRIBUTED_RULES:
            raise SpecmatchError(f"resources.rules.{rule}: {r['gpus']} GPUs on {r['nodes']} node(s), but its stage "
                                 f"runs in one process; only {sorted(DISTRIBUTED_RULES)} can use several GPUs or nodes")
        return r

    def threads(self, rule: str) -> int:
        r = self.request(rule)
        return r["gpus"] * r["nodes"] * r["cpus_per_gpu"] if r["gpus"] else r["cpus"]

    def resources(self, rule: str) -> dict[str, Any]:
        r = self.request(rule)
        res: dict[str, Any] = {"mem_mb": r["mem_mb"], "runtime": r["runtime"], "nodes": r["nodes"]}
        # SLURM's warning before the time limit: the trainers checkpoint and stop on SIGUSR1, and
        # the profile's `retries` resubmits them (they resume from that checkpoint).
        extra = [f"--signal=USR1@{r['signal_seconds']}"] if r["signal_seconds"] else []
        if r["gpus"] and r["nodes"] == 1:
            res.update(gpu=r["gpus"], cpus_per_gpu=r["cpus_per_gpu"])
        elif r["gpus"]:
            # One task per node (a torchrun of `gpus` processes, started by srun in the rule's own
            # command: `mpi` keeps the job-step executor from wrapping it in `srun -n1`).
            res.update(mpi="srun", tasks=r["nodes"], cpus_per_task=r["gpus"] * r["cpus_per_gpu"])
            extra.append(f"--gpus-per-node={r['gpus']}")
        else:
            res.update(cpus_per_task=r["cpus"])
        if extra:
            res["slurm_extra"] = " ".join(extra)
        return res

    def launch(self, rule: str) -> str:
        """How a stage starts: `specmatch` on one GPU or none; torchrun with one process per GPU of
        the allocation; on several nodes, srun starts one torchrun per node (c10d rendezvous on the
        first node of the job). Trainers and extractors shard their work over the ranks. Snakemake
        sets the thread variables to the job's `threads` (all CPUs of the node's share), and
        torchrun keeps values it finds: each rank is given its own share, `cpus_per_gpu`, instead."""
        r = self.request(rule)
        per_rank = " ".join(f"{v}={r['cpus_per_gpu']}" for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                   "OPENBLAS_NUM_THREADS"))
        if r["nodes"] > 1 and r["gpus"]:
            head = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
            return (f"{per_rank} srun --nodes={r['nodes']} --ntasks-per-node=1 --kill-on-bad-exit=1"
                    f" torchrun --nnodes={r['nodes']} --nproc-per-node={r['gpus']} --rdzv-backend=c10d"
                    f" --rdzv-endpoint={head}:29500 --rdzv-id=\"$SLURM_JOB_ID\" --no-python specmatch")
        if r["gpus"] > 1:
            return f"{per_rank} torchrun --standalone --nproc-per-node={r['gpus']} --no-python specmatch"
        return "specmatch"
