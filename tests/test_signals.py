"""Ctrl-C (SIGINT) and a closed terminal (SIGHUP) stop the trainers and the sampler as SIGTERM
does: the step (the sampler: the shard) in progress is finished, a checkpoint is written, the
process exits with status 3, and a rerun with the same parameters resumes from it. A process
started with them ignored (nohup) keeps ignoring them.

Trainers run as `specmatch` child processes signalled mid-run; the sampler runs in this process
and signals itself while it makes its first shard, so that the moment is exact.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest

from specmatch.autoencoder import train as ae_train
from specmatch.cli import main as cli_main
from specmatch.data import sample_folder
from specmatch.diffusion import sample
from specmatch.diffusion import train as diff_train
from specmatch.runtime import checkpoint, signals
from specmatch.runtime.training import read_attempts

from conftest import MICRO_AE, assert_bitwise, cli_popen, wait_for, weights

STEPS = 10
_STOP = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signal_dispositions():
    """The trainers' CLI installs its stop handlers first thing (`catch_early`) and keeps them for
    the process: a rerun in this process would otherwise leave pytest deaf to Ctrl-C."""
    before = {s: signal.getsignal(s) for s in _STOP}
    yield
    for s, h in before.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def ae_params():
    return {"dataset": "embedded", "config": MICRO_AE, "variant": "sdvae",
            "train": {"steps": STEPS, "batch_size": 4, "device": "cpu", "lr": 1e-3, "warmup_steps": 2,
                      "checkpoint_every": 1000, "log_every": 1, "seed": 3},
            "loss": {"lpips_weight": 0.0}}


def uvit_params(steps=STEPS):
    return {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 1000, "log_every": 1, "seed": 5}}


@pytest.fixture(scope="module")
def data(micro_data) -> Path:
    return micro_data


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """The output of the autoencoder run trained without a stop."""
    root = tmp_path_factory.mktemp("signals-fresh")
    ae_train.train(ae_params(), data, root / "run", root / "out", "t")
    return root / "out"


def ae_args(data, run_dir, out):
    return ["train-ae", "--dataset", str(data), "--run-dir", str(run_dir), "--out", str(out), "--name", "t",
            "--params", json.dumps(ae_params())]


def _dispositions(disposition):
    """A child's SIGINT and SIGHUP as a terminal's job gets them (SIG_DFL), or as nohup and
    `cmd &` leave them (SIG_IGN), whatever the test runner's own are."""
    def preexec():
        signal.signal(signal.SIGINT, disposition)
        signal.signal(signal.SIGHUP, disposition)
    return preexec


def _signal_after_two_steps(args, run_dir, sig, disposition=signal.SIG_DFL):
    proc = cli_popen(args, preexec_fn=_dispositions(disposition))
    log = Path(run_dir) / "metrics.jsonl"
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _stopped_with_a_checkpoint(code, err, sig, run_dir, out) -> tuple[int, Path]:
    assert code == 3, err[-3000:]
    assert f"interrupted by {sig.name}" in err and "checkpoint saved" in err, err[-3000:]
    assert f"specmatch: {sig.name} received" in err  # the line a person at the terminal sees at once
    (step, ckpt), = checkpoint.list_checkpoints(run_dir)
    assert 2 <= step < STEPS
    assert not Path(out).exists()
    assert [(a["status"], a["end_step"]) for a in read_attempts(run_dir)] == [("interrupted", step)]
    return step, ckpt


