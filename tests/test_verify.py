"""Reading is verifying: manifest sha256s checked on read, weight files that fail with their
name, and temporaries of killed stages cleaned up by the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from specmatch.data import reader, shards
from specmatch.errors import SpecmatchError
from specmatch.runtime import atomic, hashing, integrity, provenance, weights


def _forget_checks(monkeypatch):
    """A new process's state of the checks: no file hashed, checked or skipped yet."""
    for name in ("_memo", "_checked", "_unchecked"):
        monkeypatch.setattr(integrity, name, type(getattr(integrity, name))())


@pytest.fixture(autouse=True)
def _fresh_integrity(monkeypatch):
    monkeypatch.delenv(integrity.ENV, raising=False)
    _forget_checks(monkeypatch)


def _dataset(tmp_path: Path, n=7, shard_size=3) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir()
    rng = np.random.default_rng(1)
    w = shards.ShardWriter(folder, "train", 4, shard_size)
    for i in range(n):
        w.add(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), i % 2, i)
    shards.write_manifest(folder, {"schema": shards.MANIFEST_SCHEMA, "name": "ds", "resolution": 4,
                                   "splits": {"train": w.close()}})
    return folder


def _zero_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid:mid + n] = bytes(n)
    path.write_bytes(bytes(data))
    # a different mtime even on coarse-timestamp file systems: the memo keys on (path, size, mtime)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _zero_in_images(path: Path, n: int = 64) -> None:
    """Zero `n` bytes in the middle of the shard's image data (the zip stays readable)."""
    images = reader._member_memmap(path, "images.npy")
    start = images.offset + images.nbytes // 2 - n // 2
    assert images.nbytes >= n
    del images
    data = bytearray(path.read_bytes())
    data[start:start + n] = bytes(n)
    path.write_bytes(bytes(data))


def _shard_sha(folder: Path, i: int) -> str:
    return json.loads((folder / "manifest.json").read_text())["splits"]["train"]["shards"][i]["sha256"]


# --------------------------------------------------------------------------- shard sha256 on read


def test_reader_refuses_shard_with_zeroed_bytes_naming_file_and_both_hashes(tmp_path):
    folder = _dataset(tmp_path)
    bad = folder / "train-00001.npz"
    _zero_middle(bad)
    r = reader.SplitReader(folder, "train")  # lazy: construction does not read the shards
    r.get([0, 1])  # shard 0 is intact
    with pytest.raises(SpecmatchError) as e:
        r.get([3])
    msg = str(e.value)
    assert str(bad) in msg
    assert _shard_sha(folder, 1) in msg and hashing.sha256_file(bad) in msg
    assert integrity.record()["sha256"] == "on"
    # the whole-split readers too
    with pytest.raises(SpecmatchError, match="train-00001.npz"):
        list(shards.iter_image_batches(folder, "train", 4))


