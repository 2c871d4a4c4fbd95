"""Progress bars in log files: one line per update, no carriage-return frames."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from tqdm import tqdm

from specmatch.runtime.console import LineStream

from conftest import REPO


def test_line_stream_turns_tqdm_frames_into_lines():
    buf = io.StringIO()
    stream = LineStream(buf)
    for _ in tqdm(range(5), desc="work", file=stream, mininterval=0, miniters=1):
        pass
    with tqdm(total=3, desc="inner", file=stream, leave=False, mininterval=0) as bar:  # clears itself on close
        bar.update(3)
    stream.write("a log line\n")
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("work:   0%") and lines[5].startswith("work: 100%") and "5/5" in lines[5]
    assert sum(line.startswith("inner") for line in lines) >= 1 and lines[-1] == "a log line"
    assert all(line.strip() for line in lines)


def test_a_stage_logging_to_a_file_writes_readable_lines(tmp_path):
    """A stage whose stderr is a file (as in every DAG rule) logs its progress bar as a few whole
    lines: the first and the final state, not a frame per update."""
    log = tmp_path / "stage.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("TQDM_MININTERVAL", None)
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "specmatch.cli", "prepare-data", "--name", "e", "--out",
                        str(tmp_path / "data"), "--params",
                        '{"source": "embedded", "resolution": 16, "n_train": 300, "n_test": 20, "seed": 0}'],
                       stderr=f, stdout=subprocess.DEVNULL, env=env, check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text
    bars = [line for line in text.splitlines() if line.startswith("e/train")]
    assert 1 <= len(bars) <= 3 and "300/300" in bars[-1], bars
