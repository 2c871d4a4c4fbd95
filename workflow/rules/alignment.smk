# Alignment phase (docs/method.md §7): the target encoder's token grids of every training image, computed
# once per (dataset, encoder, input size) that an aligned diffusion run of the grid uses
# (train_diffusion reads them), and their spectral diagnostics (RMSC^2 and spectrum
# distribution of the repa, irepa and dog targets) in one table and figure.


rule extract_targets:
    input:
        f"{RESULTS}/data/{{dataset}}",
    output:
        directory(f"{RESULTS}/targets/{{dataset}}/{{encoder}}-{{size}}"),
    params:
        launch=launch("extract_targets"),
        p=lambda w: as_json({**config["targets"], "encoder": w.encoder, "image_size": int(w.size)}),
    log:
        f"{RESULTS}/logs/extract_targets/{{dataset}}/{{encoder}}-{{size}}.log",
    threads: job_threads("extract_targets")
    resources:
        **job_resources("extract_targets"),
    shell:
        "{params.launch} extract-targets --dataset {input} --name {wildcards.dataset}-{wildcards.encoder}-{wildcards.size}"
        " --params {params.p:q} --out {output} > {log} 2>&1"


rule target_spectra:
    input:
        TARGET_CACHES,
    output:
        directory(f"{RESULTS}/tables/target_spectra"),
    params:
        p=target_spectra_json(),
    log:
        f"{RESULTS}/logs/target_spectra.log",
    threads: job_threads("target_spectra")
    resources:
        **job_resources("target_spectra"),
    shell:
        "specmatch target-spectra --targets {input} --name target-spectra --params {params.p:q} --out {output}"
        " > {log} 2>&1"


rule alignment_phase:
    input:
        rules.target_spectra.output if TARGET_CACHES else [],
