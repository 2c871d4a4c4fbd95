"""End to end: the tiny DAG through Snakemake, `snakemake --lint`, and `dvc repro`, each in a
temporary copy of the repository (so the developer's results/ are never touched). The tiny DAG
runs once per session, locally as `make demo` runs it (the `tiny_run` fixture of conftest.py);
its submission through `--profile slurm` is tested on a few of its jobs in test_slurm.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_repo as _copy_repo
from conftest import dag_env as _env
from conftest import job_stats
from conftest import run_checked as _run

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow

# The tiny preset's autoencoder steps (presets/tiny.yaml).
STEPS = {"sdvae": 600, "esm": 600, "dsm": 900}


def test_tiny_dag_outputs(tiny_run):
    out = tiny_run / "results" / "tiny"
    data = out / "data" / "embedded"
    man = json.loads((data / "manifest.json").read_text())
    assert man["splits"]["train"]["count"] == 4096 and man["splits"]["test"]["count"] == 512
    with np.load(data / man["splits"]["test"]["shards"][0]["file"]) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (64, 64, 3)
    spectra = json.loads((out / "spectra" / "embedded" / "spectra.json").read_text())
    assert set(spectra["grids"]) == {"16", "8"}
    assert (out / "spectra" / "embedded" / "spectrum_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Provenance: the spectra record points at the dataset's record, and both hash their files.
    prov_d = json.loads((data / "provenance.json").read_text())
    prov_s = json.loads((out / "spectra" / "embedded" / "provenance.json").read_text())
    assert prov_d["stage"] == "prepare-data" and prov_s["stage"] == "data-spectra"
    (dep,) = [i for i in prov_s["inputs"] if i["role"] == "dataset"]
    import hashlib

    assert dep["provenance_sha256"] == hashlib.sha256((data / "provenance.json").read_bytes()).hexdigest()
    # Snakemake leaves a hidden .snakemake_timestamp in folder outputs; records skip hidden files.
    assert set(prov_d["outputs"]["files"]) == {p.name for p in data.iterdir() if not p.name.startswith(".")} - {"provenance.json"}
    assert prov_d["params"]["n_train"] == 4096  # the resolved preset values reached the stage
    assert (out / "logs" / "prepare_data" / "embedded.log").is_file()
    # Evaluation: reference statistics with the tiny preset's net, and the real-data floor,
    # named FD-EffNetLite0-128 (never "FID"), its record pointing at the reference it used.
    floor = json.loads((out / "fid_floor" / "embedded" / "metrics.json").read_text())
    assert floor["metric"] == "FD-EffNetLite0-128" and "FID" not in floor
    assert floor["samples"]["n"] == 512 and floor["reference"]["n"] == 1024
    assert 0 < floor["FD-EffNetLite0-128"] and 0 < floor["precision"] <= 1 and 0 < floor["recall"] <= 1
    ref = json.loads((out / "fid_ref" / "embedded" / "stats.json").read_text())
    assert ref["protocol"]["feature_net"] == "efficientnet-lite0-128" and ref["split"] == "train"
    # Autoencoders: three variants trained, evaluated and cached; training shows learning
    # (an untrained tiny autoencoder reconstructs at ~11 dB PSNR).
    for variant in ("sdvae", "esm", "dsm"):
        name = f"embedded-tiny-{variant}"
        summary = json.loads((out / "autoencoders" / name / "autoencoder.json").read_text())
        assert summary["variant"] == variant and summary["generator_steps"] == STEPS[variant]
        ev = json.loads((out / "ae_eval" / name / "metrics.json").read_text())
        assert ev["n"] == 128 and ev["psnr"] > 15.0, ev  # learning at all (thresholds: the next test)
        assert set(ev["lowpass"]) == {"8", "12"} and "rFD-EffNetLite0-128" in ev
        lat = json.loads((out / "latents" / name / "manifest.json").read_text())
        assert lat["count"] == 4096 and lat["hflip"] is False and lat["shape"] == [4, 16, 16] and 0 < lat["scale_factor"] < 100
        rec = json.loads((out / "latents" / name / "provenance.json").read_text())
        assert {i["role"] for i in rec["inputs"]} == {"autoencoder", "dataset"}
    log = [json.loads(x) for x in (out / "autoencoders" / "embedded-tiny-dsm" / "metrics.jsonl").read_text().splitlines()]
    assert {r["k"] for r in log} <= {0, 8, 10, 12} and log[-1]["l1"] < log[0]["l1"]


def test_tiny_demo_shows_each_mechanism(tiny_run):
    """What `make demo` must show (docs/report.md, "What the demo shows"): every tiny
    autoencoder reconstructs held-out images at 25 dB or better; ESM-AE's latent spectrum is at
    least five times closer to the target than SD-VAE's (KL(target || latent)); DSM-AE's low-pass
    reconstructions are better than SD-VAE's at the strongest low-pass (k = 12) and not worse
    beyond two bootstrap standard errors of the difference at k = 8; the report's claims agree."""
    from specmatch.autoencoder import evaluate

    out = tiny_run / "results" / "tiny"
    ev = {v: evaluate.read(out / "ae_eval" / f"embedded-tiny-{v}") for v in STEPS}
    assert all(e.psnr >= 25.0 for e in ev.values()), {v: e.psnr for v, e in ev.items()}
    kl = {v: e.latent_spectrum.kl_target_to_latent for v, e in ev.items()}
    assert kl["esm"] <= kl["sdvae"] / 5, kl
    dsm, sd = ev["dsm"], ev["sdvae"]
    assert dsm.lowpass[12] < sd.lowpass[12], (dsm.lowpass, sd.lowpass)
    se = float(np.hypot(dsm.lowpass_bootstrap[8].std, sd.lowpass_bootstrap[8].std))
    assert dsm.lowpass[8] - sd.lowpass[8] <= 2 * se, (dsm.lowpass, sd.lowpass, se)
    import pandas as pd

    claims = pd.read_csv(out / "report" / "tables" / "claims.csv").set_index("claim")
    # C2 by a wide margin; C3's advantage at k = 12 (asserted above) may lie within 2 standard errors at N = 128
    assert claims.loc["C2", "verdict"] == "supported" and claims.loc["C3", "verdict"] != "contradicted", claims
    # The premise of C4 on the latents the U-ViTs are trained on (measured: SD-VAE's posterior
    # samples' exponent -0.86 against the target's -1.20, 6 standard errors flatter); C0 for each
    # U-ViT with snapshots, from its band errors at initialisation, steps 40, 80 and 160.
    assert claims.loc["C4-premise", "verdict"] == "supported", claims.loc["C4-premise"]
    c0 = claims.loc[["C0"]]
    assert len(c0) == 4 and not c0["verdict"].str.startswith("not tested").any(), c0
    assert "## Claims" in (out / "report" / "index.md").read_text()


