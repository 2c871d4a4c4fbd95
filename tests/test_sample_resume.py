"""`specmatch sample`'s work folder: finished shards survive a failed merge into an output on
another file system, damaged shards are found and made again on resume, and a work folder or an
autoencoder that is not this run's is refused naming what differs.

Through the CLI (in-process `cli.main`) with a 2-step U-ViT on the micro autoencoder's latents,
10 samples in 4 shards (3, 3, 3, 1): a second or two per run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from specmatch import cli
from specmatch.data import reader
from specmatch.runtime import integrity

from conftest import MICRO_AE_RUN, load_split

UVIT = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
        "train": {"steps": 2, "batch_size": 8, "device": "cpu", "lr": 1e-3, "ema_decay": 0.5,
                  "checkpoint_every": 100, "log_every": 1}}
DPM = {"method": "dpm-solver", "steps": 3, "n_samples": 10, "shard_size": 3, "batch_size": 2, "device": "cpu",
       "seed": 4}
SHARDS = [f"shard-{j:05d}.npz" for j in range(4)]


pytestmark = pytest.mark.usefixtures("fresh_integrity")


@pytest.fixture(scope="module")
def models_(micro_latents, tmp_path_factory):
    """(autoencoder, U-ViT, another U-ViT (other seed), another autoencoder named 'micro' too,
    a complete sample run of the first U-ViT: (work, out))."""
    from specmatch.autoencoder import train as ae_train
    from specmatch.diffusion import sample, train

    data, ae, lat = micro_latents
    root = tmp_path_factory.mktemp("sresume")
    train.train(UVIT, lat, root / "uvit", "uvit", run_dir=root / "urun")
    train.train({**UVIT, "train": {**UVIT["train"], "seed": 7}}, lat, root / "uvit2", "uvit2", run_dir=root / "urun2")
    ae_train.train({**MICRO_AE_RUN, "train": {**MICRO_AE_RUN["train"], "seed": 1}}, data, root / "aerun2",
                   root / "ae2", "micro")
    sample.sample(root / "uvit", ae, DPM, "s", root / "out", work_dir=root / "work")
    return ae, root / "uvit", root / "uvit2", root / "ae2", (root / "work", root / "out")


def _args(model, ae, out, work, params=DPM) -> list[str]:
    return ["sample", "--model", str(model), "--autoencoder", str(ae), "--name", "s", "--params", json.dumps(params),
            "--out", str(out), "--work-dir", str(work)]


def _protocol(out: Path) -> dict:
    return json.loads((out / "sampling.json").read_text())


def _reference(models_):
    return load_split(models_[4][1], "samples")


def _same_samples(out: Path, models_) -> None:
    images, labels = load_split(out, "samples")
    ref_images, ref_labels = _reference(models_)
    assert images.tobytes() == ref_images.tobytes() and labels.tolist() == ref_labels.tolist()


def _shards_intact(work: Path) -> None:
    for name in SHARDS:
        with np.load(work / name, allow_pickle=False) as z:  # every member read whole: zip CRCs checked
            arrays = {k: z[k] for k in z.files}
        assert len(arrays["images"]) == len(arrays["sources"]) == (1 if name == SHARDS[-1] else 3)


# --------------------------------------------------------------------------- another file system


def _emulate_other_file_system(monkeypatch, work: Path) -> None:
    """Links and renames out of the work folder fail with EXDEV, as between two file systems."""
    real_link, real_rename = os.link, os.rename
    inside = str(work.resolve()) + os.sep

    def crosses(src, dst) -> bool:
        return os.path.abspath(src).startswith(inside) != os.path.abspath(dst).startswith(inside)

    def link(src, dst, *a, **k):
        if crosses(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_link(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        if crosses(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "rename", rename)


def test_failed_merge_across_file_systems_keeps_every_work_shard(tmp_path, models_, capsys, monkeypatch):
    ae, uvit, _, _, (work0, _) = models_
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(work0, work)
    _emulate_other_file_system(monkeypatch, work)
    from specmatch.render import figures

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # the merge fails after every shard went into the output
        m.setattr(figures, "image_grid", full_disk)
        with pytest.raises(OSError, match="No space left"):
            cli.main(_args(uvit, ae, out, work))
    assert not out.exists()
    _shards_intact(work)
    # The next attempt finds every shard: nothing to make again, the same samples.
    assert cli.main(_args(uvit, ae, out, work)) == 0, capsys.readouterr().err[-3000:]
    assert _protocol(out)["generated_now"] == 0
    _same_samples(out, models_)
    _shards_intact(work)
    # Copied, not linked: the output's shards are files of their own.
    assert os.stat(out / "samples-00000.npz").st_ino != os.stat(work / SHARDS[0]).st_ino


def _other_device(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev != os.stat(b).st_dev


def test_output_on_a_real_other_file_system_leaves_the_work_shards(tmp_path, models_, capsys):
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and _other_device(shm, tmp_path)):
        pytest.skip("/dev/shm is not a writable file system other than the temporary folder's")
    ae, uvit, _, _, (work0, _) = models_
    work = tmp_path / "work"
    shutil.copytree(work0, work)
    out = Path(tempfile.mkdtemp(dir=shm, prefix="specmatch-test-")) / "out"
    try:
        assert cli.main(_args(uvit, ae, out, work)) == 0, capsys.readouterr().err[-3000:]
        _same_samples(out, models_)
        _shards_intact(work)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


# --------------------------------------------------------------------------- damaged work shards


def _damage_images(shard: Path) -> None:
    """Flip bits in the middle of the images: the zip directory and the labels stay readable."""
    images = reader._member_memmap(shard, "images.npy")
    pos = images.offset + images.nbytes // 2
    del images
    data = bytearray(shard.read_bytes())
    data[pos:pos + 8] = bytes(b ^ 0xFF for b in data[pos:pos + 8])
    shard.write_bytes(bytes(data))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("record", ["sha256 recorded", "interrupted pass (no record)"])
def test_resume_remakes_a_damaged_work_shard_and_names_it(tmp_path, models_, capsys, caplog, record):
    ae, uvit, _, _, (work0, _) = models_
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(work0, work)
    if record != "sha256 recorded":
        for side in work.glob("*.sha256"):
            side.unlink()
    bad = work / SHARDS[1]
    _damage_images(bad)
    with caplog.at_level(logging.WARNING, logger="specmatch.diffusion.sample"):
        assert cli.main(_args(uvit, ae, out, work)) == 0, capsys.readouterr().err[-3000:]
    warned = [r.getMessage() for r in caplog.records if "damaged work shard" in r.getMessage()]
    assert len(warned) == 1 and str(bad) in warned[0] and "generating it again" in warned[0], warned
    assert ("sha256" in warned[0]) == (record == "sha256 recorded")
    assert _protocol(out)["generated_now"] == 3
    _same_samples(out, models_)
    # ... and is recorded again: the next run keeps every shard.
    shutil.rmtree(out)
    caplog.clear()
    assert cli.main(_args(uvit, ae, out, work)) == 0
    assert _protocol(out)["generated_now"] == 0 and not [r for r in caplog.records if "damaged" in r.getMessage()]


# --------------------------------------------------------------------------- whose work folder


def test_work_folder_without_settings_is_not_merged_into_another_model(tmp_path, models_, capsys):
    ae, _, uvit2, _, (work0, _) = models_
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(work0, work)
    (work / "settings.json").unlink()
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    rc = cli.main(_args(uvit2, ae, out, work))
    err = capsys.readouterr().err
    assert rc == 2 and f"{work}: 4 shard(s)" in err and "no settings.json" in err, err[-3000:]
    assert not out.exists()
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # nothing removed or remade


def test_work_folder_of_another_model_or_settings_names_what_differs(tmp_path, models_, capsys):
    ae, uvit, uvit2, _, (work0, _) = models_
    work, out = tmp_path / "work", tmp_path / "out"
    shutil.copytree(work0, work)
    held = json.loads((work / "settings.json").read_text())
    rc = cli.main(_args(uvit2, ae, out, work))
    err = capsys.readouterr().err
    assert rc == 2 and f"{work} holds the shards of another sampling run" in err, err[-3000:]
    assert f"the model's weights: sha256 {held['model_sha256']}" in err
    assert integrity.file_sha256(uvit2 / "model.safetensors") in err
    assert "autoencoder's weights" not in err  # only what differs is named
    rc = cli.main(_args(uvit, ae, out, work, {**DPM, "seed": 5}))
    err = capsys.readouterr().err
    assert rc == 2 and "key 'seed': 4 in settings.json, 5 now" in err and "model's weights" not in err
    assert not out.exists()


def test_autoencoder_of_the_same_name_but_not_the_models_is_refused(tmp_path, models_, capsys):
    ae, uvit, _, ae2, _ = models_
    assert json.loads((ae2 / "autoencoder.json").read_text())["name"] == "micro"
    rc = cli.main(_args(uvit, ae2, tmp_path / "out", tmp_path / "work"))
    err = capsys.readouterr().err
    want = integrity.file_sha256(ae / "provenance.json")
    assert rc == 2 and f"--autoencoder {ae2}" in err and want in err and "same name 'micro'" in err, err[-3000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    # A copy of the right autoencoder is the same autoencoder.
    same = tmp_path / "ae-copy"
    shutil.copytree(ae, same)
    assert cli.main(_args(uvit, same, tmp_path / "out", tmp_path / "work")) == 0, capsys.readouterr().err[-3000:]


def test_work_folder_identity_covers_the_autoencoder(tmp_path, models_, capsys, caplog):
    """Where the lineage cannot be followed (the model's latent cache gone), the work folder's
    fingerprint still tells another autoencoder's shards apart."""
    ae, uvit, _, ae2, (work0, _) = models_
    model = tmp_path / "uvit"
    shutil.copytree(uvit, model)
    rec = json.loads((model / "provenance.json").read_text())
    for i in rec["inputs"]:
        if i["role"] == "latents":
            i["path"] = str(tmp_path / "gone")
    (model / "provenance.json").write_text(json.dumps(rec))  # the weights' record is unchanged
    work = tmp_path / "work"
    shutil.copytree(work0, work)
    with caplog.at_level(logging.INFO, logger="specmatch.diffusion.sample"):
        rc = cli.main(_args(model, ae2, tmp_path / "out", work))
    err = capsys.readouterr().err
    assert any("only the autoencoder's name" in r.getMessage() for r in caplog.records)
    held = json.loads((work / "settings.json").read_text())
    assert rc == 2 and f"the autoencoder's weights: sha256 {held['autoencoder_sha256']}" in err, err[-3000:]
    assert integrity.file_sha256(ae2 / "model.safetensors") in err
    assert not (tmp_path / "out").exists()
    np.testing.assert_equal(sorted(p.name for p in work.glob("shard-*.npz")), SHARDS)
