# The specmatch DAG. Parameters: params.yaml (the paper grid) with the overlay
# presets/<preset>.yaml, validated against workflow/schemas/params.schema.yaml.
#   snakemake                        # paper grid (profiles/default is picked up automatically)
#   snakemake --config preset=tiny   # the embedded default (what `make demo` runs)
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"


# Every rule runs in this image when Snakemake is asked to use Apptainer.
container: config["container"]["image"]


include: "workflow/rules/data.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/autoencoders.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/alignment.smk"


rule all:
    default_target: True
    input:
        rules.data_phase.input,
        rules.evaluation_phase.input,
        rules.autoencoder_phase.input,
        rules.diffusion_phase.input,
        rules.alignment_phase.input,