# The grid's 6 runs, 7 sample sets, and the untrained baselines of the report
# (report.baselines.untrained): one per group of runs that share an autoencoder and a network
# (sdvae-uvit, esm-uvit, dsm-uvit, pixels-uvit, dsm-sit), sampled with every sampler of its group
# (6 sets).
DIFFUSION_JOBS = {"train_diffusion": 11, "sample": 13, "generation_metrics": 13, "generation_table": 1}
# The metric over training of the four U-ViT runs (report.progress) and the report itself.
REPORT_JOBS = {"fid_progress": 4, "report": 1}
# The band errors of the same four runs (claim C0), re-run whenever their weights are.
BAND_ERROR_JOBS = {"band_error": 4}
UVIT = ("embedded-tiny-sdvae-uvit", "embedded-tiny-esm-uvit", "embedded-tiny-dsm-uvit", "embedded-tiny-pixels-uvit")
ALIGNED = ("embedded-tiny-dsm-sit-repa",)  # iREPA and DoG-REPA run in the small preset
SAMPLE_SETS = {("embedded-tiny-sdvae-uvit", "tiny-dpm20"), ("embedded-tiny-esm-uvit", "tiny-dpm20"),
               ("embedded-tiny-dsm-uvit", "tiny-dpm20"), ("embedded-tiny-pixels-uvit", "tiny-dpm20"),
               ("embedded-tiny-dsm-sit", "tiny-sde30"),
               ("embedded-tiny-dsm-sit", "tiny-sde30-cfg")} | {(d, "tiny-sde30") for d in ALIGNED}
