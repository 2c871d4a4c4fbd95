"""The sampling stage (`specmatch sample`): per-index labels and noise, 1 vs 2 processes,
resumption from the work folder, the output read by `fid calc` and the generation table, the
autoencoder and guidance checks, and the guidance wiring.

A micro autoencoder's latent cache (4x16x16) and `tiny` networks trained for a few steps keep
every run to seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from specmatch.data import sample_folder
from specmatch.diffusion import sample, train
from specmatch.errors import SpecmatchError
from specmatch.metrics import reference, scoring
from specmatch.report import generation_table as tables

from conftest import load_split

UVIT = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
        "train": {"steps": 2, "batch_size": 8, "device": "cpu", "lr": 1e-3, "ema_decay": 0.5,
                  "checkpoint_every": 100, "log_every": 1}}
# Four steps with half the labels dropped: enough for the conditional and null-label predictions
# to differ visibly in uint8 images (after two steps only ~2% of the pixels move by one level).
SIT = {"autoencoder": "micro", "model": "SiT-tiny/2", "process": {"kind": "linear"}, "conditional": True,
       "train": {"steps": 4, "batch_size": 8, "device": "cpu", "lr": 1e-3, "ema_decay": 0.5, "label_dropout": 0.5,
                 "checkpoint_every": 100, "log_every": 1}}
DPM = {"method": "dpm-solver", "steps": 3, "n_samples": 10, "shard_size": 3, "batch_size": 2, "device": "cpu",
       "seed": 4}
EM_CFG = {"method": "euler-maruyama", "steps": 4, "n_samples": 10, "shard_size": 3, "batch_size": 2, "device": "cpu",
          "cfg_scale": 2.0, "cfg_interval": [0.0, 0.7], "seed": 4}
METRICS = {"net": "efficientnet-lite0", "device": "cpu", "batch_size": 16}


@pytest.fixture(scope="module")
def models_(micro_latents, tmp_path_factory):
    """(dataset, autoencoder, U-ViT folder, SiT folder): 2-step unconditional U-ViT on the VP
    path, 4-step conditional SiT on the linear path, both on the micro cache (48 entries)."""
    data, ae, lat = micro_latents
    root = tmp_path_factory.mktemp("diffsample")
    train.train(UVIT, lat, root / "uvit", "uvit", run_dir=root / "urun")
    train.train(SIT, lat, root / "sit", "sit", run_dir=root / "srun")
    return data, ae, root / "uvit", root / "sit"


@pytest.fixture(scope="module")
def uvit_samples(models_, tmp_path_factory):
    """A complete DPM-Solver run of the U-ViT: (work folder, output folder)."""
    _, ae, uvit, _ = models_
    root = tmp_path_factory.mktemp("usamples")
    sample.sample(uvit, ae, DPM, "u-dpm", root / "out", work_dir=root / "work")
    return root / "work", root / "out"


def _cli(args: list[str], env_extra: dict | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **(env_extra or {})}
    launcher = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", str(port)]
    return subprocess.run([*launcher, "-m", "specmatch.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _sample_args(model, ae, params, out, work):
    return ["sample", "--model", str(model), "--autoencoder", str(ae), "--name", "s", "--params", json.dumps(params),
            "--out", str(out), "--work-dir", str(work)]


def _protocol(out: Path) -> dict:
    return json.loads((out / sample_folder.FILE).read_text())


# --------------------------------------------------------------------------- per-index draws


def test_class_balanced_labels():
    n, c = 50, 7  # 50 = 7 * 7 + 1: one class gets 8, the others 7
    full = sample.labels_for(np.arange(n), n, c, seed=3, class_balanced=True)
    assert full.dtype == np.int64 and len(full) == n
    counts = np.bincount(full, minlength=c)
    assert sorted(counts.tolist()) == [7] * 6 + [8] and counts.sum() == n
    assert set(counts.tolist()) <= {n // c, -(-n // c)}
    assert full.tolist() != sorted(full.tolist())  # permuted, not in class order
    # A function of (seed, global index): any subset, in any order, is the slice of the full list.
    idx = np.array([41, 3, 17, 17, 0, 49])
    np.testing.assert_array_equal(sample.labels_for(idx, n, c, 3, True), full[idx])
    np.testing.assert_array_equal(sample.labels_for(np.arange(n), n, c, 3, True), full)
    assert sample.labels_for(np.arange(n), n, c, 4, True).tolist() != full.tolist()
    exact = sample.labels_for(np.arange(21), 21, 3, seed=0, class_balanced=True)
    assert np.bincount(exact).tolist() == [7, 7, 7]


def test_iid_and_unconditional_labels():
    n, c = 300, 7
    full = sample.labels_for(np.arange(n), n, c, seed=3, class_balanced=False)
    assert full.dtype == np.int64 and full.min() >= 0 and full.max() < c
    assert set(full.tolist()) == set(range(c))
    idx = np.array([299, 5, 150])
    np.testing.assert_array_equal(sample.labels_for(idx, n, c, 3, False), full[idx])
    # i.i.d. labels of an index do not depend on the total either.
    np.testing.assert_array_equal(sample.labels_for(idx, 1000, c, 3, False), full[idx])
    assert sample.labels_for(np.arange(n), n, c, 4, False).tolist() != full.tolist()
    zero = sample.labels_for(np.arange(5), 5, 0, seed=3, class_balanced=True)
    assert zero.dtype == np.int64 and zero.tolist() == [0] * 5


def test_noise_depends_on_the_global_index_only():
    shape = (4, 16, 16)
    full = sample.noise_for(range(6), shape, seed=2)
    assert full.shape == (6, *shape)
    part = sample.noise_for([3, 4], shape, seed=2)
    assert part.numpy().tobytes() == full[3:5].numpy().tobytes()
    assert not (sample.noise_for([3], shape, seed=9)[0] == full[3]).all()
    assert not (full[0] == full[1]).all()


# --------------------------------------------------------------------------- processes, resumption


@pytest.mark.slow
@pytest.mark.parametrize("which", ["uvit-dpm", "sit-em-cfg"])
def test_two_processes_write_the_same_samples(tmp_path, models_, which):
    """torchrun with 2 gloo processes writes the images and labels one process writes: shards
    (4 of sizes 3, 3, 3, 1) go round-robin to the ranks, noise and labels come from the global
    index and the SDE noise from the batch's first index. Both runs use 1 thread per process, so
    the comparison is bitwise."""
    data, ae, uvit, sit = models_
    model, params = (uvit, DPM) if which == "uvit-dpm" else (sit, EM_CFG)
    env = {"OMP_NUM_THREADS": "1"}
    one = _cli(_sample_args(model, ae, params, tmp_path / "o1", tmp_path / "w1"), env)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _cli(_sample_args(model, ae, params, tmp_path / "o2", tmp_path / "w2"), env, torchrun=2)
    assert two.returncode == 0, two.stderr[-4000:]
    im1, lb1 = load_split(tmp_path / "o1", "samples")
    im2, lb2 = load_split(tmp_path / "o2", "samples")
    assert im1.shape == (10, 32, 32, 3) and im1.dtype == np.uint8
    assert len({im.tobytes() for im in im1}) == 10  # every index its own noise: no repeated sample
    assert im1.tobytes() == im2.tobytes()
    assert lb1.tolist() == lb2.tolist()
    num_classes = json.loads((model / "diffusion.json").read_text())["num_classes"]
    assert num_classes == (0 if which == "uvit-dpm" else 22)
    expected = sample.labels_for(np.arange(10), 10, num_classes, params["seed"], True)
    assert lb1.tolist() == expected.tolist()
    p1, p2 = _protocol(tmp_path / "o1"), _protocol(tmp_path / "o2")
    assert (p1["world_size"], p2["world_size"]) == (1, 2)
    assert p1["generated_now"] == p2["generated_now"] == 10
    assert p1["fingerprint"] == p2["fingerprint"]
    assert sorted(p.name for p in (tmp_path / "w2").glob("shard-*.npz")) == [f"shard-{j:05d}.npz" for j in range(4)]


def test_resumes_missing_and_damaged_shards(tmp_path, models_, uvit_samples):
    _, ae, uvit, _ = models_
    work0, out0 = uvit_samples
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(work0, work)
    ref_images, ref_labels = load_split(out0, "samples")
    assert _protocol(out0)["generated_now"] == 10
    # Nothing missing: only the merge runs.
    assert sample.sample(uvit, ae, DPM, "u-dpm", out, work_dir=work).generated_now == 0
    # A lost shard (3 samples) is made again; the output is the same.
    (work / "shard-00001.npz").unlink()
    shutil.rmtree(out)
    assert sample.sample(uvit, ae, DPM, "u-dpm", out, work_dir=work).generated_now == 3
    images, labels = load_split(out, "samples")
    assert images.tobytes() == ref_images.tobytes() and labels.tolist() == ref_labels.tolist()
    assert _protocol(out)["generated_now"] == 3
    # A damaged shard (truncated) is regenerated, not trusted; so is the short last one (1 sample).
    for j, size in ((2, 3), (3, 1)):
        shard = work / f"shard-{j:05d}.npz"
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        assert sample.sample(uvit, ae, DPM, "u-dpm", out, work_dir=work).generated_now == size
        images, labels = load_split(out, "samples")
        assert images.tobytes() == ref_images.tobytes() and labels.tolist() == ref_labels.tolist()


def test_resumed_run_keeps_the_nfe_in_its_protocol(tmp_path, models_, uvit_samples):
    _, ae, uvit, _ = models_
    work0, out0 = uvit_samples
    shutil.copytree(work0, tmp_path / "work")
    res = sample.sample(uvit, ae, DPM, "u-dpm", tmp_path / "out", work_dir=tmp_path / "work")
    assert res.generated_now == 0
    assert res.nfe_per_sample == _protocol(out0)["nfe_per_sample"] > 0


def test_work_dir_of_other_settings_is_not_reused(tmp_path, models_, uvit_samples):
    _, ae, uvit, _ = models_
    work0, out0 = uvit_samples
    work = tmp_path / "work"
    shutil.copytree(work0, work)
    try:
        res = sample.sample(uvit, ae, {**DPM, "seed": 5}, "u-dpm", tmp_path / "out", work_dir=work)
    except SpecmatchError as e:  # refusing the folder is as good as regenerating it
        assert "fingerprint" in str(e) or "settings" in str(e)
        assert not (tmp_path / "out").exists()
    else:
        assert res.seed == 5 and res.generated_now == 10
        assert load_split(tmp_path / "out", "samples")[0].tobytes() != load_split(out0, "samples")[0].tobytes()


def test_work_root_keys_the_work_folder_by_settings(tmp_path, models_, uvit_samples):
    _, ae, uvit, _ = models_
    res = sample.sample(uvit, ae, DPM, "u-dpm", tmp_path / "out", work_root=tmp_path / "root")
    assert [p.name for p in (tmp_path / "root").iterdir()] == [res.fingerprint[:12]]
    assert res.fingerprint == _protocol(uvit_samples[1])["fingerprint"]
    assert load_split(tmp_path / "out", "samples")[0].tobytes() == load_split(uvit_samples[1], "samples")[0].tobytes()


# --------------------------------------------------------------------------- downstream


def test_output_feeds_fid_calc_and_generation_table(tmp_path, models_, uvit_samples):
    data, _, _, _ = models_
    _, out = uvit_samples
    assert (out / "grid.png").is_file() and (out / "provenance.json").is_file()
    reference.ref(data, METRICS, "ref", tmp_path / "ref")
    m = scoring.calc(out, "samples", tmp_path / "ref", METRICS, "gen-u", tmp_path / "m")
    assert m.metric == "FD-EffNetLite0" and np.isfinite(m.value) and m.samples["n"] == 10
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    s = saved["sampling"]
    assert (s["sampler"], s["steps"], s["cfg_scale"], s["cfg_interval"]) == ("dpm-solver", 3, 1.0, [0.0, 1.0])
    assert s["diffusion"] == "uvit" and s["autoencoder"] == "micro" and s["weights"] == "ema"
    assert s["n_samples"] == 10 and s["nfe_per_sample"] >= 3
    # The diffusion run's training seed travels from its summary to the sample set and the table.
    train_seed = json.loads((models_[2] / "diffusion.json").read_text())["seed"]
    assert isinstance(train_seed, int) and s["train_seed"] == train_seed
    df = tables.write_generation([tmp_path / "m"], "gen", tmp_path / "table")
    csv = pd.read_csv(tmp_path / "table" / "generation.csv")
    assert len(csv) == len(df) == 1
    row = csv.iloc[0]
    assert (row["sampler"], int(row["steps"]), row["metric"]) == ("dpm-solver", 3, "FD-EffNetLite0")
    assert row["value"] == pytest.approx(m.value, rel=1e-5)
    assert row["train_seed"] == train_seed
    md = (tmp_path / "table" / "generation.md").read_text()
    assert "FD-EffNetLite0" in md and "dpm-solver" in md
    for text in (md, (tmp_path / "table" / "generation.csv").read_text()):
        assert "FID" not in text


# --------------------------------------------------------------------------- errors, guidance


def test_wrong_autoencoder_and_guidance_on_unconditional_refused(tmp_path, models_):
    _, ae, uvit, sit = models_
    other = tmp_path / "ae-other"
    shutil.copytree(ae, other)
    summary = json.loads((other / "autoencoder.json").read_text())
    summary["name"] = "other-ae"
    (other / "autoencoder.json").write_text(json.dumps(summary))
    with pytest.raises(SpecmatchError, match=r"'micro'.*'other-ae'"):
        sample.sample(uvit, other, DPM, "x", tmp_path / "out", work_dir=tmp_path / "work")
    with pytest.raises(SpecmatchError, match="unconditional"):
        sample.sample(uvit, ae, {**DPM, "cfg_scale": 2.0}, "x", tmp_path / "out", work_dir=tmp_path / "work")
    with pytest.raises(SpecmatchError, match="not a trained diffusion model"):
        sample.sample(tmp_path, ae, DPM, "x", tmp_path / "out", work_dir=tmp_path / "work")
    # A sampler that does not fit the model's process is refused before anything is written.
    with pytest.raises(SpecmatchError, match="dpm-solver"):
        sample.sample(sit, ae, {**DPM, "n_samples": 2}, "x", tmp_path / "out", work_dir=tmp_path / "work")
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_guidance_wiring(tmp_path, models_):
    _, ae, _, sit = models_
    base = {**EM_CFG, "n_samples": 4, "shard_size": 4, "batch_size": 4}

    def images(scale, interval):
        p = {**base, "cfg_scale": scale, "cfg_interval": interval}
        tag = f"{scale}-{interval[0]}-{interval[1]}"
        res = sample.sample(sit, ae, p, "g", tmp_path / f"out-{tag}", work_dir=tmp_path / f"work-{tag}")
        assert res.cfg_scale == scale and list(res.cfg_interval) == interval
        return load_split(tmp_path / f"out-{tag}", "samples")

    plain, labels = images(1.0, [0.0, 1.0])
    assert images(1.0, [0.2, 0.5])[0].tobytes() == plain.tobytes()  # scale 1: guidance is a no-op
    guided, glabels = images(3.0, [0.0, 0.7])
    assert glabels.tolist() == labels.tolist()
    assert guided.tobytes() != plain.tobytes()
    # The interval is applied: guiding at every t (the first Euler-Maruyama step is at t = 1,
    # outside [0, 0.7]) gives other samples again.
    assert images(3.0, [0.0, 1.0])[0].tobytes() != guided.tobytes()
