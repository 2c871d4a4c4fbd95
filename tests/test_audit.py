"""`specmatch audit`: the lineage of a stage output re-verified from its provenance records.

A real chain of stages (prepare-data -> train-ae -> extract-latents, micro sizes) runs in a
temporary repository root; the tests then damage it the ways a user could (a flipped byte in a
checkpoint, a deleted shard, an extra file, an input re-made after its consumer, a DVC stage
out of date) and check that the audit fails and names exactly that file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specmatch.ops import audit
from specmatch.cli import main as cli_main

from conftest import MICRO_AE_RUN

BIN = Path(sys.executable).parent
DATA = {"source": "embedded", "resolution": 32, "seed": 0, "n_train": 12, "n_test": 4, "shard_size": 8}


def _chain(root: Path) -> dict[str, Path]:
    """prepare-data -> train-ae -> extract-latents under `root`, run from `root` (the records'
    paths are relative to it, as in a repository)."""
    from specmatch.autoencoder import latents
    from specmatch.autoencoder import train as ae_train
    from specmatch.data.prepare import prepare

    prepare(DATA, "embedded", Path("results/data"))
    ae_train.train(MICRO_AE_RUN, Path("results/data"), Path("runs/ae"), Path("results/ae"), "micro")
    latents.extract(MICRO_AE_RUN, Path("results/ae"), Path("results/data"), "micro", Path("results/lat"))
    return {k: root / "results" / k for k in ("data", "ae", "lat")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-repo")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        _chain(root)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def repo(pristine, tmp_path, monkeypatch):
    """A fresh copy of the pristine chain for each test (records hold relative paths)."""
    root = tmp_path / "repo"
    shutil.copytree(pristine, root)
    monkeypatch.chdir(root)
    return root


def _audit(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(["audit", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_intact_lineage_passes_and_reaches_the_raw_inputs(repo, capsys):
    code, out = _audit(["results/lat/manifest.json", "--no-dvc"], capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("results/lat  [extract-latents micro") and lines[0].endswith(" ok")
    # the latents' two stage inputs, and the autoencoder's own dataset input (verified once)
    assert any(line.strip().startswith("results/ae  [train-ae micro; autoencoder") for line in lines)
    assert sum("results/data  [prepare-data" in line for line in lines) == 2
    assert sum("(verified above)" in line for line in lines) == 1
    tree, problems = audit.audit(repo / "results/lat", repo, dvc=False)
    assert problems == [] and {n.path for n in audit.walk(tree)} == {"results/lat", "results/ae", "results/data"}


def test_flipped_byte_in_a_checkpoint_fails_and_names_it(repo, capsys):
    ckpt = repo / "results/ae/model.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    ckpt.write_bytes(bytes(raw))
    code, out = _audit(["results/lat", "--no-dvc"], capsys)
    assert code == 1
    assert "modified: results/ae/model.safetensors" in out
    # the rest of the lineage still verifies: only that file is named
    _, problems = audit.audit(repo / "results/lat", repo, dvc=False)
    assert len(problems) == 1 and problems[0].startswith("modified: results/ae/model.safetensors")


def test_missing_shard_and_unrecorded_file_are_named(repo, capsys):
    shard = sorted((repo / "results/data").glob("train-*.npz"))[0]
    shard.unlink()
    (repo / "results/ae/notes.txt").write_text("added later\n")
    code, out = _audit(["results/lat", "--no-dvc"], capsys)
    assert code == 1
    assert f"missing: results/data/{shard.name}" in out
    assert "unrecorded: results/ae/notes.txt" in out


def test_input_remade_after_its_consumer_is_stale(repo, capsys, monkeypatch):
    from specmatch.autoencoder import train as ae_train

    run = json.loads(json.dumps(MICRO_AE_RUN))
    run["train"]["seed"] = 7  # another autoencoder in the same place
    ae_train.train(run, Path("results/data"), Path("runs/ae2"), Path("results/ae"), "micro")
    code, out = _audit(["results/lat", "--no-dvc"], capsys)
    assert code == 1
    assert "stale: results/ae was re-made after its consumer used it" in out
    assert "modified:" not in out  # the new autoencoder's own files match its own record
    assert _audit(["results/ae", "--no-dvc"], capsys)[0] == 0


def test_modified_weights_file_input_is_named(repo, capsys, tmp_path):
    """A plain-file input (how pretrained weights are recorded) is re-hashed too."""
    from specmatch.runtime import atomic
    from specmatch.runtime.provenance import Provenance

    weights = repo / "resources" / "w.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"weights v1")
    prov = Provenance("test-stage", "t", {})
    prov.add_input(weights, "weights:test")
    prov.add_input(Path("results/lat"), "latents")
    with atomic.atomic_dir(repo / "results/t") as tmp:
        (tmp / "table.csv").write_text("a,b\n1,2\n")
        prov.write(repo / "results/t", tmp)
    assert _audit(["results/t/table.csv", "--no-dvc"], capsys)[0] == 0
    weights.write_bytes(b"weights v2")
    code, out = _audit(["results/t/table.csv", "--no-dvc"], capsys)
    assert code == 1 and "modified: resources/w.pth (weights:test" in out


def test_not_a_stage_output_is_refused(repo, capsys, tmp_path):
    (tmp_path / "loose.txt").write_text("x")
    code, out = _audit([str(tmp_path / "loose.txt"), "--no-dvc"], capsys)
    assert code == 2 and "not in a stage output folder" in out
    code, out = _audit(["results/nothing-here"], capsys)
    assert code == 2 and "no such file or folder" in out


def test_json_output(repo, capsys):
    code, out = _audit(["results/lat", "--no-dvc", "--json"], capsys)
    rec = json.loads(out)
    assert code == 0 and rec["ok"] is True and [n["path"] for n in rec["lineage"]][0] == "results/lat"


def test_dvc_lock_cross_check_flags_a_stage_dvc_sees_changed(tmp_path, capsys, monkeypatch):
    """A stage output that still matches its own record but no longer matches dvc.lock (here:
    `dvc status` sees its parameters changed) is reported stale."""
    monkeypatch.chdir(tmp_path)
    env_path = f"{BIN}:{__import__('os').environ.get('PATH', '')}"
    monkeypatch.setenv("PATH", env_path)

    def run(*cmd):
        proc = subprocess.run(list(cmd), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    (tmp_path / "params.yaml").write_text(json.dumps({"data": DATA}) + "\n")
    run(str(BIN / "dvc"), "init", "--no-scm", "-q")
    cmd = (f"{BIN / 'specmatch'} prepare-data --name embedded --params "
           f"'{json.dumps(DATA)}' --out results/data")
    run(str(BIN / "dvc"), "stage", "add", "-q", "-n", "data", "-p", "data", "-o", "results/data", cmd)
    run(str(BIN / "dvc"), "repro", "-q")
    assert _audit(["results/data"], capsys)[0] == 0
    (tmp_path / "params.yaml").write_text(json.dumps({"data": {**DATA, "seed": 1}}) + "\n")
    code, out = _audit(["results/data"], capsys)
    assert code == 1 and "stale (dvc.lock): results/data" in out
    assert _audit(["results/data", "--no-dvc"], capsys)[0] == 0



def test_audit_from_another_folder_finds_the_root_its_records_name(repo, capsys, monkeypatch, tmp_path):
    """Run from outside the repository without --root, the audit reads the records from the root
    they were written in (each record names its folder relative to it), not from the working
    folder, where every file would be missing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out = _audit([str(repo / "results/lat/manifest.json"), "--no-dvc"], capsys)
    assert code == 0, out
    assert "missing" not in out and f"note: records read from the repository root {repo}" in out
    monkeypatch.chdir(repo / "results")  # a relative path below the root
    code, out = _audit(["ae", "--no-dvc"], capsys)
    assert code == 0 and out.startswith("results/ae  [train-ae micro"), out
    # damage is still found, named from the root
    (repo / "results/ae/model.safetensors").write_bytes(b"x")
    code, out = _audit([str(repo / "results/lat"), "--no-dvc"], capsys)
    assert code == 1 and "modified: results/ae/model.safetensors" in out
    # a stage folder moved away from the path its record names: say what to pass
    moved = tmp_path / "moved"
    shutil.copytree(repo / "results/data", moved)
    code, out = _audit([str(moved), "--no-dvc"], capsys)
    assert code == 2 and "written as 'results/data'" in out and "pass that root as --root" in out
