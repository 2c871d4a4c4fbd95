# Alignment phase (docs/method.md §7): the target encoder's token grids of every training image, computed
# once per (dataset, encoder, input size) that an aligned diffusion run of the grid uses
# (train_diffusion reads them), and their spectral diagnostics (RMSC^2 and spectrum
# distribution of the repa, irepa and dog targets) in one table and figure.


rule extract_targets:
    input:
        PATHS.data("{dataset}"),
    output:
        directory(PATHS.targets("{dataset}", "{encoder}", "{size}")),
    params:
        launch=launch("extract_targets"),
        p=lambda w: as_json({**config["targets"], "encoder": w.encoder, "image_size": int(w.size)}),
    log:
        PATHS.log("extract_targets", "{dataset}", "{encoder}-{size}"),
    threads: job_threads("extract_targets")
    resources:
        **job_resources("extract_targets"),
    shell:
        "{params.launch} extract-targets --dataset {input} --name {wildcards.dataset}-{wildcards.encoder}-{wildcards.size}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule target_spectra:
    input:
        [PATHS.targets(*c) for c in GRID.target_caches],
    output:
        directory(PATHS.table("target_spectra")),
    params:
        p=target_spectra_json(),
    log:
        PATHS.log("target_spectra"),
    threads: job_threads("target_spectra")
    resources:
        **job_resources("target_spectra"),
    shell:
        "specmatch target-spectra --targets {input} --name target-spectra --params {params.p:q} --out {output}"
        " > {log} 2>&1"


rule alignment_phase:
    input:
        rules.target_spectra.output if GRID.target_caches else [],
