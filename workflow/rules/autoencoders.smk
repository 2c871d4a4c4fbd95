# Autoencoder phase (docs/method.md §5): train each autoencoder run of grid.autoencoders whose dataset is
# in grid.datasets (or, for an entry with `pretrained`, import the released files the user put in
# resources/: the public SD-VAE, docs/autoencoders.md), evaluate it on the held-out split, and
# cache its latents for diffusion.
# A run's working folder (checkpoints, live log) is keyed by the fingerprint of its parameters
# and its data and lives outside the rule's outputs: Snakemake deletes the outputs of a failed or
# interrupted job, never its checkpoints, and a re-run with the same parameters resumes.

rule train_ae:
    input:
        data=ae_dataset,
    output:
        directory(PATHS.autoencoder("{ae}")),
    wildcard_constraints:
        ae=names_regex(GRID.trained_autoencoders),
    params:
        launch=launch("train_ae"),
        p=ae_json("train", "loss", "disc"),
        runs_root=lambda wildcards: PATHS.runs("autoencoders", wildcards.ae),
    log:
        PATHS.log("train_ae", "{ae}"),
    threads: job_threads("train_ae")
    resources:
        **job_resources("train_ae"),
    # Longest training first (more steps, higher priority), before the short jobs that become
    # ready meanwhile: on a few cores the autoencoder phase then ends when its longest run does.
    priority: lambda wildcards: 1 + GRID.autoencoders[wildcards.ae]["train"]["steps"] // 100
    shell:
        "{params.launch} train-ae --dataset {input.data} --runs-root {params.runs_root} --resume auto"
        " --name {wildcards.ae} --params {params.p:q} --out {output} > {log} 2>&1"


rule import_ae:
    output:
        directory(PATHS.autoencoder("{ae}")),
    wildcard_constraints:
        ae=names_regex(GRID.pretrained_autoencoders),
    params:
        p=ae_json(),
    log:
        PATHS.log("import_ae", "{ae}"),
    threads: job_threads("import_ae")
    resources:
        **job_resources("import_ae"),
    shell:
        "specmatch import-ae --name {wildcards.ae} --params {params.p:q} --out {output} > {log} 2>&1"


rule eval_ae:
    input:
        ae=PATHS.autoencoder("{ae}"),
        data=ae_dataset,
    output:
        directory(PATHS.ae_eval("{ae}")),
    params:
        p=ae_json("eval"),
    log:
        PATHS.log("eval_ae", "{ae}"),
    threads: job_threads("eval_ae")
    resources:
        **job_resources("eval_ae"),
    shell:
        "specmatch eval-ae --autoencoder {input.ae} --dataset {input.data} --name {wildcards.ae}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule extract_latents:
    input:
        ae=PATHS.autoencoder("{ae}"),
        data=ae_dataset,
    output:
        directory(PATHS.latents("{ae}")),
    params:
        launch=launch("extract_latents"),
        p=ae_json("latents"),
    log:
        PATHS.log("extract_latents", "{ae}"),
    threads: job_threads("extract_latents")
    resources:
        **job_resources("extract_latents"),
    shell:
        "{params.launch} extract-latents --autoencoder {input.ae} --dataset {input.data} --name {wildcards.ae}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule autoencoder_phase:
    input:
        [PATHS.ae_eval(a) for a in GRID.autoencoders],
        [PATHS.latents(a) for a in GRID.autoencoders],
