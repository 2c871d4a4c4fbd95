# Report phase (docs/method.md §9; docs/report.md): the generation metric over training of the runs listed
# in report.progress (fid_progress: their EMA snapshots, train.snapshot_steps, sampled with the
# run's first sampler), then the DAG's final rule, `report`: the paper's tables (E1-E4), figures
# and one page, results/<preset>/report/index.md, from every output it reads.
# report.experiments names the runs of each experiment; a name outside the grid is an error here.

REPORT = config["report"]
_PROGRESS = REPORT["progress"]["diffusions"]
# (experiment, kind) -> run names; null stands for every one of the grid.
_GRID = {"autoencoders": AE_RUNS, "diffusions": DIFF_RUNS, "datasets": DATASETS}
_EXP = {(e, k): list(_GRID[k] if v[k] is None else v[k]) for e, v in REPORT["experiments"].items() for k in _GRID}

_bad = {f"report.experiments.{e}.{k}": [n for n in names if n not in _GRID[k]] for (e, k), names in _EXP.items()}
_bad["report.progress.diffusions"] = [n for n in _PROGRESS if n not in DIFF_RUNS]
_bad = {k: v for k, v in _bad.items() if v}
if _bad:
    raise ValueError(f"runs not in the grid: {_bad} (grid autoencoders: {AE_RUNS}; diffusions: {DIFF_RUNS}; "
                     f"datasets: {DATASETS})")
_no_snapshots = [n for n in _PROGRESS if not DIFF_PARAMS[n]["train"]["snapshot_steps"]]
if _no_snapshots:
    raise ValueError(f"report.progress.diffusions names runs without train.snapshot_steps: {_no_snapshots}")

REPORT_AES = list(dict.fromkeys(_EXP["E1", "autoencoders"] + _EXP["E2", "autoencoders"] + _EXP["E4", "autoencoders"]))
REPORT_DIFFS = list(dict.fromkeys(_EXP["E1", "diffusions"] + _EXP["E2", "diffusions"] + _EXP["E3", "diffusions"]
                                  + _EXP["E3b", "diffusions"]))
# The untrained twins of the report's runs (report.baselines.untrained), read beside them.
REPORT_DIFFS += [b for b in dict.fromkeys(specmatch.config.untrained_baseline_of(config, d) for d in REPORT_DIFFS) if b]
REPORT_SAMPLES = [(d, s) for d, s in DIFF_SAMPLES if d in REPORT_DIFFS]
# The real floor at each (dataset, sample count) of those sample sets (report.baselines.real_floor).
REPORT_FLOORS = list(dict.fromkeys(
    f"{RESULTS}/fid_floor/{AE_PARAMS[DIFF_PARAMS[d]['autoencoder']]['dataset']}-n{SAMPLER_PARAMS[s]['n_samples']}"
    for d, s in REPORT_SAMPLES)) if REPORT["baselines"]["real_floor"] else []
# The images' spectra of E4's datasets and of every dataset an autoencoder of the report uses.
REPORT_DATASETS = list(dict.fromkeys(_EXP["E4", "datasets"] + [AE_PARAMS[a]["dataset"] for a in REPORT_AES]))
REPORT_TARGETS = any(d in ALIGNED_RUNS for d in _EXP["E3", "diffusions"] + _EXP["E3b", "diffusions"])


rule fid_progress:
    input:
        model=f"{RESULTS}/diffusion/{{diff}}",
        ae=diff_ae,
        ref=diff_ref,
    output:
        directory(f"{RESULTS}/progress/{{diff}}"),
    params:
        launch=launch("fid_progress"),
        p=lambda wildcards: as_json({
            "sampler": SAMPLER_PARAMS[DIFF_PARAMS[wildcards.diff]["samplers"][0]],
            "metrics": config["metrics"],
            "n_samples": REPORT["progress"]["n_samples"],
        }),
    log:
        f"{RESULTS}/logs/fid_progress/{{diff}}.log",
    threads: job_threads("fid_progress")
    resources:
        **job_resources("fid_progress"),
    shell:
        "{params.launch} fid-progress --model {input.model} --autoencoder {input.ae} --ref {input.ref}"
        " --name {wildcards.diff} --params {params.p:q} --out {output} > {log} 2>&1"


rule report:
    input:
        spectra=[f"{RESULTS}/spectra/{d}" for d in REPORT_DATASETS],
        ae_eval=[f"{RESULTS}/ae_eval/{a}" for a in REPORT_AES],
        diffusion=[f"{RESULTS}/diffusion/{d}" for d in REPORT_DIFFS],
        gen=[f"{RESULTS}/gen_metrics/{d}/{s}" for d, s in REPORT_SAMPLES],
        samples=[f"{RESULTS}/samples/{d}/{s}" for d, s in REPORT_SAMPLES],
        targets=rules.target_spectra.output if REPORT_TARGETS else [],
        progress=[f"{RESULTS}/progress/{d}" for d in _PROGRESS],
        floors=REPORT_FLOORS,
    output:
        directory(f"{RESULTS}/report"),
    params:
        p=as_json(REPORT),
        name=config["preset"],
        targets=lambda wildcards, input: f"--target-spectra {input.targets}" if input.targets else "",
        floors=lambda wildcards, input: f"--floors {input.floors}" if input.floors else "",
    log:
        f"{RESULTS}/logs/report.log",
    threads: job_threads("report")
    resources:
        **job_resources("report"),
    shell:
        "specmatch report paper --spectra {input.spectra} --ae-eval {input.ae_eval} --diffusion {input.diffusion}"
        " --gen-metrics {input.gen} --samples {input.samples} {params.targets} {params.floors} --progress {input.progress}"
        " --name {params.name} --params {params.p:q} --out {output} > {log} 2>&1"
