"""A rule's job: it stops when the Snakemake that started it is killed (no orphans), and its log
keeps the lines the stage wrote (a traceback stays one line per frame)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_repo, dag_env

from specmatch.ops import lifeline

BIN = Path(sys.executable).parent


def _gone(pid: int) -> bool:
    """Exited (a zombie whose parent has not reaped it counts: it runs no more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


@pytest.mark.slow
def test_a_job_stops_when_its_snakemake_is_killed(tmp_path):
    """`snakemake` SIGKILLed while prepare_data runs (a dataset that would take minutes): the
    stage, two processes below it (Snakemake -> the rule's bash -> specmatch), gets SIGTERM and
    stops, saying why in the rule's log; the rule's shell exits with it."""
    repo = copy_repo(tmp_path / "repo")
    data = repo / "results" / "tiny" / "data"
    with open(tmp_path / "snakemake.out", "w") as out:
        proc = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", "--config", "preset=tiny",
                                 "datasets={embedded: {n_train: 400000}}", "--", "results/tiny/data/embedded"],
                                cwd=repo, env=dag_env(), stdout=out, stderr=subprocess.STDOUT)
    stage = shell = None
    try:
        deadline = time.monotonic() + 300
        while stage is None:  # the stage's temporary output (.embedded.<host>@<pid>@<random>.tmp)
            assert proc.poll() is None, (tmp_path / "snakemake.out").read_text()[-3000:]
            assert time.monotonic() < deadline, "prepare_data did not start"
            tmp = [p for p in data.iterdir() if p.name.endswith(".tmp")] if data.is_dir() else []
            stage = int(tmp[0].name.split("@")[1]) if tmp else None
            time.sleep(0.05)
        shell = lifeline.parent_of(stage)
        assert lifeline.snakemake_above(stage) == proc.pid == lifeline.parent_of(shell)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while not (_gone(stage) and _gone(shell)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(stage), "the stage runs on after its Snakemake was killed"
        assert _gone(shell), "the rule's shell runs on after its Snakemake was killed"
        log = (repo / "results/tiny/logs/prepare_data/embedded.log").read_text()
        assert log.endswith(f"specmatch: Snakemake (pid {proc.pid}), which started this job, is gone: "
                            "stopping (SIGTERM)\n"), log[-2000:]
        assert not (data / "embedded").exists()
    finally:
        for pid in (stage, shell):  # what a failed check leaves running
            if pid is not None and not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stage_traceback_keeps_its_lines_in_a_log_file(tmp_path):
    """Stage output to a file (a rule's `> {log} 2>&1`) passes through the CLI's progress-bar
    filter: a traceback, whose newlines Python writes apart from the text, keeps them, and so does
    a line the stage prints before it."""
    code = ("import sys\nfrom specmatch.runtime import console\nconsole.for_log_files()\n"
            "print('a line before', file=sys.stderr)\n"
            "try:\n    {}['x']\nexcept KeyError as e:\n    raise ValueError('boom') from e\n")
    log = tmp_path / "rule.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                       timeout=120)
    lines = log.read_text().splitlines()
    assert lines[0] == "a line before" and lines[1] == "Traceback (most recent call last):", lines
    assert "KeyError: 'x'" in lines and "ValueError: boom" in lines, lines
    assert "The above exception was the direct cause of the following exception:" in lines, lines
    assert log.read_text().endswith("ValueError: boom\n")
