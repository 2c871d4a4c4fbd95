"""`specmatch data add`: a user's dataset folder under DVC (checked first, then `dvc add`), and
its round trip through a DVC remote."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from specmatch.cli import main as cli_main

BIN = Path(sys.executable).parent



def test_data_add_versions_a_dataset_folder_and_push_pull_restores_it(tmp_path, capsys, monkeypatch):
    """`specmatch data add` wraps `dvc add`: the pointer file appears, and the folder survives a
    round trip through a local remote byte for byte; bad paths are refused before DVC runs."""
    import hashlib

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{BIN}:{__import__('os').environ.get('PATH', '')}")
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    raw = tmp_path / "data" / "raw" / "mine"
    raw.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 10, 200)).save(raw / f"{i}.png")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw.iterdir()}
    assert cli_main(["data", "add", "data/raw/mine"]) == 0
    assert "tracked by DVC (mine.dvc)" in capsys.readouterr().out
    assert (tmp_path / "data" / "raw" / "mine.dvc").is_file()
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "r", str(tmp_path / "remote")], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "push", "-q"], cwd=tmp_path, check=True)
    shutil.rmtree(raw)
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    subprocess.run([str(BIN / "dvc"), "pull", "-q"], cwd=tmp_path, check=True)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw.iterdir()} == digest
    # refused: no images, outside the repository, missing
    (tmp_path / "empty").mkdir()
    assert cli_main(["data", "add", "empty"]) == 2
    assert "no image files" in capsys.readouterr().err
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    assert cli_main(["data", "add", str(outside)]) == 2
    assert "outside the repository" in capsys.readouterr().err
    assert cli_main(["data", "add", "nope"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
