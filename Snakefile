# The specmatch DAG. Parameters: params.yaml (the paper grid) with the overlay
# presets/<preset>.yaml, validated against workflow/schemas/params.schema.yaml.
#   snakemake                        # paper grid (profiles/default is picked up automatically)
#   snakemake --config preset=tiny   # the embedded default (what `make demo` runs)
import os
import signal
import sys

from snakemake.utils import min_version, validate

import specmatch.ops.layered_env

min_version("9.0")

# Every rule calls `specmatch` by name: the one installed beside this Snakemake (this clone's
# .venv/bin when run as .venv/bin/snakemake), not whichever comes first on PATH, which may be
# another clone's environment. Inside the container the image's own comes first again.
specmatch.ops.layered_env.put_first_on_path(sys.executable)

# Inside a SLURM job, SIGUSR1 is SLURM's warning before the time limit, sent to every process
# of the job step: it is meant for the trainers (which checkpoint and stop), and this Snakemake
# process (the step's task, whose death would end the step) and the rule's shell it starts
# must survive it. Its default action kills; ignored, it stays ignored in the children, and the
# stages install their own handler (docs/cluster.md).
if "SLURM_JOB_ID" in os.environ:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
# The ignored disposition does not survive a container runtime: Apptainer's starter catches
# every signal and its payload (the rule's shell) starts with the default actions. So every
# rule's command ignores SIGUSR1 itself, inside the container, before it starts torchrun or
# the stage ("set -euo pipefail" is Snakemake's own default prefix).
shell.prefix("set -euo pipefail; trap '' USR1; ")


configfile: "params.yaml"


include: "workflow/rules/common.smk"


# Every rule runs in this image when Snakemake is asked to use Apptainer.
container: config["container"]["image"]


include: "workflow/rules/data.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/autoencoders.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/alignment.smk"
include: "workflow/rules/report.smk"


_unknown = REQUESTS.unknown_rules({r.name for r in workflow.rules})
if _unknown:
    raise ValueError(f"resources.rules names unknown rules {_unknown}; rules: {sorted(r.name for r in workflow.rules)}")


rule all:
    default_target: True
    input:
        rules.data_phase.input,
        rules.evaluation_phase.input,
        rules.autoencoder_phase.input,
        rules.diffusion_phase.input,
        rules.alignment_phase.input,
        rules.report.output,
