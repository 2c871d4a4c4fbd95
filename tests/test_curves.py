"""Training curves (`runtime.curves`): the TensorBoard event files and DVC plot files the trainers
and `fid-progress` write, read back with TensorBoard's own reader and `dvc plots show`; each step
once after an interrupted run resumes; nothing written off the main rank."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from specmatch.diffusion import fid_progress, train
from specmatch.runtime import checkpoint
from specmatch.runtime.curves import CURVES_DIR, PLOTS_DIR, SUMMARY_FILE, TB_DIR, Curves

BIN = Path(sys.executable).parent


def _jsonl(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _numeric(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard's reader shows the run in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(folder: Path) -> dict[str, list[int]]:
    """{tag: steps} of every scalar record in every event file of `folder` (no reader's purging)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*tfevents*")):
        for ev in EventFileLoader(str(path)).Load():
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(ev.step)
    return out


def _tsv(path: Path) -> list[tuple[int, float]]:
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == ["step", path.stem]
    return [(int(s), float(v)) for s, v in zip(df["step"], df[path.stem])]


def _check_against_log(folder: Path) -> None:
    """The curves of a trainer's run or output folder hold exactly its metrics.jsonl's numbers."""
    recs = _jsonl(folder)
    want: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        for k, v in _numeric(r).items():
            want.setdefault(k, []).append((r["step"], v))
    curves = folder / CURVES_DIR
    tb = _tb_scalars(curves / TB_DIR)
    assert sorted(tb) == sorted(want)
    plots = {p.stem: _tsv(p) for p in (curves / PLOTS_DIR).glob("*.tsv")}
    assert sorted(plots) == sorted(want)
    for k, pts in want.items():
        assert [s for s, _ in tb[k]] == [s for s, _ in pts], k
        assert [v for _, v in tb[k]] == pytest.approx([v for _, v in pts], rel=1e-6, nan_ok=True), k  # float32
        assert [s for s, _ in plots[k]] == [s for s, _ in pts], k
        assert [v for _, v in plots[k]] == pytest.approx([v for _, v in pts], nan_ok=True), k  # exact text
    summary = json.loads((curves / SUMMARY_FILE).read_text())
    assert summary["step"] == recs[-1]["step"]
    assert {k: v for k, v in summary.items() if k != "step"} == pytest.approx({k: p[-1][1] for k, p in want.items()})


def test_autoencoder_output_curves_are_its_metrics_log(micro_latents):
    ae_out = micro_latents[1]  # a 2-step micro autoencoder trained by the fixture
    _check_against_log(ae_out)
    tags = set(_tb_scalars(ae_out / CURVES_DIR / TB_DIR))
    assert {"loss", "l1", "kl", "lr", "grad_norm", "images_per_s"} <= tags


def test_diffusion_resumed_run_has_every_step_once(micro_latents, tmp_path):
    lat = micro_latents[2]
    params = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
              "train": {"steps": 6, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                        "checkpoint_every": 2, "keep_checkpoints": 5, "log_every": 1, "seed": 5}}
    run, out = tmp_path / "run", tmp_path / "out"
    train.train(params, lat, out, "u", run_dir=run)
    _check_against_log(run)
    _check_against_log(out)
    first = {k: dict(v) for k, v in _tb_scalars(run / CURVES_DIR / TB_DIR).items()}
    assert {"loss", "lr", "latents_per_s"} <= set(first) and sorted(first["loss"]) == [1, 2, 3, 4, 5, 6]

    # The state an attempt killed after step 6's log but with step 2 as its newest checkpoint
    # leaves: steps 3-6 logged everywhere, and no output. The resumed run logs them again.
    for step, folder in checkpoint.list_checkpoints(run):
        if step > 2:
            shutil.rmtree(folder)
    shutil.rmtree(out)
    train.train(params, lat, out, "u", run_dir=run, resume="auto")
    for folder in (run, out):
        assert [r["step"] for r in _jsonl(folder)] == [1, 2, 3, 4, 5, 6]
        _check_against_log(folder)  # TensorBoard's view and the TSVs: each step once, the log's values
        raw = _raw_steps(folder / CURVES_DIR / TB_DIR)
        assert all(sorted(steps) == [1, 2, 3, 4, 5, 6] for steps in raw.values()), raw  # in the files themselves
    again = _tb_scalars(out / CURVES_DIR / TB_DIR)
    assert dict(again["loss"]) == pytest.approx(first["loss"])  # the resumed trajectory is the same one
    assert len(list((out / CURVES_DIR / TB_DIR).glob("*tfevents*"))) == 2  # one event file per attempt