def _resumes(args, run_dir, step, ckpt, caplog) -> None:
    """The same command again (in this process: a second child would only add its start-up)."""
    with caplog.at_level(logging.INFO, "specmatch"):
        assert cli_main(args) == 0
    assert f"resumed from {ckpt}" in caplog.text
    assert [(a["status"], a["start_step"], a["end_step"]) for a in read_attempts(run_dir)] == [
        ("interrupted", 0, step), ("finished", step, STEPS)]
    logged = [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_train_ae_checkpoints_and_resumes_on(sig, tmp_path, data, uninterrupted, caplog):
    run, out = tmp_path / "run", tmp_path / "out"
    code, err = _signal_after_two_steps(ae_args(data, run, out), run, sig)
    step, ckpt = _stopped_with_a_checkpoint(code, err, sig, run, out)
    _resumes(ae_args(data, run, out), run, step, ckpt, caplog)
    assert_bitwise(weights(out), weights(uninterrupted))


def test_train_diffusion_checkpoints_and_resumes_on_sigint(tmp_path, micro_latents, caplog):
    lat = micro_latents[2]
    run, out = tmp_path / "run", tmp_path / "out"
    args = ["train-diffusion", "--latents", str(lat), "--run-dir", str(run), "--out", str(out), "--name", "d",
            "--params", json.dumps(uvit_params())]
    code, err = _signal_after_two_steps(args, run, signal.SIGINT)
    step, ckpt = _stopped_with_a_checkpoint(code, err, signal.SIGINT, run, out)
    _resumes(args, run, step, ckpt, caplog)
    assert json.loads((out / "diffusion.json").read_text())["steps"] == STEPS


def test_a_run_started_with_sighup_ignored_outlives_the_terminal(tmp_path, data):
    """`nohup specmatch train-ae ...`: the person asked the run to survive a closed terminal."""
    run, out = tmp_path / "run", tmp_path / "out"
    code, err = _signal_after_two_steps(ae_args(data, run, out), run, signal.SIGHUP, signal.SIG_IGN)
    assert code == 0, err[-3000:]
    assert "SIGHUP" not in err
    assert [(a["status"], a["end_step"]) for a in read_attempts(run)] == [("finished", STEPS)]
    assert json.loads((out / "autoencoder.json").read_text())["iterations"] == STEPS


# --------------------------------------------------------------------------- the sampler


@pytest.fixture(scope="module")
def model(micro_latents, tmp_path_factory):
    """(autoencoder folder, a 1-step U-ViT trained on its latents)."""
    _, ae, lat = micro_latents
    root = tmp_path_factory.mktemp("signals-model")
    diff_train.train(uvit_params(1), lat, root / "uvit", "u", run_dir=root / "run")
    return ae, root / "uvit"


SAMPLER = {"method": "euler", "steps": 2, "n_samples": 4, "shard_size": 1, "batch_size": 1, "device": "cpu", "seed": 1}


@pytest.fixture
def stray_signals_fail_the_test():
    """SIGINT and SIGHUP that the stage fails to catch land in a recorder instead of stopping
    pytest (SIGHUP's default kills it), and count as not caught. Whatever the runner inherited
    ignored (nohup) is set aside: the test is about a terminal's job."""
    missed: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: missed.append(signum)) for s in (signal.SIGINT, signal.SIGHUP)}
    ignored = set(signals._ignored_at_start)
    signals._ignored_at_start.clear()
    yield missed
    signals._ignored_at_start.update(ignored)
    for s, h in before.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_sample_finishes_its_shard_then_stops_and_resumes_on(sig, tmp_path, model, monkeypatch, capsys,
                                                             stray_signals_fail_the_test):
    ae, uvit = model
    args = ["sample", "--model", str(uvit), "--autoencoder", str(ae), "--name", "s", "--params",
            json.dumps(SAMPLER), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    real, calls = sample.generate, []

    def signalled_during_the_first_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(sample, "generate", signalled_during_the_first_shard)
    assert cli_main(args) == 3
    assert stray_signals_fail_the_test == []
    assert f"interrupted by {sig.name}" in capsys.readouterr().err
    assert len(calls) == 1 and len(list((tmp_path / "work").glob("shard-*.npz"))) == 1
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(sample, "generate", real)
    assert cli_main(args) == 0
    protocol = json.loads((tmp_path / "out" / sample_folder.FILE).read_text())
    assert protocol["n_samples"] == 4 and protocol["generated_now"] == 3


def test_while_a_trainer_starts_ctrl_c_is_kept_and_a_second_one_aborts():
    """`catch_early` keeps the first stop signal for the training loop; with nothing trained yet,
    a second Ctrl-C aborts a start that hangs instead of being swallowed too."""
    code = """
import os, signal, time
from specmatch.runtime import signals
signals.catch_early()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGHUP)  # SIGHUP never aborts: a closed terminal sends it once per process
with signals.StopRequest() as stop:
    print(stop.should_stop(), stop.signal_name, flush=True)
signals.catch_early()
os.kill(os.getpid(), signal.SIGINT)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
    print("not aborted")
except KeyboardInterrupt:
    print("aborted")
"""
    import subprocess
    import sys

    from conftest import SRC

    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                          text=True, timeout=60, preexec_fn=_dispositions(signal.SIG_DFL))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "SIGINT", "aborted"], proc.stdout + proc.stderr
    assert "specmatch: SIGINT received while the stage starts" in proc.stderr and "Ctrl-C again" in proc.stderr
