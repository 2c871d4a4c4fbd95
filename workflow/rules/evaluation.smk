# Evaluation phase: reference feature statistics of each dataset, and the real-data floor of
# the Fréchet distance (held-out real images against the reference: the distance a perfect
# generator would get at that sample count). Sample metrics of the generative stages use the
# same `specmatch fid calc` against these references.


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


rule evaluation_phase:
    input:
        expand(f"{RESULTS}/fid_ref/{{dataset}}", dataset=DATASETS),
        expand(f"{RESULTS}/fid_floor/{{dataset}}", dataset=DATASETS),
