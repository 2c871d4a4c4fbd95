# Data phase: prepared datasets (uint8 shards + manifest) and their spectra.


rule prepare_data:
    output:
        directory(f"{RESULTS}/data/{{dataset}}"),
    params:
        p=lambda w: as_json(config["datasets"][w.dataset]),
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    threads: job_threads("prepare_data")
    resources:
        **job_resources("prepare_data"),
    shell:
        "specmatch prepare-data --name {wildcards.dataset} --params {params.p:q} --out {output} > {log} 2>&1"


rule data_spectra:
    input:
        f"{RESULTS}/data/{{dataset}}",
    output:
        directory(f"{RESULTS}/spectra/{{dataset}}"),
    params:
        p=as_json(config["spectra"]),
        grids=lambda w: " ".join(str(g) for g in config["datasets"][w.dataset]["latent_grids"]),
    log:
        f"{RESULTS}/logs/data_spectra/{{dataset}}.log",
    threads: job_threads("data_spectra")
    resources:
        **job_resources("data_spectra"),
    shell:
        "specmatch data-spectra --dataset {input} --name {wildcards.dataset} --grids {params.grids}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule data_phase:
    input:
        expand(f"{RESULTS}/data/{{dataset}}", dataset=DATASETS),
        expand(f"{RESULTS}/spectra/{{dataset}}", dataset=DATASETS),