def test_cache_readers_verify_their_shards(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    files = []
    for j in range(2):
        shards.write_npz(folder / f"shard-{j:05d}.npz", {"targets": np.full((2, 3), j, np.float32)})
        files.append({"file": f"shard-{j:05d}.npz", "count": 2,
                      "sha256": hashing.sha256_file(folder / f"shard-{j:05d}.npz")})

    class Cache(reader.ShardedCache):
        SCHEMA, MEMBERS, WHAT, STAGE = "test/1", ("targets",), "test cache", "test"

    (folder / "manifest.json").write_text(json.dumps({"schema": "test/1", "count": 4, "shape": [3],
                                                      "shards": files}))
    np.testing.assert_array_equal(Cache(folder).get([0, 3])[0][:, 0], [0, 1])
    _zero_middle(folder / "shard-00001.npz", 16)
    c = Cache(folder)
    c.get([0])
    with pytest.raises(SpecmatchError, match="shard-00001.npz.*sha256") as e:
        c.get([2])
    assert files[1]["sha256"] in str(e.value)
    Cache(folder, verify=False).get([0])  # skipping is explicit


@pytest.mark.parametrize("how", ["env", "param"])
def test_skip_option_reads_it_and_provenance_records_the_skip(tmp_path, monkeypatch, how):
    folder = _dataset(tmp_path)
    _zero_in_images(folder / "train-00001.npz")  # 64 zeroed bytes in the middle of the images
    if how == "env":
        monkeypatch.setenv(integrity.ENV, "0")
        r = reader.SplitReader(folder, "train")
    else:
        r = reader.SplitReader(folder, "train", verify=False)
    images, labels = r.get(np.arange(7))
    assert images.shape == (7, 4, 4, 3) and labels.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert (images[3:6].reshape(-1)[72 - 32:72 + 32] == 0).all()  # the zeroed bytes were read
    rec = integrity.record()
    assert rec["sha256"] == "off" and rec["unchecked_files"] == 3
    # ... and the record of what is made with it says so, in its environment section
    prov = provenance.Provenance("test", "run", {})
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x.txt").write_text("x")
        written = prov.write(tmp_path / "out", tmp)
    assert written["environment"]["input_verification"]["sha256"] == "off"
    on_disk = json.loads((tmp_path / "out" / provenance.RECORD_NAME).read_text())
    assert on_disk["environment"]["input_verification"]["unchecked_files"] == 3


def test_provenance_records_verification_on_by_default(tmp_path):
    folder = _dataset(tmp_path)
    reader.SplitReader(folder, "train").get(np.arange(7))
    env = provenance.environment()["input_verification"]
    assert env == {"sha256": "on", "env": None, "checked_files": 3, "unchecked_files": 0}


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(integrity.ENV, "maybe")
    with pytest.raises(SpecmatchError, match="SPECMATCH_VERIFY"):
        integrity.enabled()


def test_memo_hashes_each_file_once_per_process(tmp_path, monkeypatch):
    folder = _dataset(tmp_path)
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    for _ in range(3):  # repeated readers in one process
        reader.SplitReader(folder, "train", cache_shards=1).get(np.arange(7))
    list(shards.iter_shards(folder, "train"))
    assert sorted(calls) == ["train-00000.npz", "train-00001.npz", "train-00002.npz"]
    # deflated shards are evicted from the LRU and opened again: still hashed once
    _forget_checks(monkeypatch)
    calls.clear()
    for j in range(2):
        shards.write_npz(tmp_path / f"d{j}.npz", {"a": np.full((2,), j)}, compression="deflate")
    arr = reader.ShardedArrays([tmp_path / "d0.npz", tmp_path / "d1.npz"], [2, 2], ("a",), "test", cache_shards=1,
                               sha256s=[hashing.sha256_file(tmp_path / f"d{j}.npz") for j in range(2)])
    for i in [0, 2, 0, 2, 1, 3]:
        arr.get([i])
    assert sorted(calls) == ["d0.npz", "d1.npz"]
    # a file that changes (size or mtime) is hashed again
    _zero_middle(tmp_path / "d1.npz", 4)
    with pytest.raises(SpecmatchError, match="d1.npz"):
        reader.ShardedArrays([tmp_path / "d1.npz"], [2], ("a",), "test",
                             sha256s=[arr.sha256s[1]]).get([0])
    assert sorted(calls) == ["d0.npz", "d1.npz", "d1.npz"]


# --------------------------------------------------------------------------- weight files


def _safetensors(path: Path) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 3)}, path,
              metadata={"fingerprint": "fp"})
    return path


def test_load_safetensors_names_file_and_problem(tmp_path):
    good = _safetensors(tmp_path / "model.safetensors")
    t = weights.load_safetensors(good)
    assert sorted(t) == ["a", "b"] and float(t["a"][999]) == 999.0
    assert weights.safetensors_header(good)["__metadata__"] == {"fingerprint": "fp"}
    data = good.read_bytes()
    cases = {
        "cut": (data[: len(data) - 100], "truncated safetensors file: its tensors need"),
        "header": (data[:40], "truncated safetensors file: the header says"),
        "tiny": (data[:5], "not a safetensors file"),
        "pickle": (b"PK\x03\x04" + bytes(200), "not a safetensors file"),
        "json": (data[:8] + b"{" * (len(data) - 8), "corrupt safetensors header"),
    }
    for name, (content, what) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(content)
        with pytest.raises(SpecmatchError) as e:
            weights.load_safetensors(p)
        assert str(p) in str(e.value) and what in str(e.value), (name, str(e.value))
    with pytest.raises(SpecmatchError, match="missing"):
        weights.load_safetensors(tmp_path / "absent.safetensors")