TARGETS = "targets/embedded/efficientnet-lite0-s8-64"


def test_tiny_dag_diffusion_outputs(tiny_run):
    out = tiny_run / "results" / "tiny"
    for diff in {d for d, _ in SAMPLE_SETS}:
        summary = json.loads((out / "diffusion" / diff / "diffusion.json").read_text())
        assert summary["latents"]["autoencoder"] == "-".join(diff.split("-")[:3])
        log = [json.loads(x) for x in (out / "diffusion" / diff / "metrics.jsonl").read_text().splitlines()]
        first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
        assert last < first, (diff, first, last)
    for diff, sampler in SAMPLE_SETS:
        samples = out / "samples" / diff / sampler
        proto = json.loads((samples / "sampling.json").read_text())
        assert proto["n_samples"] == 128 and proto["diffusion"] == diff
        man = json.loads((samples / "manifest.json").read_text())
        assert man["splits"]["samples"]["count"] == 128
        m = json.loads((out / "gen_metrics" / diff / sampler / "metrics.json").read_text())
        assert m["metric"] == "FD-EffNetLite0-128" and "FID" not in m and m["samples"]["n"] == 128
        assert m["sampling"]["sampler"] == proto["sampler"] and np.isfinite(m["FD-EffNetLite0-128"])
    sit = json.loads((out / "samples" / "embedded-tiny-dsm-sit" / "tiny-sde30-cfg" / "sampling.json").read_text())
    assert sit["cfg_scale"] == 2.0 and sit["cfg_interval"] == [0.0, 0.7] and sit["class_balanced"] is True
    table = (out / "tables" / "generation" / "generation.csv").read_text().splitlines()
    # the grid's sample sets and those of the untrained baselines, one row each
    assert len(table) == 1 + DIFFUSION_JOBS["generation_metrics"] and "FD-EffNetLite0-128" in table[1]
    assert (out / "tables" / "generation" / "generation.md").is_file()


def test_tiny_dag_alignment_outputs(tiny_run):
    """REPA / iREPA / DoG-REPA in the tiny DAG: one target cache in the latent caches' entry
    order, the alignment loss falls in every aligned run, the projector stays out of the
    finished model, the diagnostics and the comparison table are written."""
    out = tiny_run / "results" / "tiny"
    tman = json.loads((out / TARGETS / "manifest.json").read_text())
    lman = json.loads((out / "latents" / "embedded-tiny-dsm" / "manifest.json").read_text())
    assert tman["count"] == lman["count"] == 4096 and tman["shape"] == [40, 8, 8]
    assert tman["dataset_images_sha256"] == lman["dataset_images_sha256"]
    from safetensors.torch import load_file

    for diff, kind in zip(ALIGNED, ("repa",)):
        summary = json.loads((out / "diffusion" / diff / "diffusion.json").read_text())
        a = summary["alignment"]
        assert (a["kind"], a["encoder"], a["target_grid"], a["token_grid"], a["resized"]) == (
            kind, "efficientnet-lite0-s8", [8, 8], [8, 8], False)
        assert a["projector"] == ("conv" if kind == "irepa" else "mlp")
        log = [json.loads(x) for x in (out / "diffusion" / diff / "metrics.jsonl").read_text().splitlines()]
        first, last = np.mean([r["align_loss"] for r in log[:3]]), np.mean([r["align_loss"] for r in log[-3:]])
        assert last < first - 0.02, (diff, first, last)
        assert not [k for k in load_file(out / "diffusion" / diff / "model.safetensors") if k.startswith("proj")]
        prov = json.loads((out / "diffusion" / diff / "provenance.json").read_text())
        assert {i["role"] for i in prov["inputs"]} == {"latents", "targets"}
    none = json.loads((out / "diffusion" / "embedded-tiny-dsm-sit" / "diffusion.json").read_text())
    assert none["alignment"] == {"kind": "none"}
    spectra = (out / "tables" / "target_spectra" / "target_spectra.csv").read_text().splitlines()
    assert len(spectra) == 1 + 3 and all(r.split(",")[0] == "efficientnet-lite0-s8" for r in spectra[1:])
    import pandas as pd

    ts = pd.read_csv(out / "tables" / "target_spectra" / "target_spectra.csv").set_index("kind")
    # Spatial normalisation and the band-pass both remove the field's common direction.
    assert 0 < ts.loc["repa", "RMSC2"] < ts.loc["irepa", "RMSC2"] <= 1 and ts.loc["dog", "RMSC2"] <= 1
    assert (out / "tables" / "target_spectra" / "target_spectra.png").read_bytes()[:4] == b"\x89PNG"
    comp = pd.read_csv(out / "tables" / "generation" / "alignment.csv")
    assert [a.split(" ")[0] for a in comp["alignment"]] == ["none", "repa"]
    assert comp.filter(like="FD-EffNetLite0-128 [euler-maruyama 30 steps, cfg 1").notna().all().all()


