"""`specmatch container check`: the shipped definition passes; each defect a definition file can
carry (the ones a build would silently accept included) is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from specmatch import __version__
from specmatch.ops import container
from specmatch.cli import main as cli_main
from specmatch.errors import SpecmatchError

REPO = Path(__file__).resolve().parents[1]
DEF = REPO / "containers" / "specmatch.def"


def test_shipped_definition_passes(capsys):
    assert container.check(DEF) == []
    assert cli_main(["container", "check", str(DEF)]) == 0
    assert f"{DEF}: ok" in capsys.readouterr().out


def test_parse_reads_header_and_sections():
    d = container.parse(DEF)
    assert d.header["bootstrap"] == "docker" and d.header["from"].startswith("debian:12.")
    assert {"arguments", "files", "post", "environment", "labels", "help", "runscript", "test"} == set(d.order)
    assert "exec specmatch" in d.sections["runscript"]
    labels = container._labels(d.sections["labels"])
    assert labels["org.opencontainers.image.version"] == __version__


def _mutated(tmp_path, old: str, new: str) -> Path:
    text = DEF.read_text()
    assert old in text, old
    p = tmp_path / "x.def"
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize("old, new, expected", [
    ("%environment", "%enviroment", "%enviroment is not an Apptainer section (it would be ignored); did you mean %environment?"),
    ("%test", "%tset", "did you mean %test?"),
    ("%test", "%help2", "section %test is missing"),
    ("From: debian:12.11-slim", "From: debian:latest", "tag 'latest' is not a version"),
    ("From: debian:12.11-slim", "From: debian", "has no tag"),
    ("From: debian:12.11-slim", "From: debian@sha256:abc", "malformed digest"),
    ("Bootstrap: docker", "Bootstrap: dockr", "unknown bootstrap agent 'dockr'"),
    ("Bootstrap: docker\n", "", "no `Bootstrap:` line"),
    ("org.opencontainers.image.version 0.1.0", "org.opencontainers.image.version 9.9.9",
     "version '9.9.9' differs from the package's"),
    ("org.opencontainers.image.version 0.1.0", "org.opencontainers.image.revision x", "no version label"),
    ("-r /opt/specmatch/requirements/lock.txt", "specmatch-deps", "does not install the pinned requirements"),
    ('exec specmatch "$@"', 'curl -sO https://example.org/w.pth && exec specmatch "$@"',
     "%runscript uses the network at run time (curl)"),
    ("    specmatch --version", "    pip install timm\n    specmatch --version", "%test uses the network at run time (pip install)"),
    ("    export HF_HUB_OFFLINE=1\n", "", "%environment does not set HF_HUB_OFFLINE=1"),
    ("    exec specmatch", "    python -c 'import torch; torch.hub.load(\"x\", \"y\")'\n    exec specmatch",
     "a model-hub download"),
])
def test_each_defect_is_named(tmp_path, old, new, expected):
    problems = container.check(_mutated(tmp_path, old, new))
    assert any(expected in p for p in problems), problems


def test_empty_required_section_and_duplicates(tmp_path):
    p = _mutated(tmp_path, '%runscript\n    exec specmatch "$@"', "%runscript\n    # nothing\n%help\n    again")
    problems = container.check(p)
    assert "section %runscript is empty" in problems and "section %help appears 2 times" in problems


def test_base_pinned_by_digest_passes(tmp_path):
    p = _mutated(tmp_path, "From: debian:12.11-slim", "From: debian@sha256:" + "a" * 64)
    assert container.check(p) == ["base image: cannot tell which Python the base 'debian@sha256:" + "a" * 64
                                  + "' offers (a Debian, Ubuntu or python image is known)"]


def test_network_at_build_time_is_fine_but_not_at_run_time(tmp_path):
    # %post downloads (pip, apt) are how images are built; the same in %environment is refused.
    assert "pip install" in container.parse(DEF).sections["post"] and container.check(DEF) == []
    p = _mutated(tmp_path, "    export TRANSFORMERS_OFFLINE=1", "    export TRANSFORMERS_OFFLINE=1\n    wget -q http://x/y")
    problems = container.check(p)
    assert any(s.startswith("%environment uses the network at run time (wget)") for s in problems), problems


def test_cli_exit_status_and_missing_file(tmp_path, capsys):
    bad = _mutated(tmp_path, "%labels", "%lables")
    assert cli_main(["container", "check", str(DEF), str(bad)]) == 2
    out = capsys.readouterr()
    assert f"{DEF}: ok" in out.out and "%lables is not an Apptainer section" in out.out
    assert "1 definition file(s) failed" in out.err
    assert cli_main(["container", "check", str(tmp_path / "none.def")]) == 2
    assert "no such definition file" in capsys.readouterr().err


def test_binds_follow_symlinks_to_shared_storage(tmp_path, capsys):
    repo, storage = tmp_path / "repo", tmp_path / "scratch" / "results"
    storage.mkdir(parents=True)
    (repo / "resources").mkdir(parents=True)
    (repo / "results").symlink_to(storage)
    # data/ is missing: a bind of a missing source would make apptainer fail, so it is left out
    assert container.binds(repo) == [str(repo / "resources"), f"{storage}:{repo / 'results'}"]
    cli_main(["container", "binds", "--root", str(repo)])
    assert capsys.readouterr().out.strip() == f"--bind {repo / 'resources'},{storage}:{repo / 'results'}"


def test_binds_print_nothing_without_folders(tmp_path, capsys):
    cli_main(["container", "binds", "--root", str(tmp_path)])
    assert capsys.readouterr().out == "\n"


@pytest.mark.parametrize("base, problem", [
    # the base of commit 004e497: Ubuntu 24.04 ships python3.12 only, and %post asks for python3.11
    ("nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04", "ubuntu 24.04 offers Python 3.12; the lock needs requires-python"),
    ("ubuntu:22.04", "ubuntu 22.04 offers Python 3.10"),
    ("debian:13.1-slim", "debian 13 offers Python 3.13"),
    ("python:3.12.8-slim-bookworm", "the official python image python:3.12.8-slim-bookworm offers Python 3.12"),
    ("rockylinux:9.3", "cannot tell which Python the base 'rockylinux:9.3' offers"),
])
def test_base_whose_python_is_not_the_locks_is_refused(tmp_path, base, problem):
    problems = container.check(_mutated(tmp_path, "From: debian:12.11-slim", f"From: {base}"))
    assert any(problem in p for p in problems), problems


def test_bases_with_the_locks_python_pass(tmp_path):
    for base in ("debian:bookworm-20250520-slim", "debian:12", "python:3.11.9-slim-bookworm"):
        assert container.check(_mutated(tmp_path, "From: debian:12.11-slim", f"From: {base}")) == [], base
    deb = _mutated(tmp_path, "Bootstrap: docker\nFrom: debian:12.11-slim",
                   "Bootstrap: debootstrap\nOSVersion: bookworm\nMirrorURL: http://deb.debian.org/debian")
    assert container.check(deb) == []
    assert container.base_python(container.parse(deb)) == ("3.11", "debian bookworm (debootstrap)")


@pytest.mark.parametrize("line, problem", [
    # the %environment of commit 004e497: the image's default beat the host's and the bind's folder
    ("export SPECMATCH_RESOURCES=${SPECMATCH_RESOURCES:-/work/resources}", "%environment sets SPECMATCH_RESOURCES"),
    ("export SPECMATCH_RESOURCES=${SPECMATCH_RESOURCES:-/work/resources}", "reads $SPECMATCH_RESOURCES"),
    ("export SPECMATCH_VERIFY=0", "%environment sets SPECMATCH_VERIFY"),
    ("export TORCH_HOME=/opt/torch", "%environment sets TORCH_HOME"),
    ("export DATA=${SCRATCH}/data", "reads $SCRATCH"),
])
def test_environment_that_overrides_the_host_is_refused(tmp_path, line, problem):
    p = _mutated(tmp_path, "    export HF_HUB_OFFLINE=1\n", f"    export HF_HUB_OFFLINE=1\n    {line}\n")
    assert any(problem in x for x in container.check(p)), container.check(p)


def test_environment_may_use_what_it_set_itself(tmp_path):
    p = _mutated(tmp_path, "    export HF_HUB_OFFLINE=1\n",
                 "    export HF_HUB_OFFLINE=1\n    export VENV=/opt/venv\n    export PYTHONPATH=$VENV/lib\n")
    assert container.check(p) == []


def test_build_arguments_render_and_need_defaults(tmp_path):
    d = container.parse(DEF)
    assert container.arguments(d) == {"TORCH_CUDA": "pypi", "GIT_COMMIT": "unknown", "GIT_DIRTY": "1"}
    r = container.render(d, {"TORCH_CUDA": "cu128", "GIT_COMMIT": "abc"})
    assert "org.specmatch.torch.cuda cu128" in r.sections["labels"] and "{{" not in "".join(r.sections.values())
    assert "SPECMATCH_GIT_COMMIT=abc" in r.sections["environment"]
    assert '"torch==${torch_v}+cu128"' in r.sections["post"]
    p = _mutated(tmp_path, "    TORCH_CUDA=pypi\n", "")
    assert any("{{ TORCH_CUDA }} has no default in %arguments" in x for x in container.check(p))
    with pytest.raises(SpecmatchError, match="TORCH_CUDA"):
        container.render(container.parse(p))
