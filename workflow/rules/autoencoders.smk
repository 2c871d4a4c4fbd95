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
        directory(f"{RESULTS}/autoencoders/{{ae}}"),
    wildcard_constraints:
        ae=names_regex(TRAINED_AES),
    params:
        launch=launch("train_ae"),
        p=ae_json("train", "loss", "disc"),
        runs_root=ae_runs_root,
    log:
        f"{RESULTS}/logs/train_ae/{{ae}}.log",
    threads: job_threads("train_ae")
    resources:
        **job_resources("train_ae"),
    # Longest training first (more steps, higher priority), before the short jobs that become
    # ready meanwhile: on a few cores the autoencoder phase then ends when its longest run does.
    priority: lambda wildcards: 1 + AE_PARAMS[wildcards.ae]["train"]["steps"] // 100
    shell:
        "{params.launch} train-ae --dataset {input.data} --runs-root {params.runs_root} --resume auto"
        " --name {wildcards.ae} --params {params.p:q} --out {output} > {log} 2>&1"


rule import_ae:
    output:
        directory(f"{RESULTS}/autoencoders/{{ae}}"),
    wildcard_constraints:
        ae=names_regex(PRETRAINED_AES),
    params:
        p=ae_json(),
    log:
        f"{RESULTS}/logs/import_ae/{{ae}}.log",
    threads: job_threads("import_ae")
    resources:
        **job_resources("import_ae"),
    shell:
        "specmatch import-ae --name {wildcards.ae} --params {params.p:q} --out {output} > {log} 2>&1"


rule eval_ae:
    input:
        ae=f"{RESULTS}/autoencoders/{{ae}}",
        data=ae_dataset,
    output:
        directory(f"{RESULTS}/ae_eval/{{ae}}"),
    params:
        p=ae_json("eval"),
    log:
        f"{RESULTS}/logs/eval_ae/{{ae}}.log",
    threads: job_threads("eval_ae")
    resources:
        **job_resources("eval_ae"),
    shell:
        "specmatch eval-ae --autoencoder {input.ae} --dataset {input.data} --name {wildcards.ae}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule extract_latents:
    input:
        ae=f"{RESULTS}/autoencoders/{{ae}}",
        data=ae_dataset,
    output:
        directory(f"{RESULTS}/latents/{{ae}}"),
    params:
        launch=launch("extract_latents"),
        p=ae_json("latents"),
    log:
        f"{RESULTS}/logs/extract_latents/{{ae}}.log",
    threads: job_threads("extract_latents")
    resources:
        **job_resources("extract_latents"),
    shell:
        "{params.launch} extract-latents --autoencoder {input.ae} --dataset {input.data} --name {wildcards.ae}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule autoencoder_phase:
    input:
        expand(f"{RESULTS}/ae_eval/{{ae}}", ae=AE_RUNS),
        expand(f"{RESULTS}/latents/{{ae}}", ae=AE_RUNS),