def test_trained_tiny_diffusion_beats_its_untrained_self(tiny_run):
    """The DAG's untrained baselines (report.baselines.untrained: the same network at step 0,
    sampled and scored identically): the tiny U-ViTs on the ESM-AE and DSM-AE latents beat
    theirs after 160 steps (measured: 779 vs 814 and 792 vs 822; on SD-VAE's latents 160 steps
    are too few, 832 vs 808, which the report's claims section states), and the report shows
    each baseline beside its run."""
    out = tiny_run / "results" / "tiny"

    def fd(diff: str) -> float:
        m = json.loads((out / "gen_metrics" / diff / "tiny-dpm20" / "metrics.json").read_text())
        return m["FD-EffNetLite0-128"]

    for diff in ("embedded-tiny-esm-uvit", "embedded-tiny-dsm-uvit"):
        assert fd(diff) < fd(diff + "-untrained"), (diff, fd(diff), fd(diff + "-untrained"))
    import pandas as pd

    e1 = pd.read_csv(out / "report" / "tables" / "e1.csv").set_index("diffusion")
    col = next(c for c in e1.columns if c.endswith("untrained"))
    assert e1.loc["embedded-tiny-esm-uvit", col] == pytest.approx(fd("embedded-tiny-esm-uvit-untrained"), rel=1e-5)


