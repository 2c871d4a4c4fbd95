# Evaluation phase: reference feature statistics of each dataset, and the real-data floor of
# the Fréchet distance (held-out real images against the reference: the distance a perfect
# generator would get at that sample count). Sample metrics of the generative stages use the
# same `specmatch fid calc` against these references. Each dataset's protocol and reference are
# `metrics` with its `metrics.datasets.<dataset>` override, which the stages apply themselves
# (docs/metrics.md): a dataset whose override names an ADM reference batch (ImageNet:
# adm-imagenet256, looked for in resources/ like the pretrained weights) takes its reference
# statistics from that file instead of its images.


rule fid_ref:
    input:
        f"{RESULTS}/data/{{dataset}}",
    output:
        directory(f"{RESULTS}/fid_ref/{{dataset}}"),
    params:
        p=as_json(config["metrics"]),
    log:
        f"{RESULTS}/logs/fid_ref/{{dataset}}.log",
    threads: job_threads("fid_ref")
    resources:
        **job_resources("fid_ref"),
    shell:
        "specmatch fid ref --dataset {input} --name {wildcards.dataset} --params {params.p:q}"
        " --out {output} > {log} 2>&1"


rule fid_real_floor:
    input:
        data=f"{RESULTS}/data/{{dataset}}",
        ref=f"{RESULTS}/fid_ref/{{dataset}}",
    output:
        directory(f"{RESULTS}/fid_floor/{{dataset}}"),
    params:
        p=as_json(config["metrics"]),
    log:
        f"{RESULTS}/logs/fid_real_floor/{{dataset}}.log",
    threads: job_threads("fid_real_floor")
    resources:
        **job_resources("fid_real_floor"),
    shell:
        "specmatch fid calc --samples {input.data} --split test --ref {input.ref}"
        " --name {wildcards.dataset}-real-floor --params {params.p:q} --out {output} > {log} 2>&1"


# The same floor at a given sample count N (a seeded subset of N held-out images): the report
# sets each generation number of N samples beside it (report.baselines.real_floor).
rule fid_real_floor_n:
    input:
        data=f"{RESULTS}/data/{{dataset}}",
        ref=f"{RESULTS}/fid_ref/{{dataset}}",
    output:
        directory(f"{RESULTS}/fid_floor/{{dataset}}-n{{n}}"),
    params:
        p=as_json(config["metrics"]),
    log:
        f"{RESULTS}/logs/fid_real_floor/{{dataset}}-n{{n}}.log",
    threads: job_threads("fid_real_floor_n")
    resources:
        **job_resources("fid_real_floor_n"),
    shell:
        "specmatch fid calc --samples {input.data} --split test --ref {input.ref} --n-images {wildcards.n}"
        " --name {wildcards.dataset}-real-floor-n{wildcards.n} --params {params.p:q} --out {output} > {log} 2>&1"


# On request (not part of `all`): a sample set in ADM's npz layout, for the official evaluator
# (docs/metrics.md): snakemake results/<preset>/adm_samples/<diffusion>/<sampler>
rule export_adm:
    input:
        f"{RESULTS}/samples/{{diff}}/{{sampler}}",
    output:
        directory(f"{RESULTS}/adm_samples/{{diff}}/{{sampler}}"),
    log:
        f"{RESULTS}/logs/export_adm/{{diff}}/{{sampler}}.log",
    threads: job_threads("export_adm")
    resources:
        **job_resources("export_adm"),
    shell:
        "specmatch export-adm --samples {input} --name {wildcards.diff}-{wildcards.sampler} --out {output}"
        " > {log} 2>&1"


# The phase (DVC stage `evaluation`) owns every real floor, the report's per-sample-count ones
# included (REPORT_FLOORS, set in report.smk; an input function reads it once all rules are in).
rule evaluation_phase:
    input:
        expand(f"{RESULTS}/fid_ref/{{dataset}}", dataset=DATASETS),
        expand(f"{RESULTS}/fid_floor/{{dataset}}", dataset=DATASETS),
        lambda wildcards: REPORT_FLOORS,
