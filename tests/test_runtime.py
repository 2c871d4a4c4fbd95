"""Runtime services: atomic files and folders, content hashes, provenance records.

Hashes are recomputed here with hashlib/json directly from the documented definitions,
never with the functions under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

from specmatch.runtime import atomic, hashing, provenance
from specmatch.runtime.provenance import Provenance

REPO = Path(__file__).resolve().parents[1]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# --------------------------------------------------------------------------- atomic_file


def test_atomic_file_success_replaces_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic.atomic_file(target, "wb") as f:
        f.write(b"new content")
        # while writing, the real name still holds the old content
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new content"
    assert _listing(tmp_path) == ["out.bin"]


def test_atomic_file_exception_mid_write_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_file(target, "w") as f:
            f.write("half of the new")
            f.flush()
            raise RuntimeError("boom")
    assert target.read_text() == "old content"
    assert _listing(tmp_path) == ["out.txt"]


def test_atomic_file_keyboard_interrupt_without_existing_file(tmp_path):
    target = tmp_path / "sub" / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_file(target, "wb") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not target.exists()
    assert _listing(tmp_path / "sub") == []


def test_write_text_and_bytes(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "héllo\n")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _listing(tmp_path) == ["a.txt", "b.bin"]


# --------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_replaces_existing_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from the previous run")
    (out / "keep_name.txt").write_text("old")
    with atomic.atomic_dir(out) as tmp:
        assert tmp.is_dir() and tmp != out and tmp.parent == out.parent
        assert tmp.name.startswith(".")
        assert list(tmp.iterdir()) == []
        (tmp / "keep_name.txt").write_text("new")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "f.bin").write_bytes(b"abc")
        # the real folder is untouched until the block ends
        assert (out / "stale.txt").exists()
    assert _listing(out) == ["keep_name.txt", "nested", "nested/f.bin"]
    assert (out / "keep_name.txt").read_text() == "new"
    # nothing left beside it (no temporary, no moved-aside old folder)
    assert _listing(tmp_path) == ["out", "out/keep_name.txt", "out/nested", "out/nested/f.bin"]


def test_atomic_dir_creates_new_folder(tmp_path):
    out = tmp_path / "a" / "b"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_leaves_existing_untouched_and_removes_temp(tmp_path, exc):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    seen = {}
    with pytest.raises(exc):
        with atomic.atomic_dir(out) as tmp:
            seen["tmp"] = tmp
            (tmp / "partial.txt").write_text("half")
            raise exc()
    assert not seen["tmp"].exists()
    assert _listing(out) == ["old.txt"]
    assert (out / "old.txt").read_text() == "old"
    assert _listing(tmp_path) == ["out", "out/old.txt"]


def test_atomic_dir_failure_without_existing_creates_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError):
        with atomic.atomic_dir(out) as tmp:
            (tmp / "f").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_outputs_get_umask_modes(tmp_path, umask_022):
    # temporaries are created 0600/0700; shared outputs must end up with the usual modes
    atomic.write_text(tmp_path / "f.txt", "x")
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        atomic.write_text(tmp / "inner.txt", "y")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "inner.txt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_dir_gives_privately_created_files_the_umask_mode(tmp_path, mask):
    """safetensors' save_file creates its file 0600 (as mkstemp does): weights written that way
    were unreadable by the group while every other output was not. Whatever writes a file in an
    output folder, the folder comes out with the mode a normally created file gets."""
    import torch
    from safetensors.torch import save_file

    old = os.umask(mask)
    try:
        assert atomic.file_mode() == 0o666 & ~mask
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
            atomic.write_text(tmp / "meta.json", "{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d").rglob("*") if p.is_file()}
    assert modes == {"model.safetensors": 0o666 & ~mask, "run.sh": 0o777 & ~mask, "meta.json": 0o666 & ~mask}


# --------------------------------------------------------------------------- hashing


def _make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    (root / ".hidden_tmp").write_bytes(b"ignored")
    (root / ".hidden_dir").mkdir()
    (root / ".hidden_dir" / "x").write_bytes(b"ignored too")


def _independent_tree(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = _sha(p.read_bytes())
    return out


def _independent_digest(files: dict[str, str]) -> str:
    return _sha("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode("utf-8"))


def test_hash_tree_matches_independent_hashes_and_skips_hidden(tmp_path):
    _make_tree(tmp_path)
    files = hashing.hash_tree(tmp_path)
    assert files == _independent_tree(tmp_path)
    assert set(files) == {"a.txt", "sub/b.bin", "sub/deeper/c"}
    assert list(files) == sorted(files)
    assert hashing.tree_digest(files) == _independent_digest(files)
    assert hashing.hash_tree(tmp_path, exclude=("a.txt",)).keys() == {"sub/b.bin", "sub/deeper/c"}


def test_tree_digest_stable_and_sensitive(tmp_path):
    _make_tree(tmp_path)
    d0 = hashing.tree_digest(hashing.hash_tree(tmp_path))
    assert hashing.tree_digest(hashing.hash_tree(tmp_path)) == d0
    # insertion order of the mapping does not matter
    files = hashing.hash_tree(tmp_path)
    assert hashing.tree_digest(dict(reversed(list(files.items())))) == d0
    # a one-byte content change
    data = bytearray((tmp_path / "sub" / "b.bin").read_bytes())
    data[100] ^= 1
    (tmp_path / "sub" / "b.bin").write_bytes(bytes(data))
    d1 = hashing.tree_digest(hashing.hash_tree(tmp_path))
    assert d1 != d0
    # a rename with the same content
    os.rename(tmp_path / "a.txt", tmp_path / "a2.txt")
    d2 = hashing.tree_digest(hashing.hash_tree(tmp_path))
    assert d2 not in (d0, d1)
    # moving a file into another folder (same name, same content)
    os.rename(tmp_path / "a2.txt", tmp_path / "sub" / "a2.txt")
    assert hashing.tree_digest(hashing.hash_tree(tmp_path)) not in (d0, d1, d2)
    # a new hidden file changes nothing
    before = hashing.tree_digest(hashing.hash_tree(tmp_path))
    (tmp_path / ".x.tmp").write_bytes(b"temp")
    assert hashing.tree_digest(hashing.hash_tree(tmp_path)) == before


def test_sha256_file_and_json(tmp_path):
    p = tmp_path / "big.bin"
    data = os.urandom((1 << 20) * 2 + 123)  # spans several read chunks
    p.write_bytes(data)
    assert hashing.sha256_file(p) == _sha(data)
    obj = {"b": [1, 2.5, None], "a": {"z": "é", "y": True}}
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    assert hashing.canonical_json(obj) == canon
    assert hashing.sha256_json(obj) == _sha(canon.encode("ascii"))
    with pytest.raises(ValueError):
        hashing.canonical_json({"x": float("nan")})


def test_image_stream_hash_independent_of_batching():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    expected = _sha(b"|u1|4,5,3|" + imgs.tobytes())
    h = hashing.ImageStreamHash((4, 5, 3))
    h.update(imgs[:2]).update(imgs[2:3]).update(imgs[3:])
    assert h.hexdigest() == expected and h.count == 7
    assert hashing.sha256_images(imgs) == expected
    # a different item shape with the same bytes gives a different hash
    assert hashing.sha256_images(imgs.reshape(7, 5, 4, 3)) != expected
    with pytest.raises(ValueError):
        hashing.ImageStreamHash((4, 5, 3)).update(imgs.astype(np.int16))
    labels = np.arange(5, dtype=np.int64)
    assert hashing.ImageStreamHash((), dtype="<i8").update(labels).hexdigest() == _sha(b"<i8||" + labels.tobytes())


# --------------------------------------------------------------------------- provenance


PARAMS = {"zeta": 1, "alpha": {"list": [3, 1, 2], "s": "x"}, "f": 0.5, "none": None}


def _stage_output(tmp_path: Path, name: str, params=PARAMS) -> tuple[Path, dict]:
    out = tmp_path / name
    prov = Provenance("unit-stage", f"run-{name}", params, seeds={"seed": 3})
    with atomic.atomic_dir(out) as tmp:
        (tmp / "data.bin").write_bytes(b"payload " + name.encode())
        (tmp / "sub").mkdir()
        (tmp / "sub" / "more.json").write_text('{"k": 1}\n')
        rec = prov.write(out, tmp)
    return out, rec


def test_provenance_record_contents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, rec = _stage_output(tmp_path, "out")
    on_disk = json.loads((out / "provenance.json").read_text())
    assert on_disk == rec
    assert rec["schema"] == "specmatch.provenance/1"
    assert rec["stage"] == "unit-stage" and rec["run"] == "run-out"
    assert rec["params"] == PARAMS
    canon = json.dumps(PARAMS, sort_keys=True, separators=(",", ":"))
    assert rec["params_sha256"] == _sha(canon.encode())
    files = rec["outputs"]["files"]
    assert set(files) == {"data.bin", "sub/more.json"}  # every file, the record itself excluded
    for rel, digest in files.items():
        assert digest == _sha((out / rel).read_bytes())
    assert rec["outputs"]["sha256"] == _independent_digest(files)
    assert rec["outputs"]["path"] == "out"  # relative to the working directory
    assert rec["seeds"] == {"seed": 3}
    t = rec["time"]
    assert t["start"] <= t["end"] and t["wall_s"] >= 0
    # written atomically: no temporaries in the output folder
    assert sorted(p.name for p in out.iterdir()) == ["data.bin", "provenance.json", "sub"]


def test_provenance_environment_and_code():
    torch = pytest.importorskip("torch")
    env = provenance.environment()
    assert env["python"] == platform.python_version()
    assert env["torch"] == torch.__version__
    assert env["hostname"]
    assert isinstance(env["gpus"], list)
    code = provenance.code_version()
    assert code["package"] == "specmatch"
    import specmatch

    assert code["version"] == specmatch.__version__


def test_provenance_git_commit_inside_checkout():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the checkout has no commits yet (git rev-parse HEAD fails)")
    provenance.code_version.cache_clear()
    code = provenance.code_version()
    assert re.fullmatch(r"[0-9a-f]{40}", code["git_commit"])
    assert code["git_commit"] == head.stdout.strip()
    assert isinstance(code["git_dirty"], bool)


def test_provenance_scheduler_reads_slurm(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)
    assert "slurm_job_id" not in provenance.scheduler()
    monkeypatch.setenv("SLURM_JOB_ID", "424242")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    sched = provenance.scheduler()
    assert sched["slurm_job_id"] == "424242" and sched["slurm_ntasks"] == "4"
    _, rec = _stage_output(tmp_path, "slurm")
    assert rec["scheduler"]["slurm_job_id"] == "424242"


def test_provenance_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, _ = _stage_output(tmp_path, "first")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "img.png").write_bytes(b"not really a png")
    single = tmp_path / "single.txt"
    single.write_bytes(b"one file")

    prov = Provenance("second", "r", {"a": 1})
    prov.add_input(first, "dataset")
    prov.add_input(plain, "images")
    prov.add_input(single, "weights")
    prov.add_input(plain, "pre-hashed", sha256="ab" * 32)
    with pytest.raises(FileNotFoundError):
        prov.add_input(tmp_path / "missing", "nothing")
    out = tmp_path / "second"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "r.txt").write_text("r")
        rec = prov.write(out, tmp)
    by_role = {i["role"]: i for i in rec["inputs"]}
    assert by_role["dataset"]["kind"] == "stage-output"
    assert by_role["dataset"]["provenance_sha256"] == _sha((first / "provenance.json").read_bytes())
    assert by_role["dataset"]["path"] == "first"
    assert by_role["images"]["kind"] == "folder"
    assert by_role["images"]["sha256"] == _independent_digest({"img.png": _sha(b"not really a png")})
    assert by_role["weights"] == {"role": "weights", "path": "single.txt", "kind": "file",
                                  "sha256": _sha(b"one file")}
    assert by_role["pre-hashed"]["sha256"] == "ab" * 32
    assert "nothing" not in by_role


def test_provenance_params_hash_changes_with_params(tmp_path):
    _, r1 = _stage_output(tmp_path, "p1", params={"a": 1, "b": [1, 2]})
    _, r2 = _stage_output(tmp_path, "p2", params={"b": [1, 2], "a": 1})
    _, r3 = _stage_output(tmp_path, "p3", params={"a": 1, "b": [2, 1]})
    assert r1["params_sha256"] == r2["params_sha256"]
    assert r1["params_sha256"] != r3["params_sha256"]
