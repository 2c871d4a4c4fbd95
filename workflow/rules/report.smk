# Report phase (docs/method.md §9; docs/report.md): the generation metric over training of the runs listed
# in report.progress (fid_progress: their EMA snapshots, train.snapshot_steps, sampled with the
# run's first sampler), then the DAG's final rule, `report`: the paper's tables (E1-E4), figures
# and one page, results/<preset>/report/index.md (and index.html, the same page for a browser), from every
# output it reads.
# report.experiments names the runs of each experiment; a name outside the grid is an error
# (specmatch.grid, when the workflow is parsed).

REPORT = config["report"]
# What the report reads (the grid's `report`: experiments, untrained twins, real floors, ...).
READS = GRID.report


rule fid_progress:
    input:
        model=PATHS.diffusion("{diff}"),
        ae=diff_ae,
        ref=diff_ref,
    output:
        directory(PATHS.progress("{diff}")),
    params:
        launch=launch("fid_progress"),
        p=lambda wildcards: as_json({
            "sampler": GRID.samplers[GRID.diffusions[wildcards.diff]["samplers"][0]],
            "metrics": config["metrics"],
            "n_samples": REPORT["progress"]["n_samples"],
        }),
    log:
        PATHS.log("fid_progress", "{diff}"),
    threads: job_threads("fid_progress")
    resources:
        **job_resources("fid_progress"),
    shell:
        "{params.launch} fid-progress --model {input.model} --autoencoder {input.ae} --ref {input.ref}"
        " --name {wildcards.diff} --params {params.p:q} --out {output} > {log} 2>&1"


rule band_error:
    input:
        model=PATHS.diffusion("{diff}"),
        ae=diff_ae,
        data=lambda wildcards: PATHS.data(GRID.dataset_of(wildcards.diff)),
    output:
        directory(PATHS.band_error("{diff}")),
    params:
        launch=launch("band_error"),
        p=as_json(REPORT["progress"]["band_error"]),
    log:
        PATHS.log("band_error", "{diff}"),
    threads: job_threads("band_error")
    resources:
        **job_resources("band_error"),
    shell:
        "{params.launch} band-error --model {input.model} --autoencoder {input.ae} --dataset {input.data}"
        " --name {wildcards.diff} --params {params.p:q} --out {output} > {log} 2>&1"


rule report:
    input:
        spectra=[PATHS.spectra(d) for d in READS.datasets],
        ae_eval=[PATHS.ae_eval(a) for a in READS.autoencoders],
        diffusion=[PATHS.diffusion(d) for d in READS.diffusions],
        gen=[PATHS.gen_metrics(d, s) for d, s in READS.samples],
        samples=[PATHS.samples(d, s) for d, s in READS.samples],
        targets=rules.target_spectra.output if READS.target_spectra else [],
        progress=[PATHS.progress(d) for d in READS.progress],
        band_error=[PATHS.band_error(d) for d in READS.progress],
        floors=[PATHS.fid_floor(d, n) for d, n in READS.floors],
    output:
        directory(PATHS.report()),
    params:
        p=as_json(REPORT),
        name=config["preset"],
        targets=lambda wildcards, input: f"--target-spectra {input.targets}" if input.targets else "",
        floors=lambda wildcards, input: f"--floors {input.floors}" if input.floors else "",
    log:
        PATHS.log("report"),
    threads: job_threads("report")
    resources:
        **job_resources("report"),
    shell:
        "specmatch report paper --spectra {input.spectra} --ae-eval {input.ae_eval} --diffusion {input.diffusion}"
        " --gen-metrics {input.gen} --samples {input.samples} {params.targets} {params.floors} --progress {input.progress}"
        " --band-error {input.band_error}"
        " --name {params.name} --params {params.p:q} --out {output} > {log} 2>&1"
