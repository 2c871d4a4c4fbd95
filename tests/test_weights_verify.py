"""Reading weights is verifying: every stage that loads a trained autoencoder or diffusion model
checks the weights file against the sha256 that the stage which wrote it listed in the folder's
provenance.json, once per process; `SPECMATCH_VERIFY=0` skips it and the provenance of what is
made says so. A damaged `stats.npz` is named with the stage that makes it again.

Through the CLI (in-process `cli.main`, so torch is imported once), on the micro autoencoder and
a 2-step U-ViT: seconds each.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from specmatch import cli
from specmatch.runtime import hashing, integrity, weights

from conftest import MICRO_AE_RUN

UVIT = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
        "train": {"steps": 2, "batch_size": 8, "device": "cpu", "lr": 1e-3, "ema_decay": 0.5,
                  "checkpoint_every": 100, "log_every": 1, "snapshot_steps": [1]}}
DPM = {"method": "dpm-solver", "steps": 2, "n_samples": 4, "shard_size": 2, "batch_size": 2, "device": "cpu",
       "seed": 4}
METRICS = {"net": "efficientnet-lite0", "device": "cpu", "batch_size": 16}


pytestmark = pytest.mark.usefixtures("fresh_integrity")


@pytest.fixture(scope="module")
def trained(micro_latents, tmp_path_factory):
    """(dataset, autoencoder, latents, U-ViT with a snapshot of step 1, a second autoencoder of
    the same name trained with another seed)."""
    from specmatch.autoencoder import train as ae_train
    from specmatch.diffusion import train

    data, ae, lat = micro_latents
    root = tmp_path_factory.mktemp("wverify")
    train.train(UVIT, lat, root / "uvit", "uvit", run_dir=root / "urun")
    other = {**MICRO_AE_RUN, "train": {**MICRO_AE_RUN["train"], "seed": 1}}
    ae_train.train(other, data, root / "aerun2", root / "ae2", "micro")
    return data, ae, lat, root / "uvit", root / "ae2"


def _touch_later(path: Path) -> None:
    # a different mtime even on coarse-timestamp file systems: the memo keys on (path, size, mtime)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def flip_byte(path: Path, prefix: str = "") -> None:
    """Flip one bit in the middle of the data of the largest tensor whose name starts with
    `prefix`: the header stays valid, so only the sha256 can tell."""
    header = weights.safetensors_header(path)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    name = max((k for k in header if k != "__metadata__" and k.startswith(prefix)),
               key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    start, stop = header[name]["data_offsets"]
    data[8 + n + (start + stop) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    _touch_later(path)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recorded(folder: Path, rel: str = "model.safetensors") -> str:
    return json.loads((folder / "provenance.json").read_text())["outputs"]["files"][rel]


def _extract(ae: Path, data: Path, out: Path) -> list[str]:
    return ["extract-latents", "--autoencoder", str(ae), "--dataset", str(data), "--name", "micro",
            "--params", json.dumps(MICRO_AE_RUN), "--out", str(out)]


def _sample(model: Path, ae: Path, out: Path, work: Path) -> list[str]:
    return ["sample", "--model", str(model), "--autoencoder", str(ae), "--name", "s", "--params", json.dumps(DPM),
            "--out", str(out), "--work-dir", str(work)]


def _assert_refused(rc: int, err: str, w: Path, folder: Path) -> None:
    """Exit 2, one line naming the file, the recorded and the found sha256 and the record."""
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err
    assert f"{w}: sha256 {hashing.sha256_file(w)} does not match sha256 {_recorded(folder, w.relative_to(folder).as_posix())}" \
        f" listed in {folder / 'provenance.json'}" in err, err[-3000:]
    assert "SPECMATCH_VERIFY=0" in err


# --------------------------------------------------------------------------- autoencoder


def test_extract_latents_refuses_autoencoder_with_a_flipped_byte(tmp_path, trained, capsys):
    data, ae, _, _, _ = trained
    bad = _copy(ae, tmp_path / "ae")
    flip_byte(bad / "model.safetensors")
    rc = cli.main(_extract(bad, data, tmp_path / "lat"))
    _assert_refused(rc, capsys.readouterr().err, bad / "model.safetensors", bad)
    assert not (tmp_path / "lat").exists()


def test_another_runs_weights_copied_in_are_refused_unless_verification_is_off(tmp_path, trained, capsys,
                                                                              monkeypatch):
    data, ae, _, _, ae2 = trained
    mixed = _copy(ae, tmp_path / "ae")
    shutil.copyfile(ae2 / "model.safetensors", mixed / "model.safetensors")  # well-formed, same shapes
    rc = cli.main(_extract(mixed, data, tmp_path / "lat"))
    _assert_refused(rc, capsys.readouterr().err, mixed / "model.safetensors", mixed)
    assert not (tmp_path / "lat").exists()
    # The explicit opt-out reads it, and the latent cache's provenance records that it was skipped.
    monkeypatch.setenv(integrity.ENV, "0")
    assert cli.main(_extract(mixed, data, tmp_path / "lat")) == 0, capsys.readouterr().err[-3000:]
    check = json.loads((tmp_path / "lat" / "provenance.json").read_text())["environment"]["input_verification"]
    assert check["sha256"] == "off" and check["env"] == "0" and check["unchecked_files"] >= 1


def test_verified_load_is_recorded_as_on(tmp_path, trained, capsys):
    data, ae, _, _, _ = trained
    assert cli.main(_extract(ae, data, tmp_path / "lat")) == 0, capsys.readouterr().err[-3000:]
    check = json.loads((tmp_path / "lat" / "provenance.json").read_text())["environment"]["input_verification"]
    assert check["sha256"] == "on" and check["unchecked_files"] == 0 and check["checked_files"] >= 1


def test_weights_without_their_record_are_refused(tmp_path, trained, capsys):
    data, ae, _, _, _ = trained
    part = tmp_path / "ae"
    part.mkdir()
    for name in ("model.safetensors", "autoencoder.json"):  # copied in part: no provenance.json
        shutil.copyfile(ae / name, part / name)
    rc = cli.main(_extract(part, data, tmp_path / "lat"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{part / 'model.safetensors'}: cannot be verified: {part / 'provenance.json'} is missing" in err
    assert "SPECMATCH_VERIFY=0" in err


# --------------------------------------------------------------------------- diffusion model


def test_sample_refuses_diffusion_model_with_a_flipped_ema_byte(tmp_path, trained, capsys):
    _, ae, _, uvit, _ = trained
    bad = _copy(uvit, tmp_path / "uvit")
    flip_byte(bad / "model.safetensors", "ema.")
    rc = cli.main(_sample(bad, ae, tmp_path / "out", tmp_path / "work"))
    _assert_refused(rc, capsys.readouterr().err, bad / "model.safetensors", bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_sample_refuses_autoencoder_with_a_flipped_byte(tmp_path, trained, capsys):
    _, ae, _, uvit, _ = trained
    bad = _copy(ae, tmp_path / "ae")
    flip_byte(bad / "model.safetensors")
    rc = cli.main(_sample(uvit, bad, tmp_path / "out", tmp_path / "work"))
    _assert_refused(rc, capsys.readouterr().err, bad / "model.safetensors", bad)
    assert not (tmp_path / "out").exists()


def test_snapshot_weights_are_verified(tmp_path, trained):
    from specmatch.diffusion import artifact
    from specmatch.errors import SpecmatchError

    _, _, _, uvit, _ = trained
    bad = _copy(uvit, tmp_path / "uvit")
    snap = artifact.snapshot_path(bad, 1)
    artifact.load(bad, snapshot=1)
    flip_byte(snap)
    with pytest.raises(SpecmatchError) as e:
        artifact.load(bad, snapshot=1)
    assert f"{snap}: sha256 {hashing.sha256_file(snap)} does not match sha256 " \
           f"{_recorded(bad, 'snapshots/' + snap.name)}" in str(e.value)
    artifact.load(bad)  # the final weights are intact


def test_each_weights_file_is_hashed_once_per_process(tmp_path, trained, capsys, monkeypatch):
    """`sample` loads both networks (verifying them) and keys its work folder by their sha256:
    each weights file is read for its hash once."""
    _, ae, _, uvit, _ = trained
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(os.path.realpath(p)) or real(p))
    assert cli.main(_sample(uvit, ae, tmp_path / "out", tmp_path / "work")) == 0, capsys.readouterr().err[-3000:]
    hashed = sorted(c for c in calls if c.endswith(".safetensors"))
    assert hashed == sorted([os.path.realpath(uvit / "model.safetensors"), os.path.realpath(ae / "model.safetensors")])


# --------------------------------------------------------------------------- reference statistics


@pytest.fixture(scope="module")
def ref_dir(trained, tmp_path_factory):
    from specmatch.metrics import reference

    out = tmp_path_factory.mktemp("wref") / "ref"
    reference.ref(trained[0], METRICS, "ref", out)
    return out


@pytest.mark.parametrize("verify", ["1", "0"])
def test_fid_calc_with_a_damaged_stats_npz_names_it_and_the_stage(tmp_path, trained, ref_dir, capsys, monkeypatch,
                                                                   verify):
    """With the check on the sha256 mismatch is reported; with it off, the damaged zip member
    (a CRC error) is reported instead of a bare BadZipFile. Either way: the file, exit 2, and
    `fid ref` to make it again."""
    data = trained[0]
    ref = _copy(ref_dir, tmp_path / "ref")
    npz = ref / "stats.npz"
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    npz.write_bytes(bytes(raw))
    _touch_later(npz)
    monkeypatch.setenv(integrity.ENV, verify)
    rc = cli.main(["fid", "calc", "--samples", str(data), "--split", "test", "--ref", str(ref), "--name", "x",
                   "--params", json.dumps(METRICS), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert f"{npz}: " in err and "specmatch fid ref" in err, err[-3000:]
    if verify == "1":
        assert f"does not match sha256 {_recorded(ref, 'stats.npz')}" in err
    else:
        assert "corrupt or truncated npz file" in err and "BadZipFile" in err
    assert not (tmp_path / "m").exists()
