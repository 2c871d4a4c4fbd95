# Data phase: prepared datasets (uint8 shards + manifest) and their spectra.


rule prepare_data:
    output:
        directory(PATHS.data("{dataset}")),
    params:
        p=lambda w: as_json(config["datasets"][w.dataset]),
    log:
        PATHS.log("prepare_data", "{dataset}"),
    threads: job_threads("prepare_data")
    resources:
        **job_resources("prepare_data"),
    shell:
        "specmatch prepare-data --name {wildcards.dataset} --params {params.p:q} --out {output} > {log} 2>&1"


rule data_spectra:
    input:
        PATHS.data("{dataset}"),
    output:
        directory(PATHS.spectra("{dataset}")),
    params:
        p=as_json(config["spectra"]),
        grids=lambda w: " ".join(str(g) for g in config["datasets"][w.dataset]["latent_grids"]),
    log:
        PATHS.log("data_spectra", "{dataset}"),
    threads: job_threads("data_spectra")
    resources:
        **job_resources("data_spectra"),
    shell:
        "specmatch data-spectra --dataset {input} --name {wildcards.dataset} --grids {params.grids}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule data_phase:
    input:
        [PATHS.data(d) for d in GRID.datasets],
        [PATHS.spectra(d) for d in GRID.datasets],
