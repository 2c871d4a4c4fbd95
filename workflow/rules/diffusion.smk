# Diffusion phase (docs/method.md §6): train each diffusion run of grid.diffusions on its autoencoder's
# latent cache, sample it with every sampler it lists, score the samples against the dataset's
# reference statistics, and collect the scores in one table with their protocol.
# Trainer and sampler keep their working folders (checkpoints, finished shards) under
# results/<preset>/runs/, outside the rule outputs, keyed by the fingerprint of their inputs and
# parameters: an interrupted job resumes, a changed input starts afresh.


rule train_diffusion:
    input:
        latents=diff_latents,
        align=diff_align_input,
    output:
        directory(PATHS.diffusion("{diff}")),
    params:
        launch=launch("train_diffusion"),
        p=diff_json,
        runs_root=lambda wildcards: PATHS.runs("diffusion", wildcards.diff),
        align=diff_align_args,
    log:
        PATHS.log("train_diffusion", "{diff}"),
    threads: job_threads("train_diffusion")
    resources:
        **job_resources("train_diffusion"),
    shell:
        "{params.launch} train-diffusion --latents {input.latents} {params.align} --runs-root {params.runs_root}"
        " --resume auto --name {wildcards.diff} --params {params.p:q} --out {output} > {log} 2>&1"


rule sample:
    input:
        model=PATHS.diffusion("{diff}"),
        ae=diff_ae,
    output:
        directory(PATHS.samples("{diff}", "{sampler}")),
    params:
        launch=launch("sample"),
        p=sampler_json,
        work_root=lambda wildcards: PATHS.runs("samples", wildcards.diff, wildcards.sampler),
    log:
        PATHS.log("sample", "{diff}", "{sampler}"),
    threads: job_threads("sample")
    resources:
        **job_resources("sample"),
    shell:
        "{params.launch} sample --model {input.model} --autoencoder {input.ae} --work-root {params.work_root}"
        " --name {wildcards.diff}-{wildcards.sampler} --params {params.p:q} --out {output} > {log} 2>&1"


rule generation_metrics:
    input:
        samples=PATHS.samples("{diff}", "{sampler}"),
        ref=diff_ref,
    output:
        directory(PATHS.gen_metrics("{diff}", "{sampler}")),
    params:
        p=as_json(config["metrics"]),
    log:
        PATHS.log("generation_metrics", "{diff}", "{sampler}"),
    threads: job_threads("generation_metrics")
    resources:
        **job_resources("generation_metrics"),
    shell:
        "specmatch fid calc --samples {input.samples} --split samples --ref {input.ref}"
        " --name {wildcards.diff}-{wildcards.sampler} --params {params.p:q} --out {output} > {log} 2>&1"


rule generation_table:
    input:
        [PATHS.gen_metrics(d, s) for d, s in GRID.samples],
    output:
        directory(PATHS.table("generation")),
    log:
        PATHS.log("generation_table"),
    threads: job_threads("generation_table")
    resources:
        **job_resources("generation_table"),
    shell:
        "specmatch report generation --metrics {input} --name generation --out {output} > {log} 2>&1"


rule diffusion_phase:
    input:
        rules.generation_table.output if GRID.samples else [],