def test_eval_ae_with_truncated_weights_names_the_file(tmp_path, micro_latents, capsys):
    """Through the CLI: an error naming the file, exit code 2, no traceback. (The autoencoder's
    loader reads model.safetensors with runtime.weights.load_safetensors.)"""
    import shutil

    from conftest import MICRO_AE_RUN
    from specmatch import cli

    data, ae, _lat = micro_latents
    bad = tmp_path / "ae"
    shutil.copytree(ae, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc = cli.main(["eval-ae", "--autoencoder", str(bad), "--dataset", str(data), "--name", "micro",
                   "--params", json.dumps(MICRO_AE_RUN), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{w}: truncated safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "eval").exists()


def test_checkpoint_load_of_truncated_weights_is_a_specmatch_error(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from specmatch.runtime import checkpoint

    ckpt = checkpoint.save(tmp_path, 1, {"w": torch.ones(100)}, {"step": 1}, "k", "f")
    w = ckpt / checkpoint.WEIGHTS
    w.write_bytes(w.read_bytes()[:-40])
    monkeypatch.setattr(checkpoint, "verify", lambda *a, **k: {})  # past the sha256 check
    with pytest.raises(SpecmatchError, match=f"{w}: truncated"):
        checkpoint.load(ckpt, "k", "f")


def test_load_torch_weights_names_corrupt_file(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "w.pth"
    torch.save({"x": torch.ones(50)}, p)
    assert float(weights.load_torch_weights(p)["x"].sum()) == 50.0
    p.write_bytes(p.read_bytes()[: 100])
    with pytest.raises(SpecmatchError, match=f"{p}: cannot be read as PyTorch weights"):
        weights.load_torch_weights(p)
    with pytest.raises(SpecmatchError, match="missing"):
        weights.load_torch_weights(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- temporaries of killed stages


_CHILD = textwrap.dedent("""
    import sys, time
    from specmatch.runtime import atomic
    with atomic.atomic_dir(sys.argv[1]) as tmp:
        (tmp / "partial.bin").write_bytes(b"x" * 10)
        with atomic.atomic_file(sys.argv[2]) as f:
            f.write(b"half")
            f.flush()
            print(tmp, flush=True)
            time.sleep(600)
""")


def _child(out: Path, f: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(f)], stdout=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline().strip()
    assert line, "child did not enter atomic_dir"
    return proc, Path(line)


def test_temporaries_of_sigkilled_process_are_removed_live_ones_kept(tmp_path):
    out, f = tmp_path / "out", tmp_path / "file.bin"
    dead, dead_tmp = _child(out, f)
    live, live_tmp = _child(out, f)
    try:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(timeout=30)
        assert f".out.{atomic._host()}@{dead.pid}@" in dead_tmp.name
        assert dead_tmp.is_dir() and live_tmp.is_dir()
        dead_files = [p for p in tmp_path.glob(f".file.bin.*@{dead.pid}@*.tmp")]
        assert len(dead_files) == 1
        # unrelated hidden files, an output whose name extends this one, another host's: kept
        other_host = tmp_path / ".out.elsewhere@1@abcd1234.tmp"
        other_host.mkdir()
        longer = tmp_path / f".out.x.{atomic._host()}@{dead.pid}@abcd1234.tmp"
        longer.mkdir()
        with atomic.atomic_dir(out) as tmp:
            (tmp / "done.txt").write_text("ok")
        assert not dead_tmp.exists() and live_tmp.is_dir()
        assert other_host.is_dir() and longer.is_dir()
        assert (out / "done.txt").read_text() == "ok"
        atomic.write_text(f, "whole")
        assert not dead_files[0].exists() and f.read_text() == "whole"
        assert len(list(tmp_path.glob(f".file.bin.*@{live.pid}@*.tmp"))) == 1
        # past the age limit even another host's is removed
        old = time.time() - atomic.STALE_AFTER_S - 60
        os.utime(other_host, (old, old))
        atomic.remove_stale_temporaries(out)
        assert not other_host.exists() and live_tmp.is_dir()
    finally:
        for p in (dead, live):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            p.stdout.close()


def test_safetensors_bytes_are_the_same_in_every_process(tmp_path):
    """safetensors keeps `__metadata__` in a hash map ordered differently in each process; our
    writer sorts it, so the same weights give the same bytes (and sha256) in every run. Checked
    in separate processes (the order is decided per process), against safetensors' own reader."""
    import subprocess
    import sys

    import torch
    from safetensors import safe_open

    code = ("import sys, torch; from specmatch.runtime.weights import save_safetensors; "
            "save_safetensors({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(4, dtype=torch.bfloat16)}, "
            "sys.argv[1], {'kind': 'k', 'step': '7', 'fingerprint': 'f' * 64, 'zeta': 'z', 'alpha': 'é'})")
    paths = [tmp_path / f"w{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=120)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {"kind": "k", "step": "7", "fingerprint": "f" * 64, "zeta": "z", "alpha": "é"}
        assert f.get_tensor("b").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert f.get_tensor("a").dtype == torch.bfloat16
