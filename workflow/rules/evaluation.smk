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
        PATHS.data("{dataset}"),
    output:
        directory(PATHS.fid_ref("{dataset}")),
    params:
        p=as_json(config["metrics"]),
    log:
        PATHS.log("fid_ref", "{dataset}"),
    threads: job_threads("fid_ref")
    resources:
        **job_resources("fid_ref"),
    shell:
        "specmatch fid ref --dataset {input} --name {wildcards.dataset} --params {params.p:q}"
        " --out {output} > {log} 2>&1"


rule fid_real_floor:
    input:
        data=PATHS.data("{dataset}"),
        ref=PATHS.fid_ref("{dataset}"),
    output:
        directory(PATHS.fid_floor("{dataset}")),
    params:
        p=as_json(config["metrics"]),
    log:
        PATHS.log("fid_real_floor", "{dataset}"),
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
        data=PATHS.data("{dataset}"),
        ref=PATHS.fid_ref("{dataset}"),
    output:
        directory(PATHS.fid_floor("{dataset}", "{n}")),
    params:
        p=as_json(config["metrics"]),
    log:
        PATHS.log("fid_real_floor", "{dataset}-n{n}"),
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
        PATHS.samples("{diff}", "{sampler}"),
    output:
        directory(PATHS.adm_samples("{diff}", "{sampler}")),
    log:
        PATHS.log("export_adm", "{diff}", "{sampler}"),
    threads: job_threads("export_adm")
    resources:
        **job_resources("export_adm"),
    shell:
        "specmatch export-adm --samples {input} --name {wildcards.diff}-{wildcards.sampler} --out {output}"
        " > {log} 2>&1"


# The phase (DVC stage `evaluation`) owns every real floor, the report's per-sample-count ones
# included (the grid's report.floors).
rule evaluation_phase:
    input:
        [PATHS.fid_ref(d) for d in GRID.datasets],
        [PATHS.fid_floor(d) for d in GRID.datasets],
        [PATHS.fid_floor(d, n) for d, n in GRID.report.floors],