def test_tiny_dag_report_outputs(tiny_run):
    """The paper report: every table and figure linked from index.md, the tables' numbers equal
    to the stage outputs they come from, the U-ViT snapshots and their metric over training, and
    an audit from a table back to the raw data."""
    import pandas as pd

    out = tiny_run / "results" / "tiny"
    rep = out / "report"
    page = (rep / "index.md").read_text()
    # the same page for a browser, linking the same tables (tests/test_report_html.py opens one)
    html_links = set(re.findall(r'href="(tables/[^"]+)"', (rep / "index.html").read_text()))
    assert html_links == {f"tables/{f.name}" for f in (rep / "tables").iterdir()}
    files = sorted((rep / "tables").iterdir()) + sorted((rep / "figures").iterdir())
    assert {f.name for f in (rep / "tables").iterdir()} == {f"{t}.{e}" for t in (
        "claims", "e1", "e2", "e3", "e4_data", "e4_latents", "e4_samples", "fid_over_training") for e in ("csv", "md")}
    for f in files:
        assert f"]({f.parent.name}/{f.name})" in page, f.name
    names = {f.name for f in (rep / "figures").iterdir()}
    assert {"spectra_embedded_16x16.png", "reconstructions_embedded.png", "target_spectra.png",
            "fid_over_training.png", "data_spectra_embedded.png"} <= names
    assert {f"samples_{d}-{s}.png" for d, s in SAMPLE_SETS} <= names
    e1 = pd.read_csv(rep / "tables" / "e1.csv")
    assert e1["autoencoder"].tolist() == ["embedded-tiny-sdvae", "embedded-tiny-esm", "embedded-tiny-dsm",
                                          "embedded-tiny-pixels"]
    # the identity reconstructs losslessly (PSNR +inf) and its U-ViT is scored against the 32 px images
    pix = e1.set_index("autoencoder").loc["embedded-tiny-pixels"]
    assert pix["PSNR"] == np.inf and pix["dataset"] == "embedded_32px" and pix["model"] == "UViT-tiny/4"
    for _, r in e1.iterrows():
        ev = json.loads((out / "ae_eval" / r["autoencoder"] / "metrics.json").read_text())
        gm = json.loads((out / "gen_metrics" / r["diffusion"] / "tiny-dpm20" / "metrics.json").read_text())
        assert r["diffusion"] == r["autoencoder"] + "-uvit" and r["n_samples"] == 128
        assert r["PSNR"] == pytest.approx(ev["psnr"], rel=1e-5)
        assert r["rFD-EffNetLite0-128"] == pytest.approx(ev["rFD-EffNetLite0-128"], rel=1e-5)
        assert r["FD-EffNetLite0-128"] == pytest.approx(gm["FD-EffNetLite0-128"], rel=1e-5)
    e2 = pd.read_csv(rep / "tables" / "e2.csv")
    assert set(e2["diffusion"]) == {"embedded-tiny-dsm-sit"} and sorted(e2["cfg_scale"]) == [1.0, 2.0]
    e3 = pd.read_csv(rep / "tables" / "e3.csv")
    plain = e3[e3["cfg_scale"] == 1.0]
    assert plain["alignment"].tolist() == ["none", "repa"]
    assert plain["target_RMSC2"].iloc[1:].notna().all() and pd.isna(plain["target_RMSC2"].iloc[0])
    e4 = pd.read_csv(rep / "tables" / "e4_latents.csv")
    assert len(e4) == 4 and {"rFD-EffNetLite0-128 LP k=8", "rFD-EffNetLite0-128 LP k=12"} <= set(e4.columns)
    for diff in UVIT:
        assert sorted(p.name for p in (out / "diffusion" / diff / "snapshots").iterdir()) == [
            "step-00000040.safetensors", "step-00000080.safetensors"]
        prog = pd.read_csv(out / "progress" / diff / "progress.csv")
        assert prog["step"].tolist() == [40, 80, 160] and (prog["n_samples"] == 64).all()
        assert (prog["metric"] == "FD-EffNetLite0-128").all() and prog["value"].notna().all()
    curve = pd.read_csv(rep / "tables" / "fid_over_training.csv")
    assert len(curve) == 4 * 3 + 4 and (curve[curve["source"] == "generation table"]["n_samples"] == 128).all()
    audit = _run([str(BIN / "specmatch"), "audit", "--no-dvc", "results/tiny/report/tables/e1.csv"], tiny_run)
    assert "results/tiny/data/embedded" in audit.stdout and "results/tiny/progress" in audit.stdout
    assert "FAILED" not in audit.stdout


