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
        directory(f"{RESULTS}/diffusion/{{diff}}"),
    params:
        launch=launch("train_diffusion"),
        p=diff_json,
        runs_root=lambda wildcards: f"{RESULTS}/runs/diffusion/{wildcards.diff}",
        align=diff_align_args,
    log:
        f"{RESULTS}/logs/train_diffusion/{{diff}}.log",
    threads: job_threads("train_diffusion")
    resources:
        **job_resources("train_diffusion"),
    shell:
        "{params.launch} train-diffusion --latents {input.latents} {params.align} --runs-root {params.runs_root}"
        " --resume auto --name {wildcards.diff} --params {params.p:q} --out {output} > {log} 2>&1"


rule sample:
    input:
        model=f"{RESULTS}/diffusion/{{diff}}",
        ae=diff_ae,
    output:
        directory(f"{RESULTS}/samples/{{diff}}/{{sampler}}"),
    params:
        launch=launch("sample"),
        p=sampler_json,
        work_root=lambda wildcards: f"{RESULTS}/runs/samples/{wildcards.diff}/{wildcards.sampler}",
    log:
        f"{RESULTS}/logs/sample/{{diff}}/{{sampler}}.log",
    threads: job_threads("sample")
    resources:
        **job_resources("sample"),
    shell:
        "{params.launch} sample --model {input.model} --autoencoder {input.ae} --work-root {params.work_root}"
        " --name {wildcards.diff}-{wildcards.sampler} --params {params.p:q} --out {output} > {log} 2>&1"


rule generation_metrics:
    input:
        samples=f"{RESULTS}/samples/{{diff}}/{{sampler}}",
        ref=diff_ref,
    output:
        directory(f"{RESULTS}/gen_metrics/{{diff}}/{{sampler}}"),
    params:
        p=as_json(config["metrics"]),
    log:
        f"{RESULTS}/logs/generation_metrics/{{diff}}/{{sampler}}.log",
    threads: job_threads("generation_metrics")
    resources:
        **job_resources("generation_metrics"),
    shell:
        "specmatch fid calc --samples {input.samples} --split samples --ref {input.ref}"
        " --name {wildcards.diff}-{wildcards.sampler} --params {params.p:q} --out {output} > {log} 2>&1"


rule generation_table:
    input:
        [f"{RESULTS}/gen_metrics/{d}/{s}" for d, s in DIFF_SAMPLES],
    output:
        directory(f"{RESULTS}/tables/generation"),
    log:
        f"{RESULTS}/logs/generation_table.log",
    threads: job_threads("generation_table")
    resources:
        **job_resources("generation_table"),
    shell:
        "specmatch report generation --metrics {input} --name generation --out {output} > {log} 2>&1"


rule diffusion_phase:
    input:
        rules.generation_table.output if DIFF_SAMPLES else [],
