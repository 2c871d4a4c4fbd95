"""Progress output that reads well in a terminal and in a log file.

Stages show tqdm bars. On a terminal a bar redraws itself in place with carriage returns; in a
log file (a DAG rule's `2> {log}`, a SLURM job's output) every redraw would stay as one more
frame on a single ever-growing line. When stderr is not a terminal, `for_log_files` therefore
(1) makes tqdm redraw at most once per `LOG_INTERVAL` seconds (its `TQDM_MININTERVAL` default,
read when tqdm is first imported; child processes such as torchrun's workers inherit it) and
(2) wraps stderr so that each redraw becomes one line of its own, terminal control sequences
removed. What the bars print is unchanged: the log holds one line per update interval, plus the
final state of each bar. Every other write passes through as written: `print` sends its text and
its newline in two writes, so only the newline that ends a bar's frame may be dropped.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

LOG_INTERVAL = 30  # seconds between two progress lines in a log file
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LineStream:
    """A text stream for log files: carriage-return redraws (tqdm's frames) become whole lines;
    blank frames (a bar clearing itself) and the newline a bar writes right after its last frame
    are dropped; other text, newlines included, passes through unchanged."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._after_frame = False  # the last write was a bar's frame, already ended with a newline

    def write(self, s: str) -> int:
        if s == "\n" and self._after_frame:  # the newline tqdm writes after a bar's last frame
            self._after_frame = False
            return 1
        if "\r" not in s and "\x1b" not in s:
            if s:
                self._after_frame = False
            return self.stream.write(s)
        text = _CONTROL.sub("", s)
        wrote = False
        for part in re.split(r"[\r\n]", text):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
                wrote = True
        self._after_frame = wrote
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name):  # encoding, errors, buffer...
        return getattr(self.stream, name)


def for_log_files() -> None:
    """Called first by the CLI: when stderr is not a terminal, progress bars write one line per
    update interval (see the module's docstring); on a terminal nothing changes."""
    if sys.stderr is None or sys.stderr.isatty() or isinstance(sys.stderr, LineStream):
        return
    os.environ.setdefault("TQDM_MININTERVAL", str(LOG_INTERVAL))
    sys.stderr = LineStream(sys.stderr)