def test_tiny_dag_is_up_to_date_after_run(tiny_run):
    proc = _run([str(BIN / "snakemake"), "--cores", "1", "--config", "preset=tiny", "-n"], tiny_run)
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _planned_jobs(repo: Path, override: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table of a dry run with one --config override."""
    proc = _run([str(BIN / "snakemake"), "--cores", "1", "-n", "--config", "preset=tiny", override], repo)
    return job_stats(proc.stdout + proc.stderr)


def test_spectra_parameter_change_reruns_only_spectra(tiny_run):
    assert _planned_jobs(tiny_run, "spectra={n_bins: 8}") == {"data_spectra": 2, "report": 1, "all": 1}


def test_dataset_parameter_change_reruns_data_and_spectra(tiny_run):
    # everything on the 64 px images; the pixel run on the 32 px set (its own dataset) is left alone
    assert _planned_jobs(tiny_run, "datasets={embedded: {seed: 1}}") == {
        "prepare_data": 1, "data_spectra": 1, "fid_ref": 1, "fid_real_floor": 1, "fid_real_floor_n": 1, "train_ae": 3, "eval_ae": 3,
        "extract_latents": 3, "extract_targets": 1, "target_spectra": 1, "train_diffusion": 9, "sample": 11,
        "generation_metrics": 11, "generation_table": 1, "fid_progress": 3, "report": 1, "band_error": 3, "all": 1}


def test_autoencoder_eval_change_reruns_only_evaluation(tiny_run):
    assert _planned_jobs(tiny_run, "autoencoder={eval: {max_images: 64}}") == {"eval_ae": 4, "report": 1, "all": 1}


def test_autoencoder_train_change_reruns_training_and_downstream(tiny_run):
    assert _planned_jobs(tiny_run, "autoencoder={train: {lr: 1e-4}}") == {
        "train_ae": 4, "eval_ae": 4, "extract_latents": 4, **DIFFUSION_JOBS, **REPORT_JOBS, **BAND_ERROR_JOBS, "all": 1}


def test_metrics_parameter_change_reruns_evaluation_and_scores(tiny_run):
    assert _planned_jobs(tiny_run, "metrics={pr_k: 5}") == {
        "fid_ref": 2, "fid_real_floor": 2, "fid_real_floor_n": 2, "generation_metrics": 13, "generation_table": 1,
        **REPORT_JOBS, "all": 1}


def test_diffusion_train_change_reruns_diffusion_sampling_and_scores(tiny_run):
    assert _planned_jobs(tiny_run, "diffusion={train: {lr: 5e-4}}") == {
        **DIFFUSION_JOBS, **REPORT_JOBS, **BAND_ERROR_JOBS, "all": 1}


def test_dog_change_reruns_only_the_diagnostics(tiny_run):
    # no DoG-REPA run in the tiny grid (the small preset has them): only the targets' diagnostics
    assert _planned_jobs(tiny_run, "diffusion={alignment: {dog: {sigma2: 3.0}}}") == {
        "target_spectra": 1, "report": 1, "all": 1}


def test_target_cache_change_reruns_the_aligned_runs(tiny_run):
    assert _planned_jobs(tiny_run, "targets={dtype: float32}") == {
        "extract_targets": 1, "target_spectra": 1, "train_diffusion": 1, "sample": 1, "generation_metrics": 1,
        "generation_table": 1, "report": 1, "all": 1}


def test_sampler_change_reruns_only_its_samples_and_scores(tiny_run):
    assert _planned_jobs(tiny_run, "samplers={tiny-dpm20: {steps: 15}}") == {
        "sample": 8, "generation_metrics": 8, "generation_table": 1, **REPORT_JOBS, "all": 1}


def test_snakemake_lint_is_clean(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    proc = subprocess.run([str(BIN / "snakemake"), "--lint", "--config", "preset=tiny"], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_tiny_dag_training_curves_for_tensorboard(tiny_run):
    """Every trainer of the tiny DAG and every `fid-progress` leaves curves in its output that
    TensorBoard's own reader lists: each logged number of metrics.jsonl at its steps (loss,
    learning rate, gradient norm, throughput; the alignment loss of the REPA run; FD over
    training)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tiny_run / "results" / "tiny"

    def scalars(folder: Path) -> dict[str, list[int]]:
        acc = EventAccumulator(str(folder / "curves" / "tb"))
        acc.Reload()
        return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    trained = [out / "autoencoders" / f"embedded-tiny-{v}" for v in STEPS] + [
        out / "diffusion" / d for d in sorted({d for d, _ in SAMPLE_SETS})]
    for folder in trained:
        tb = scalars(folder)
        log = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert {"loss", "lr", "grad_norm"} <= set(tb), (folder.name, sorted(tb))
        assert {"images_per_s", "latents_per_s"} & set(tb), (folder.name, sorted(tb))
        assert tb["loss"] == [r["step"] for r in log], folder.name
    assert "align_loss" in scalars(out / "diffusion" / "embedded-tiny-dsm-sit-repa")
    for diff in UVIT:
        assert scalars(out / "progress" / diff)["FD-EffNetLite0-128"] == [40, 80, 160], diff