def test_curves_trim_on_resume_and_restart_from_zero(tmp_path):
    with Curves(tmp_path, 0, True) as c:
        for s in range(1, 6):
            c.log(s, {"step": s, "loss": 1.0 / s, "update": "G", "ok": True, "k": s, "none": None})
    tsv = tmp_path / CURVES_DIR / PLOTS_DIR / "loss.tsv"
    with open(tsv, "a") as f:
        f.write("6\t0.1")  # a line cut short by a kill
    with Curves(tmp_path, 3, True) as c:
        assert json.loads((tmp_path / CURVES_DIR / SUMMARY_FILE).read_text()) == {"loss": 1.0 / 3, "k": 3, "step": 3}
        c.log(5, {"loss": 0.5, "k": 5})
    assert [s for s, _ in _tsv(tsv)] == [1, 2, 3, 5]
    assert _tsv(tmp_path / CURVES_DIR / PLOTS_DIR / "k.tsv") == [(1, 1), (2, 2), (3, 3), (5, 5)]
    tb = _tb_scalars(tmp_path / CURVES_DIR / TB_DIR)
    assert sorted(tb) == ["k", "loss"] and [s for s, _ in tb["loss"]] == [1, 2, 3, 5]
    assert sorted(_raw_steps(tmp_path / CURVES_DIR / TB_DIR)["loss"]) == [1, 2, 3, 5]
    assert json.loads((tmp_path / CURVES_DIR / SUMMARY_FILE).read_text()) == {"loss": 0.5, "k": 5, "step": 5}
    with Curves(tmp_path, 0, True):  # a fresh run (step 0) starts a fresh folder
        pass
    assert not list((tmp_path / CURVES_DIR / PLOTS_DIR).iterdir())


def test_other_ranks_write_nothing(tmp_path):
    with Curves(tmp_path / "a", 0, False) as c:
        c.log(1, {"loss": 1.0})
    assert not (tmp_path / "a").exists()
    with Curves(tmp_path / "b", 0, True) as c:
        c.log(1, {"loss": 1.0})
        c.log(2, {"loss": 0.5})
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with Curves(tmp_path / "b", 1, False) as c:  # a resumed run's other rank: no trimming either
        c.log(2, {"loss": 9.0})
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before


def test_fid_progress_writes_its_curve(tmp_path):
    class Ref:  # the reference statistics' part of the provenance
        def add_inputs(self, prov):
            pass

    rows = [{c: None for c in fid_progress.COLUMNS} | {"step": s, "metric": "FD-EffNetLite0-128", "value": v,
                                                        "precision": 0.5, "recall": 0.25}
            for s, v in ((2, 80.0), (4, 60.5))]
    df = pd.DataFrame(rows, columns=list(fid_progress.COLUMNS))
    results = [{"protocol": "FD-EffNetLite0-128", "reference": {"stats_sha256": "0" * 64}}]
    (tmp_path / "model").mkdir()
    (tmp_path / "ae").mkdir()
    p = {"sampler": {"seed": 0}, "metrics": {"seed": 0}, "n_samples": 8}
    fid_progress._write(p, {"name": "d", "steps": 4}, tmp_path / "model", tmp_path / "ae", Ref(), df, results, "d",
                        tmp_path / "out", 1)
    curves = tmp_path / "out" / CURVES_DIR
    tb = _tb_scalars(curves / TB_DIR)
    assert tb["FD-EffNetLite0-128"] == [(2, 80.0), (4, 60.5)] and "inception_score" not in tb
    assert _tsv(curves / PLOTS_DIR / "FD-EffNetLite0-128.tsv") == [(2, 80.0), (4, 60.5)]
    assert json.loads((curves / SUMMARY_FILE).read_text())["FD-EffNetLite0-128"] == 60.5


def test_dvc_curves_collects_every_run_and_dvc_plots_show_renders_them(tmp_path):
    """`specmatch dvc curves` copies each run's curves of a stage folder into one folder; the
    dvc.yaml entry of that folder (`x: step`, as the project's dvc.yaml declares it) makes `dvc
    plots show` render every run's curves with their own steps and values."""
    dvc = BIN / "dvc"
    if not dvc.exists():
        pytest.skip("no dvc in the venv")
    repo = tmp_path / "repo"
    stage = repo / "results" / "t" / "diffusion"
    runs = {"u": {10: 0.5, 20: 0.25}, "v": {10: 0.9, 20: 0.6, 30: 0.4}}
    for run, losses in runs.items():
        with Curves(stage / run, 0, True) as c:
            for s, loss in losses.items():
                c.log(s, {"loss": loss, "lr": 1e-4, "update": "g"})
    (stage / "u" / "diffusion.json").write_text("{}")  # the other files of an output are not curves
    env = {"DVC_NO_ANALYTICS": "1", "HOME": str(tmp_path), "PATH": f"{BIN}:/usr/bin:/bin"}
    proc = subprocess.run([str(BIN / "specmatch"), "dvc", "curves", str(stage), str(repo / "results" / "t" / "nope"),
                           "--out", str(repo / "results" / "t" / "curves" / "diffusion")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    collected = repo / "results" / "t" / "curves"
    assert sorted(p.relative_to(collected).as_posix() for p in collected.rglob("*") if p.is_file()) == [
        "diffusion/u/loss.tsv", "diffusion/u/lr.tsv", "diffusion/v/loss.tsv", "diffusion/v/lr.tsv"]
    # the same run in a second folder would be ambiguous
    clash = subprocess.run([str(BIN / "specmatch"), "dvc", "curves", str(stage), str(stage), "--out", str(tmp_path / "x")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert clash.returncode != 0 and "collect each stage" in clash.stderr and not (tmp_path / "x").exists()
    (repo / "dvc.yaml").write_text("plots:\n  - results/t/curves:\n      x: step\n")
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=repo, env=env, check=True, timeout=120)
    proc = subprocess.run([str(dvc), "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = json.loads(proc.stdout)["data"]
    for run, losses in runs.items():
        data = shown[f"results/t/curves/diffusion/{run}/loss.tsv"][0]["content"]["data"]["values"]
        assert [int(d["step"]) for d in data] == list(losses)
        assert [float(d["loss"]) for d in data] == pytest.approx(list(losses.values()))
