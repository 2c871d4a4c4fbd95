"""A run is resumed only as the run it is: what a checkpoint was trained with (its recorded
settings, the length included) against what is asked, through `specmatch train-ae` and
`specmatch train-diffusion`; and what a resumed or failed run leaves behind (its metrics log,
its attempts, the modes of its files).

The micro autoencoder (32 px, 8/16 channels) and the `tiny` U-ViT on its latent cache keep each
run to a second or two on 2 CPU cores; the code path is the product's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest

from specmatch import config
from specmatch.autoencoder import train as ae_train
from specmatch.cli import main as cli_main
from specmatch.diffusion import train as diff_train
from specmatch.runtime import checkpoint
from specmatch.runtime.training import read_attempts

from conftest import MICRO_AE, assert_bitwise, cli_popen, weights

_STOP = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signal_dispositions():
    """The trainers' CLI installs its stop handlers first thing (`catch_early`) and keeps them for
    the process: run in-process here, that would leave pytest deaf to Ctrl-C."""
    before = {s: signal.getsignal(s) for s in _STOP}
    yield
    for s, h in before.items():
        signal.signal(s, h if h is not None else signal.SIG_DFL)


def ae_params(steps=2, **train_kw):
    return {"dataset": "embedded", "config": MICRO_AE, "variant": "sdvae",
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "warmup_steps": 1,
                      "checkpoint_every": 2, "log_every": 1, "seed": 3, **train_kw},
            "loss": {"lpips_weight": 0.0}}


def uvit_params(steps=2, **train_kw):
    return {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, **train_kw}}


@pytest.fixture(scope="module")
def data(micro_data) -> Path:
    return micro_data


def ae_args(data, out, params, run_dir=None, runs_root=None):
    where = ["--run-dir", str(run_dir)] if run_dir else ["--runs-root", str(runs_root)]
    return ["train-ae", "--dataset", str(data), *where, "--out", str(out), "--name", "t",
            "--params", json.dumps(params)]


def diff_args(lat, out, params, run_dir):
    return ["train-diffusion", "--latents", str(lat), "--run-dir", str(run_dir), "--out", str(out), "--name", "d",
            "--params", json.dumps(params)]


def _logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the length of a run


def test_a_shorter_run_is_refused_naming_the_checkpoint_and_both_lengths(tmp_path, data, capsys):
    """The reported case: after 4 steps, asking for 2 used to "resume" and hand out the 4-step
    model with exit 0."""
    assert cli_main(ae_args(data, tmp_path / "o4", ae_params(4), tmp_path / "run")) == 0
    capsys.readouterr()
    for extend in (False, True):  # extending never shortens
        assert cli_main(ae_args(data, tmp_path / "o2", ae_params(2, extend=extend), tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "run" / "checkpoints" / "step-00000004") in err
        assert "at step 4, beyond the asked train.steps 2" in err and "train.steps 4" in err, err
        assert not (tmp_path / "o2").exists()


def test_another_length_needs_extend_and_then_equals_the_fresh_longer_run(tmp_path, data, capsys, caplog):
    run = tmp_path / "run"
    assert cli_main(ae_args(data, tmp_path / "o2", ae_params(2), run)) == 0
    capsys.readouterr()
    assert cli_main(ae_args(data, tmp_path / "o4", ae_params(4), run)) == 2
    err = capsys.readouterr().err
    assert "train.steps: checkpoint 2, asked 4" in err and "train.extend: true" in err, err
    assert str(run / "checkpoints" / "step-00000002") in err
    assert not (tmp_path / "o4").exists()

    with caplog.at_level(logging.INFO, "specmatch"):
        assert cli_main(ae_args(data, tmp_path / "o4", ae_params(4, extend=True), run)) == 0
    assert "train.extend: checkpoint" in caplog.text and "continues to train.steps 4" in caplog.text
    assert cli_main(ae_args(data, tmp_path / "fresh", ae_params(4), tmp_path / "fresh-run")) == 0
    assert_bitwise(weights(tmp_path / "o4"), weights(tmp_path / "fresh"))
    assert _logged_steps(run) == [1, 2, 3, 4]
    summary = json.loads((tmp_path / "o4" / "autoencoder.json").read_text())
    assert summary["iterations"] == 4
    attempts = json.loads((tmp_path / "o4" / "provenance.json").read_text())["attempts"]
    assert [(a["start_step"], a["end_step"], a["status"]) for a in attempts] == [(0, 2, "finished"),
                                                                                 (2, 4, "finished")]
    # The extended run's checkpoints record its own length: a preempted restart needs no option.
    assert checkpoint.read_meta(run / "checkpoints" / "step-00000004")["settings"]["train"]["steps"] == 4


def test_a_cosine_schedule_makes_the_length_part_of_the_run(tmp_path, data, capsys):
    """With lr_decay cosine the learning rate of every update depends on train.steps: another
    length is another run, in its own folder under --runs-root, and refused in the same one."""
    sha = ae_train.SplitReader(data, "train").images_sha256
    validate = lambda p: config.validate(p, "ae_run")  # noqa: E731
    assert (ae_train.fingerprint(validate(ae_params(2, lr_decay="cosine")), sha)
            != ae_train.fingerprint(validate(ae_params(4, lr_decay="cosine")), sha))
    assert ae_train.fingerprint(validate(ae_params(2)), sha) == ae_train.fingerprint(validate(ae_params(4)), sha)

    root = tmp_path / "runs"
    assert cli_main(ae_args(data, tmp_path / "a", ae_params(2, lr_decay="cosine"), runs_root=root)) == 0
    assert cli_main(ae_args(data, tmp_path / "b", ae_params(3, lr_decay="cosine"), runs_root=root)) == 0
    folders = sorted(root.iterdir())
    assert len(folders) == 2
    assert sorted(checkpoint.list_checkpoints(f)[-1][0] for f in folders) == [2, 3]  # each run's final step
    capsys.readouterr()

    first = [f for f in folders if checkpoint.list_checkpoints(f)[-1][0] == 2][0]
    params = ae_params(3, lr_decay="cosine", extend=True)
    assert cli_main(ae_args(data, tmp_path / "c", params, run_dir=first)) == 2
    err = capsys.readouterr().err
    assert "foreign checkpoint" in err and "train.steps: checkpoint 2, asked 3" in err and "cosine" in err, err
    assert not (tmp_path / "c").exists()


def test_any_other_setting_is_refused_naming_it(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert cli_main(ae_args(data, tmp_path / "o", ae_params(2), run)) == 0
    capsys.readouterr()
    assert cli_main(ae_args(data, tmp_path / "o2", ae_params(2, lr=2e-3, extend=True), run)) == 2
    err = capsys.readouterr().err
    assert "train.lr: checkpoint 0.001, asked 0.002" in err and str(run / "checkpoints" / "step-00000002") in err, err
    # Bookkeeping is not the run's identity: other intervals resume it.
    assert cli_main(ae_args(data, tmp_path / "o3", ae_params(2, log_every=5, checkpoint_every=7), run)) == 0


def test_diffusion_lengths_as_the_autoencoders(tmp_path, micro_latents, capsys):
    lat = micro_latents[2]
    run = tmp_path / "run"
    assert cli_main(diff_args(lat, tmp_path / "o2", uvit_params(2), run)) == 0
    capsys.readouterr()
    assert cli_main(diff_args(lat, tmp_path / "o1", uvit_params(1), run)) == 2
    assert "at step 2, beyond the asked train.steps 1" in capsys.readouterr().err
    assert cli_main(diff_args(lat, tmp_path / "o4", uvit_params(4), run)) == 2
    assert "train.steps: checkpoint 2, asked 4" in capsys.readouterr().err
    assert cli_main(diff_args(lat, tmp_path / "o4", uvit_params(4, extend=True), run)) == 0
    diff_train.train(uvit_params(4), lat, tmp_path / "fresh", "d", run_dir=tmp_path / "fresh-run")
    assert_bitwise(weights(tmp_path / "o4"), weights(tmp_path / "fresh"))
    assert _logged_steps(run) == [1, 2, 3, 4]


# --------------------------------------------------------------------------- what a run leaves


@pytest.mark.parametrize("trainer", ["train-ae", "train-diffusion"])
def test_a_resumed_run_logs_each_step_once(tmp_path, data, micro_latents, trainer):
    """An attempt killed after logging steps past its last checkpoint: the resumed one logs them
    again, so the log is trimmed to the checkpoint first (a torn last line goes too)."""
    run, out = tmp_path / "run", tmp_path / "out"
    args = (ae_args(data, out, ae_params(4), run) if trainer == "train-ae"
            else diff_args(micro_latents[2], out, uvit_params(4), run))
    assert cli_main(args) == 0
    # As if killed after step 4 was logged and before its checkpoint and the output were written.
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(out)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert cli_main(args) == 0
    assert _logged_steps(run) == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_failed_final_write_is_recorded_as_a_failure(tmp_path, data):
    run = tmp_path / "run"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's parent should be\n")
    with pytest.raises(OSError):
        cli_main(ae_args(data, blocker / "out", ae_params(2), run))
    (attempt,) = read_attempts(run)
    assert attempt["status"] == "failed" and attempt["end_step"] == 2, attempt
    assert str(blocker) in attempt["error"]
    # Rerun: the final checkpoint is resumed and the output written; its record keeps the failure.
    assert cli_main(ae_args(data, tmp_path / "out", ae_params(2), run)) == 0
    attempts = json.loads((tmp_path / "out" / "provenance.json").read_text())["attempts"]
    assert [(a["status"], a["start_step"], a["end_step"]) for a in attempts] == [("failed", 0, 2), ("finished", 2, 2)]
    assert [a["status"] for a in read_attempts(run)] == ["failed", "finished"]


def test_every_file_a_run_writes_has_the_umask_mode(tmp_path, data):
    """Weights included: a group on a shared cluster reads the models. Umask 027 (a common
    cluster setting) gives files 0640 and folders 0750, which a hard-coded mode would not."""
    run, out = tmp_path / "run", tmp_path / "out"
    proc = cli_popen(ae_args(data, out, ae_params(2), run), preexec_fn=lambda: os.umask(0o027))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    files, folders = {}, {}
    for root in (run, out):
        for p in [root, *root.rglob("*")]:
            (folders if p.is_dir() else files)[p] = stat.S_IMODE(p.stat().st_mode)
    assert out / "model.safetensors" in files and run / "checkpoints" / "step-00000002" / "model.safetensors" in files
    assert out / "provenance.json" in files and run / "metrics.jsonl" in files and run / "attempts.jsonl" in files
    wrong = {str(p): oct(m) for p, m in files.items() if m != 0o640}
    wrong.update({str(p): oct(m) for p, m in folders.items() if m != 0o750})
    assert not wrong, wrong
