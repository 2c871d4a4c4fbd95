"""The grid (`specmatch.grid`): which runs a preset makes, asked without Snakemake, checked
against the presets' own lists and, once, against the DAG Snakemake plans from it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from specmatch import config, grid
from specmatch.errors import SpecmatchError

from conftest import REPO, job_stats

PARAMS_YAML = REPO / "params.yaml"


def _grid(preset: str, **overrides) -> grid.Grid:
    resolved = config.resolve(config.load_yaml(PARAMS_YAML), REPO / "presets", {"preset": preset, **overrides})
    return grid.Grid.build(resolved)


def test_tiny_grid_lists_the_presets_runs_and_their_untrained_twins():
    g = _grid("tiny")
    tiny = config.load_yaml(REPO / "presets" / "tiny.yaml")
    assert list(g.autoencoders) == tiny["grid"]["autoencoders"]
    trained = tiny["grid"]["diffusions"]
    # report.baselines.untrained: one twin per (autoencoder, network, process, seed), named after
    # the group's first run; the four SiT runs differ only in alignment, so they share one.
    twins = {"embedded-tiny-sdvae-uvit-untrained": ("embedded-tiny-sdvae-uvit",),
             "embedded-tiny-esm-uvit-untrained": ("embedded-tiny-esm-uvit",),
             "embedded-tiny-dsm-uvit-untrained": ("embedded-tiny-dsm-uvit",),
             "embedded-tiny-pixels-uvit-untrained": ("embedded-tiny-pixels-uvit",),
             "embedded-tiny-dsm-sit-untrained": ("embedded-tiny-dsm-sit", "embedded-tiny-dsm-sit-repa")}
    assert list(g.diffusions) == trained + list(twins)
    assert dict(g.untrained) == twins
    for twin, runs in twins.items():
        assert g.diffusions[twin]["train"]["steps"] == 0 and g.diffusions[twin]["alignment"] == {"kind": "none"}
        assert all(g.untrained_of(r) == twin for r in runs)
    assert g.untrained_of("embedded-tiny-dsm-sit-untrained") is None
    # every run sampled with each sampler it lists; a twin with every sampler of its group
    assert g.samples == tuple((d, s) for d in g.diffusions for s in g.diffusions[d]["samplers"])
    assert g.diffusions["embedded-tiny-dsm-sit-untrained"]["samplers"] == ["tiny-sde30", "tiny-sde30-cfg"]
    assert set(g.samplers) == {s for _, s in g.samples}
    assert g.aligned == ("embedded-tiny-dsm-sit-repa",)
    # the pixel run: the identity autoencoder on the 32 px images, a U-ViT with patch 4
    assert g.autoencoders["embedded-tiny-pixels"]["dataset"] == "embedded_32px"
    assert g.diffusions["embedded-tiny-pixels-uvit"]["model"] == "UViT-tiny/4"
    # EfficientNet-Lite0's stride-8 map at its default input size, 64 px (alignment/registry.py)
    assert g.target_caches == (grid.TargetCache("embedded", "efficientnet-lite0-s8", 64),)
    assert g.trained_autoencoders == tuple(g.autoencoders) and g.pretrained_autoencoders == ()


def test_tiny_grid_report_reads_every_experiment_run_with_its_baselines():
    g = _grid("tiny")
    r = g.report
    assert r.experiments["E1"]["diffusions"] == ("embedded-tiny-sdvae-uvit", "embedded-tiny-esm-uvit",
                                                 "embedded-tiny-dsm-uvit", "embedded-tiny-pixels-uvit")
    assert r.experiments["E4"]["datasets"] == ("embedded", "embedded_32px")  # null: every dataset of the grid
    assert set(r.diffusions) == set(g.diffusions)  # all of the tiny grid's runs are in an experiment
    assert r.floors == (("embedded", 128), ("embedded_32px", 128))  # every sampler draws 128 samples
    assert r.target_spectra and r.datasets == ("embedded", "embedded_32px")
    assert r.progress == ("embedded-tiny-sdvae-uvit", "embedded-tiny-esm-uvit", "embedded-tiny-dsm-uvit",
                          "embedded-tiny-pixels-uvit")


def test_paths_spell_each_output_once():
    p = _grid("tiny").paths
    assert p.root == "results/tiny"
    assert p.samples("{diff}", "{sampler}") == "results/tiny/samples/{diff}/{sampler}"
    assert p.fid_floor("embedded", 128) == "results/tiny/fid_floor/embedded-n128"
    assert p.fid_floor("embedded") == "results/tiny/fid_floor/embedded"
    assert p.targets(*grid.TargetCache("embedded", "efficientnet-lite0-s8", 64)) == \
        "results/tiny/targets/embedded/efficientnet-lite0-s8-64"
    assert p.runs("samples", "d", "s") == "results/tiny/runs/samples/d/s"
    assert p.log("fid_real_floor", "embedded-n128") == "results/tiny/logs/fid_real_floor/embedded-n128.log"


def test_paper_grid_imports_the_public_sdvae_and_keeps_its_datasets():
    g = _grid("paper")
    assert g.pretrained_autoencoders == ("imagenet-sdvae-ft-ema",)
    assert set(g.datasets) == {"celebahq", "imagenet"}
    assert {g.dataset_of(d) for d in g.diffusions} <= set(g.datasets)
    assert g.target_caches == (grid.TargetCache("imagenet", "dinov2-vitb14", 224),)


def test_a_dataset_left_out_of_the_grid_drops_its_runs():
    g = _grid("paper", grid={"datasets": ["celebahq"]},
              report={"experiments": {"E2": {"autoencoders": [], "diffusions": []},
                                      "E3": {"diffusions": []}, "E3b": {"diffusions": []}}})
    assert {g.dataset_of(a) for a in g.autoencoders} == {"celebahq"}
    assert all(g.dataset_of(d) == "celebahq" for d in g.diffusions)
    assert g.target_caches == ()


def test_the_grid_is_frozen():
    g = _grid("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.preset = "paper"  # type: ignore[misc]
    with pytest.raises(TypeError):
        g.diffusions["x"] = {}  # type: ignore[index]


@pytest.mark.parametrize("overrides, message", [
    ({"grid": {"autoencoders": ["nope"]}}, r"grid.autoencoders: 'nope' \(item 0\) names no entry of `autoencoders`"),
    ({"grid": {"diffusions": ["nope"]}}, r"grid.diffusions: 'nope' \(item 0\) names no entry of `diffusions`"),
    ({"grid": {"diffusions": ["embedded-tiny-dsm-sit", "embedded-tiny-dsm-sitt-untrained"]}},
     r"grid.diffusions names undefined runs \['embedded-tiny-dsm-sitt-untrained'\] \(did you mean "
     r"'embedded-tiny-dsm-sit-untrained'\?\)"),
    ({"report": {"experiments": {"E1": {"diffusions": ["embedded-tiny-nope"]}}}},
     r"report.experiments.E1.diffusions: 'embedded-tiny-nope' \(item 0\) names no entry of `diffusions`"),
    ({"report": {"experiments": {"E1": {"diffusions": ["celebahq-f8d4-sdvae-uvit"]}}}},  # defined, not in the grid
     r"report.experiments.E1.diffusions names \['celebahq-f8d4-sdvae-uvit'\], which are not among the diffusions "
     r"available"),
    ({"report": {"progress": {"diffusions": ["embedded-tiny-nope"]}}},
     r"report.progress.diffusions: 'embedded-tiny-nope' \(item 0\) names no entry of `diffusions`"),
    ({"report": {"progress": {"diffusions": ["embedded-tiny-dsm-sit"]}}}, "without train.snapshot_steps"),
    ({"samplers": {"tiny-dpm20": {"stepz": 3}}}, r"samplers.tiny-dpm20"),
])
def test_bad_grids_are_refused_naming_the_key(overrides, message):
    with pytest.raises(SpecmatchError, match=message):
        _grid("tiny", **overrides)


def test_a_misspelt_reference_is_refused_not_dropped_from_the_dag(tmp_path):
    """A diffusion entry whose `autoencoder:` names nothing used to leave the DAG without a word
    (the grid keeps the runs whose autoencoder it runs). Refused instead, through the grid, the
    CLI and Snakemake, naming the file, the key, the bad value, the closest name and all of them."""
    typo = {"diffusions": {"embedded-tiny-dsm-sit": {"autoencoder": "embeded-tiny-dsm"}}}
    key = r"diffusions\.embedded-tiny-dsm-sit\.autoencoder: 'embeded-tiny-dsm' names no entry of `autoencoders` "
    hint = r"\(did you mean 'embedded-tiny-dsm'\?\); expected one of \[.*'embedded-tiny-esm'"
    with pytest.raises(SpecmatchError, match=f"the command line \\(--config, --configfile\\): {key}{hint}"):
        _grid("tiny", **typo)
    # written in a preset file: `specmatch params show` names that file
    import shutil

    shutil.copy(PARAMS_YAML, tmp_path / "params.yaml")
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    preset = tmp_path / "presets" / "tiny.yaml"
    text = preset.read_text()
    one = "  embedded-tiny-dsm-sit-dog: {<<: *tiny_sit, alignment: {kind: dog}, samplers: [tiny-sde30]}\n"
    assert one in text
    preset.write_text(text.replace(one, one.replace("samplers: [tiny-sde30]", "samplers: [tiny-sde3O]")))
    proc = subprocess.run([str(Path(sys.executable).parent / "specmatch"), "params", "show", "--params-file",
                           str(tmp_path / "params.yaml"), "--preset", "tiny"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert (f"{preset}: diffusions.embedded-tiny-dsm-sit-dog.samplers: 'tiny-sde3O' (item 0) names no entry of "
            "`samplers` (did you mean 'tiny-sde30'?)") in proc.stderr
    # the run the issue lost: Snakemake stops before planning
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--config", "preset=tiny",
                           "diffusions={embedded-tiny-dsm-sit: {autoencoder: embeded-tiny-dsm}}"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Job stats" not in out
    assert "diffusions.embedded-tiny-dsm-sit.autoencoder: 'embeded-tiny-dsm'" in out
    assert "did you mean 'embedded-tiny-dsm'?" in out


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_snakemake_plans_exactly_the_grids_jobs(preset, tmp_path):
    """The independent check: the jobs of a forced dry run of the whole DAG, per rule, are those
    the grid lists (the rules build their targets from the grid's paths)."""
    g = _grid(preset)
    proc = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-n", "--forceall", "--config",
                           f"preset={preset}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = job_stats(proc.stdout)
    want = {"prepare_data": len(g.datasets), "train_ae": len(g.trained_autoencoders),
            "import_ae": len(g.pretrained_autoencoders), "eval_ae": len(g.autoencoders),
            "extract_latents": len(g.autoencoders), "train_diffusion": len(g.diffusions),
            "sample": len(g.samples), "generation_metrics": len(g.samples),
            "extract_targets": len(g.target_caches), "fid_real_floor_n": len(g.report.floors),
            "fid_progress": len(g.report.progress), "report": 1}
    assert {k: jobs.get(k, 0) for k in want} == want


def test_small_grid_second_seeds_have_untrained_twins_of_their_own_seed():
    """A run trained with `train.seed: 1` starts from other initial weights than its seed-0 twin:
    its untrained baseline is a network of seed 1, not the seed-0 one."""
    g = _grid("small")
    assert g.untrained_of("embedded-small-sdvae-uvit") == "embedded-small-sdvae-uvit-untrained"
    assert g.untrained_of("embedded-small-sdvae-uvit-s1") == "embedded-small-sdvae-uvit-s1-untrained"
    for run in ("embedded-small-sdvae-uvit", "embedded-small-sdvae-uvit-s1", "embedded-small-sdvae-sit-dog-s1"):
        twin = g.diffusions[g.untrained_of(run)]
        assert twin["train"]["seed"] == g.diffusions[run]["train"]["seed"] and twin["train"]["steps"] == 0
    assert g.diffusions["embedded-small-sdvae-uvit-s1"]["train"]["seed"] == 1
    # the four alignments of one seed share one untrained SiT
    assert {g.untrained_of(f"embedded-small-sdvae-sit{a}-s1") for a in ("", "-repa", "-irepa", "-dog")} == {
        "embedded-small-sdvae-sit-s1-untrained"}
