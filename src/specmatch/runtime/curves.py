"""Training curves for watching a run: TensorBoard event files and DVC plot files, written as the
run goes (at every log interval) by the main rank, beside the run's `metrics.jsonl`.

A run's folder gets `curves/` (CURVES_DIR):
- `tb/`: TensorBoard event files (`torch.utils.tensorboard.SummaryWriter`), one scalar per
  logged number, tag = its key in metrics.jsonl, step = the training step; flushed at every log.
  `tensorboard --logdir results/<preset>` shows every run (docs/cluster.md, "Watching a run").
- `plots/<name>.tsv`: one file per logged number, columns `step` and `<name>`, the layout of
  DVCLive's `plots/metrics/`: what `dvc plots show|diff` render (x: step).
- `metrics.json`: the last value of each number and the last step, for `dvc metrics` / `dvc exp
  show` (the layout of DVCLive's summary).

The DVC files are written here rather than by `dvclive.Live`: Live opens the DVC repository of the
working directory when it starts (and `dvc init`s a git repository without DVC), may post to DVC
Studio from the compute node and `git add`s under `dvc exp run`, and its `resume` continues the
step count without dropping the steps logged after the checkpoint; what is left is an appended
TSV line and a JSON summary.

Resumption: a run resumed from a checkpoint of step s logs again the steps after s that an
interrupted attempt had logged. Opening the curves at s (`Curves(run_dir, s, is_main)`) first
drops everything logged after s, in the event files (records rewritten, each file atomically) and
in the TSVs, and the SummaryWriter starts with `purge_step = s + 1` (a restart marker, so readers
that meet older files also discard steps after s): TensorBoard and DVC see each step once, as
`runtime.training.trim_metrics` does for metrics.jsonl. At s = 0 (a fresh run) the folder is
removed. `copy_into` puts the folder into the trainer's output (`training.write_output`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Mapping

from . import atomic

log = logging.getLogger(__name__)

CURVES_DIR = "curves"
TB_DIR = "tb"
PLOTS_DIR = "plots"
SUMMARY_FILE = "metrics.json"


def _plot_name(name: str) -> str:
    """A file name of a curve's key (keys are plain names; a path separator would nest)."""
    return name.replace("/", "_").replace("\\", "_")


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a log record, less `step` (strings, booleans, None dropped)."""
    return {k: v for k, v in values.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _json_value(v: float) -> Any:
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf (DVCLive writes them as strings)


def _parse(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


class Curves:
    """The curves of one run folder. `log(step, record)` after each metrics.jsonl line; a context
    manager (leaving it closes the writer). Only the main rank writes: on other ranks (`is_main`
    False) every method does nothing and no file is touched."""

    def __init__(self, run_dir: str | Path, start_step: int, is_main: bool):
        self.folder = Path(run_dir) / CURVES_DIR
        self.main = bool(is_main)
        self._writer = None
        self._summary: dict[str, Any] = {}
        if not self.main:
            return
        start_step = int(start_step)
        if start_step == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            _trim_events(self.folder / TB_DIR, start_step)
            self._summary = _trim_plots(self.folder / PLOTS_DIR, start_step)
            self._write_summary()
        (self.folder / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.folder / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def __enter__(self) -> "Curves":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Write the numbers of `values` (a metrics.jsonl record: strings and `step` are skipped)
        at `step`, and flush."""
        if self._writer is None:
            return
        step = int(step)
        nums = numbers(values)
        for name, v in nums.items():
            self._writer.add_scalar(name, v, global_step=step)
            path = self.folder / PLOTS_DIR / f"{_plot_name(name)}.tsv"
            new = not path.exists()
            with open(path, "a", encoding="utf-8") as f:
                f.write((f"step\t{name}\n" if new else "") + f"{step}\t{v!r}\n")
            self._summary[name] = _json_value(float(v)) if isinstance(v, float) else v
        self._summary["step"] = step
        self._writer.flush()
        self._write_summary()

    def _write_summary(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.folder / SUMMARY_FILE, json.dumps(self._summary, indent=1) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def copy_into(run_dir: str | Path, dest: str | Path) -> None:
    """Copy a run folder's curves (if any) into `dest` (a trainer's temporary output folder)."""
    src = Path(run_dir) / CURVES_DIR
    if src.is_dir():
        shutil.copytree(src, Path(dest) / CURVES_DIR)


def _trim_plots(folder: Path, step: int) -> dict[str, Any]:
    """Drop the rows after `step` (and a line cut short by a kill) of every TSV in `folder`;
    return the summary of what is left: each curve's last value, and the last step."""
    summary: dict[str, Any] = {}
    last_step = None
    for path in sorted(folder.glob("*.tsv")) if folder.is_dir() else []:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            path.unlink()
            continue
        header, keep = lines[0], []
        name = header.rstrip("\n").split("\t")[-1]
        for line in lines[1:]:
            parts = line.rstrip("\n").split("\t")
            try:
                ok = line.endswith("\n") and len(parts) == 2 and int(parts[0]) <= step
            except ValueError:
                ok = False
            if ok:
                keep.append(line)
        if not keep:
            path.unlink()
            continue
        if len(keep) != len(lines) - 1:
            atomic.write_text(path, header + "".join(keep))
        s, v = keep[-1].rstrip("\n").split("\t")
        value = _parse(v)
        summary[name] = _json_value(value) if isinstance(value, float) else value
        last_step = max(int(s), last_step if last_step is not None else int(s))
    if last_step is not None:
        summary["step"] = last_step
    return summary


def _trim_events(folder: Path, step: int) -> None:
    """Drop the summaries and restart markers of steps after `step` from every event file in
    `folder` (a record cut short by a kill goes too); each changed file is rewritten atomically."""
    if not folder.is_dir():
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(p for p in folder.iterdir()
                       if "tfevents" in p.name and not p.name.startswith(".") and p.is_file()):
        records = list(RawEventFileLoader(str(path)).Load())
        keep = [r for r in records if Event.FromString(r).file_version or Event.FromString(r).step <= step]
        size = sum(len(r) + 16 for r in records)  # a record: length (8), its crc (4), data, crc (4)
        if len(keep) == len(records) and size == path.stat().st_size:
            continue
        with atomic.atomic_file(path) as f:
            writer = RecordWriter(f)
            for r in keep:
                writer.write(r)
            writer.flush()
        log.info("%s: dropped %d event(s) after step %d, where this attempt resumes", path,
                 len(records) - len(keep), step)
