"""Runtime services of the trainers: checkpoints and the training state saved into them, RNG
state and per-step streams, stop signals, process-group setup.

File hashes are recomputed with hashlib, and "resumes to the same trajectory" is checked by
running the same optimiser step twice (uninterrupted, and after a save/load trip) and
comparing the results bitwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specmatch.errors import SpecmatchError
from specmatch.runtime import checkpoint, distributed, seeding, signals, training
from specmatch.runtime.checkpoint import CheckpointError, ForeignCheckpointError
from specmatch.runtime.train_state import TrainingState

REPO = Path(__file__).resolve().parents[1]
KIND = "autoencoder"
FP = "a" * 64
OTHER_FP = "b" * 64


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny(tag: float = 0.0) -> dict[str, torch.Tensor]:
    return {"ae.w": torch.full((3, 2), tag), "ae.b": torch.arange(3, dtype=torch.float32)}


def _save(run: Path, step: int, keep: int = 10, fp: str = FP, kind: str = KIND) -> Path:
    return checkpoint.save(run, step, _tiny(float(step)), {"step": step}, kind, fp, keep=keep)


def _steps(run: Path) -> list[int]:
    return [s for s, _ in checkpoint.list_checkpoints(run)]


def _flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- checkpoints


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def test_save_load_round_trip_is_bitwise_and_resumes_adamw_identically(tmp_path):
    model, g = _model(), torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    batches = [torch.randn(5, 4, generator=g) for _ in range(4)]
    for x in batches[:3]:
        _step(model, opt, x)
        sched.step()
    extra = {
        "ema.t": torch.randn(4, 4).t(),  # non-contiguous: must be stored as its values
        "disc.bf16": torch.randn(7).to(torch.bfloat16),
        "disc.count": torch.tensor([3, -1], dtype=torch.int64),
    }
    tensors = {**{f"ae.{k}": v for k, v in model.state_dict().items()}, **extra}
    state = {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": 3, "name": "x",
             "nested": {"ints": [1, 2], "pair": (0.5, None), "t": torch.arange(3)}}
    path = checkpoint.save(tmp_path, 3, tensors, state, KIND, FP)
    assert path == tmp_path / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt"]

    meta = json.loads((path / "meta.json").read_text())
    assert meta["schema"] == "specmatch.checkpoint/1" and meta["kind"] == KIND
    assert meta["step"] == 3 and meta["fingerprint"] == FP and meta["time"]
    assert meta["files"] == {n: _sha(path / n) for n in ("model.safetensors", "state.pt")}
    torch.load(path / "state.pt", weights_only=True)  # must not need pickled code

    loaded, lstate, lmeta = checkpoint.load(path, KIND, FP)
    assert lmeta == meta and lstate["step"] == 3 and lstate["name"] == "x"
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert torch.equal(loaded[k], v), k

    # The uninterrupted run takes its 4th step ...
    _step(model, opt, batches[3])
    sched.step()
    # ... and a fresh process rebuilt from the checkpoint must take exactly the same one.
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    fresh.load_state_dict({k[3:]: v for k, v in loaded.items() if k.startswith("ae.")})
    fresh_opt.load_state_dict(lstate["opt"])
    fresh_sched.load_state_dict(lstate["sched"])
    _step(fresh, fresh_opt, batches[3])
    fresh_sched.step()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_save_accepts_tied_weights(tmp_path):
    w = torch.randn(3, 3)
    path = checkpoint.save(tmp_path, 0, {"ae.w": w, "ema.w": w, "ae.view": w[1]}, {}, KIND, FP)
    loaded, _, _ = checkpoint.load(path, KIND, FP)
    assert torch.equal(loaded["ema.w"], w) and torch.equal(loaded["ae.view"], w[1])


def test_save_rejects_state_that_weights_only_load_would_refuse(tmp_path):
    with pytest.raises(TypeError, match=r"state\['sched'\]\['gamma'\].*numpy"):
        checkpoint.save(tmp_path, 1, _tiny(), {"sched": {"gamma": np.float64(0.5)}}, KIND, FP)
    assert _steps(tmp_path) == []


def test_pruning_keeps_the_newest_keep(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == [40, 50]
    _save(tmp_path, 60, keep=3)
    assert _steps(tmp_path) == [40, 50, 60]
    _save(tmp_path, 70, keep=1)
    assert _steps(tmp_path) == [70]


def test_saving_an_earlier_step_removes_the_abandoned_newer_checkpoints(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    # Resumed from step 10 (say 20 and 30 diverged); the next save is step 15.
    _save(tmp_path, 15, keep=2)
    assert _steps(tmp_path) == [10, 15]
    assert checkpoint.latest_valid(tmp_path, KIND, FP).name == "step-00000015"


def test_kill_during_save_keeps_old_checkpoints_and_leaves_no_step_folder(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT does in the middle of torch.save

    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert _steps(tmp_path) == [1]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    checkpoint.verify(tmp_path / "checkpoints" / "step-00000001", KIND, FP)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_corrupted_file_is_detected_and_latest_valid_falls_back(tmp_path, caplog, name):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    _flip_byte(newest / name, offset=len((newest / name).read_bytes()) // 2)
    with pytest.raises(CheckpointError, match=rf"step-00000002.*{name} is corrupted"):
        checkpoint.verify(newest, KIND, FP)
    with pytest.raises(CheckpointError):
        checkpoint.load(newest, KIND, FP)
    with caplog.at_level(logging.WARNING, logger="specmatch.runtime.checkpoint"):
        found = checkpoint.latest_valid(tmp_path, KIND, FP)
    assert found == tmp_path / "checkpoints" / "step-00000001"
    assert any("step-00000002" in r.getMessage() and "corrupted" in r.getMessage()
               for r in caplog.records)
    assert checkpoint.resolve_resume(tmp_path, "auto", KIND, FP) == found


def test_missing_meta_or_file_is_reported_and_skipped(tmp_path):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    (second / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000002.*state.pt is missing"):
        checkpoint.verify(second)
    (first / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000001.*meta.json is missing"):
        checkpoint.verify(first)
    assert checkpoint.latest_valid(tmp_path, KIND, FP) is None
    # Checkpoints exist but none is usable: starting over on top of them would lose the run.
    with pytest.raises(CheckpointError, match="none verifies"):
        checkpoint.resolve_resume(tmp_path, "auto", KIND, FP)


def test_leftover_temporary_folder_is_ignored_and_cleaned(tmp_path):
    good = _save(tmp_path, 5)
    # A save killed before its rename leaves a hidden temporary, here even a complete-looking one.
    leftover = tmp_path / "checkpoints" / ".step-00000009.k2j4_x.tmp"
    leftover.mkdir()
    for f in good.iterdir():
        (leftover / f.name).write_bytes(f.read_bytes())
    assert _steps(tmp_path) == [5]
    assert checkpoint.latest_valid(tmp_path, KIND, FP) == good
    _save(tmp_path, 6)
    assert not leftover.exists()


def test_foreign_checkpoint_raises_naming_both_fingerprints(tmp_path):
    path = _save(tmp_path, 1, fp=OTHER_FP)
    with pytest.raises(ForeignCheckpointError) as e:
        checkpoint.verify(path, KIND, FP)
    assert FP in str(e.value) and OTHER_FP in str(e.value) and "step-00000001" in str(e.value)
    # Never skipped silently, even when a valid checkpoint of this run lies further back;
    # and saving into the folder never prunes someone else's checkpoint.
    _save(tmp_path, 0, keep=1)
    assert _steps(tmp_path) == [0, 1]
    with pytest.raises(ForeignCheckpointError, match=OTHER_FP):
        checkpoint.latest_valid(tmp_path, KIND, FP)
    with pytest.raises(ForeignCheckpointError, match=OTHER_FP):
        checkpoint.resolve_resume(tmp_path, "auto", KIND, FP)
    with pytest.raises(ForeignCheckpointError, match="'autoencoder'.*expected 'diffusion'"):
        checkpoint.load(path, "diffusion", OTHER_FP)


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert checkpoint.resolve_resume(run, "none", KIND, FP) is None
    assert checkpoint.resolve_resume(run, "auto", KIND, FP) is None
    _save(run, 1)
    second = _save(run, 2)
    with pytest.raises(CheckpointError, match=r"--resume auto.*fresh run folder"):
        checkpoint.resolve_resume(run, "none", KIND, FP)
    assert checkpoint.resolve_resume(run, "auto", KIND, FP) == second
    first = run / "checkpoints" / "step-00000001"
    assert checkpoint.resolve_resume(run, str(first), KIND, FP) == first
    with pytest.raises(CheckpointError, match="run folder, not a checkpoint"):
        checkpoint.resolve_resume(run, str(run), KIND, FP)
    with pytest.raises(CheckpointError, match="no such folder"):
        checkpoint.resolve_resume(run, str(tmp_path / "nope"), KIND, FP)
    _flip_byte(first / "model.safetensors")
    with pytest.raises(CheckpointError, match="corrupted"):
        checkpoint.resolve_resume(run, str(first), KIND, FP)


# --------------------------------------------------------------------------- training state

_ONE_PROCESS = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)


def _gan_run(run_dir: Path, tag: int = 0) -> tuple[TrainingState, dict]:
    """An autoencoder-shaped run: two networks, an EMA, an unused (None) module, two AdamWs with
    warm-up schedulers; the same seed gives the same initial weights."""
    torch.manual_seed(tag)
    gen, disc = _model(), torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    ema = training.make_ema(gen, 0.5)
    opts = {"opt_g": torch.optim.AdamW(gen.parameters(), lr=1e-2),
            "opt_d": torch.optim.AdamW(disc.parameters(), lr=1e-3)}
    scheds = {n.replace("opt", "sched"): torch.optim.lr_scheduler.LambdaLR(o, lambda s: (s + 1) / 4)
              for n, o in opts.items()}
    state = TrainingState(KIND, FP, run_dir, _ONE_PROCESS, keep=5,
                          modules={"ae": gen, "disc": disc, "ema": ema, "proj": None}, optimizers=opts,
                          schedulers=scheds, counters=("step", "g_step", "d_step"))
    return state, {"gen": gen, "disc": disc, "ema": ema, **opts, **scheds}


def _gan_step(m: dict, x: torch.Tensor) -> None:
    for net, opt, sched in ((m["gen"], m["opt_g"], m["sched_g"]), (m["disc"], m["opt_d"], m["sched_d"])):
        opt.zero_grad()
        net(x if net is m["gen"] else m["gen"](x).detach()).pow(2).mean().backward()
        opt.step()
        sched.step()
    m["ema"].update_parameters(m["gen"])


def test_training_state_keeps_the_checkpoint_layout_and_resumes_bitwise(tmp_path):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(5, 4, generator=g) for _ in range(4)]
    state, m = _gan_run(tmp_path / "run")
    for x in batches[:3]:
        _gan_step(m, x)
    path = state.save(step=3, g_step=3, d_step=2)

    # The layout the trainers wrote by hand before TrainingState, which old checkpoints have:
    # optimisers, schedulers, then the counters in state.pt, each module under its prefix.
    legacy = {"opt_g": m["opt_g"].state_dict(), "opt_d": m["opt_d"].state_dict(), "sched_g": m["sched_g"].state_dict(),
              "sched_d": m["sched_d"].state_dict(), "step": 3, "g_step": 3, "d_step": 2}
    tensors = {**{f"ae.{k}": v for k, v in m["gen"].state_dict().items()},
               **{f"disc.{k}": v for k, v in m["disc"].state_dict().items()},
               **{f"ema.{k}": v for k, v in m["ema"].state_dict().items()}}
    old = checkpoint.save(tmp_path / "legacy", 3, tensors, legacy, KIND, FP)
    assert (path / "state.pt").read_bytes() == (old / "state.pt").read_bytes()
    assert list(torch.load(path / "state.pt", weights_only=True)) == list(legacy)
    written, _, _ = checkpoint.load(path, KIND, FP)
    assert written.keys() == tensors.keys() and all(torch.equal(written[k], v) for k, v in tensors.items())

    _gan_step(m, batches[3])
    # A fresh process (other initial weights) resumes the old-layout checkpoint and takes the same step.
    fresh, fm = _gan_run(tmp_path / "legacy", tag=1)
    start, counts = fresh.resume("auto")
    assert start == old and counts == {"step": 3, "g_step": 3, "d_step": 2}
    _gan_step(fm, batches[3])
    for name in ("gen", "disc", "ema"):
        for (k, a), b in zip(m[name].state_dict().items(), fm[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k}"
    assert fm["opt_d"].param_groups[0]["lr"] == m["opt_d"].param_groups[0]["lr"]


def test_training_state_starts_fresh_and_refuses_incomplete_counters(tmp_path):
    state, _ = _gan_run(tmp_path)
    assert state.resume("auto") == (None, {"step": 0, "g_step": 0, "d_step": 0})
    with pytest.raises(ValueError, match=r"counters \['step'\] given, expected \['step', 'g_step', 'd_step'\]"):
        state.save(step=1)
    assert checkpoint.list_checkpoints(tmp_path) == []
    # A checkpoint without one of the run's keys (another trainer's, or a hand-made one) is named.
    checkpoint.save(tmp_path, 2, state.tensors(), {"opt_g": {}, "step": 2}, KIND, FP)
    with pytest.raises(CheckpointError, match=r"state.pt lacks \['opt_d', 'sched_g', 'sched_d', 'g_step', 'd_step'\]"):
        state.resume("auto")
    with pytest.raises(ValueError, match=r"\['step'\] named twice"):
        TrainingState(KIND, FP, tmp_path, _ONE_PROCESS, 1, {}, {"step": state.optimizers["opt_g"]}, {})


def _settings(steps: int, lr_decay: str = "none", lr: float = 1e-3) -> dict:
    return {"train": {"steps": steps, "lr": lr, "lr_decay": lr_decay}, "data": "d" * 64}


def test_training_state_records_its_settings_and_resumes_only_under_them(tmp_path, caplog):
    from specmatch.runtime.train_state import RunSettingsError

    state, _ = _gan_run(tmp_path)
    state.settings = _settings(4)
    path = state.save(step=2, g_step=2, d_step=1)
    assert checkpoint.read_meta(path)["settings"] == _settings(4)
    assert state.resume("auto")[1]["step"] == 2  # a restart with the same settings: no option needed

    other, _ = _gan_run(tmp_path)
    for settings, extend, named in ((_settings(4, lr=2e-3), True, "train.lr: checkpoint 0.001, asked 0.002"),
                                    (_settings(8), False, "train.steps: checkpoint 4, asked 8"),
                                    (_settings(1), True, "at step 2, beyond the asked train.steps 1")):
        other.settings, other.extend = settings, extend
        with pytest.raises(RunSettingsError, match=named) as e:
            other.resume("auto")
        assert str(path) in str(e.value)
    other.settings, other.extend = _settings(8), True
    assert other.resume("auto")[1]["step"] == 2
    # A cosine schedule's length is in its fingerprint: a mismatch there is foreign, and named.
    cosine, _ = _gan_run(tmp_path)
    cosine.fingerprint, cosine.settings, cosine.extend = OTHER_FP, _settings(8, "cosine"), True
    with pytest.raises(ForeignCheckpointError, match=r"train.lr_decay: checkpoint \"none\", asked \"cosine\"; "
                                                     r"train.steps: checkpoint 4, asked 8 \(with train.lr_decay cosine"):
        cosine.resume("auto")


def test_a_checkpoint_without_recorded_settings_resumes_but_never_beyond_its_length(tmp_path, caplog):
    """Checkpoints of earlier versions record no settings: a run in flight across the upgrade
    still resumes (with a warning), and the one check that needs nothing recorded still holds."""
    from specmatch.runtime.train_state import RunSettingsError

    old, _ = _gan_run(tmp_path)
    old.save(step=3, g_step=3, d_step=0)  # settings None: what the earlier versions wrote
    assert "settings" not in checkpoint.read_meta(tmp_path / "checkpoints" / "step-00000003")
    new, _ = _gan_run(tmp_path)
    new.settings = _settings(5)
    with caplog.at_level(logging.WARNING):
        assert new.resume("auto")[1]["step"] == 3
    assert "records no settings" in caplog.text
    new.settings = _settings(2)
    with pytest.raises(RunSettingsError, match="at step 3, beyond the asked train.steps 2"):
        new.resume("auto")


# --------------------------------------------------------------------------- seeding


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.randn(3).tolist(), torch.rand(4).tolist(), torch.randn(3).tolist())


def test_seed_everything_is_per_rank():
    assert seeding.seed_everything(7, rank=3) == 10
    a = _draws()
    seeding.seed_everything(10)
    assert _draws() == a
    seeding.seed_everything(7, rank=0)
    assert _draws() != a


_STEP_RNG_CHILD = """
import json, sys
from specmatch.runtime import seeding
out = {f"{s}/{st}": seeding.step_rng(11, s, st).random(4).tolist()
       for s in (0, 5) for st in ("dsm-k", "noise")}
out["seed"] = seeding.step_seed(11, 5, "noise")
out["hash"] = hash("noise")
print(json.dumps(out))
"""


def test_step_rng_is_the_same_in_other_processes_and_distinct_per_step_and_stream():
    # Another interpreter with another str-hash salt (the loop makes sure of it, so that a
    # step_rng built on python's hash() could not pass by luck).
    for hashseed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed,
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, "-c", _STEP_RNG_CHILD], env=env, check=True,
                             capture_output=True, text=True, timeout=120)
        there = json.loads(res.stdout)
        if there.pop("hash") != hash("noise"):
            break
    else:
        pytest.fail("could not start an interpreter with a different str hash")
    here = {f"{s}/{st}": seeding.step_rng(11, s, st).random(4).tolist()
            for s in (0, 5) for st in ("dsm-k", "noise")}
    here["seed"] = seeding.step_seed(11, 5, "noise")
    assert there == here
    values = [tuple(v) for k, v in here.items() if k != "seed"]
    assert len(set(values)) == 4  # every (step, stream) pair gives its own stream
    assert seeding.step_rng(12, 5, "noise").random(4).tolist() != here["5/noise"]
    assert 0 <= here["seed"] < 2**63
    torch.Generator().manual_seed(here["seed"])


def test_step_rng_does_not_depend_on_global_seeding():
    seeding.seed_everything(1)
    a = seeding.step_rng(3, 4, "x").integers(0, 2**31, size=5)
    seeding.seed_everything(2)
    np.random.rand(10)
    assert np.array_equal(seeding.step_rng(3, 4, "x").integers(0, 2**31, size=5), a)


def test_deterministic_switch():
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    try:
        seeding.deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        seeding.deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1:]


# --------------------------------------------------------------------------- signals


def test_stop_request_sets_flag_on_signal_and_restores_handlers():
    def mine(signum, frame):  # a handler installed before, e.g. by a launcher
        raise AssertionError("the StopRequest handler should have run instead")

    before_usr1 = signal.signal(signal.SIGUSR1, mine)
    before_term = signal.getsignal(signal.SIGTERM)
    try:
        with signals.StopRequest() as stop:
            assert stop.signal_name is None and not stop.should_stop()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.should_stop() and stop.signal_name == "SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM keeps the first reason
            assert stop.signal_name == "SIGUSR1"
            single = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)
            assert stop.should_stop(single)
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGTERM) == before_term
    finally:
        signal.signal(signal.SIGUSR1, before_usr1)


def test_stop_request_on_sigterm():
    with signals.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.signal_name == "SIGTERM"
    assert signals.EXIT_INTERRUPTED == 3


# --------------------------------------------------------------------------- distributed


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_setup_single_process(monkeypatch):
    for var in _TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)
    info = distributed.setup("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.backend is None and info.is_main
    assert info.device == torch.device("cpu")
    assert distributed.is_main()
    t = torch.tensor([1.0, 3.0])
    assert distributed.all_reduce_mean(t) is t and t.tolist() == [1.0, 3.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(5) == [5]
    assert distributed.any_rank(False) is False
    distributed.barrier()
    distributed.teardown()
    auto = distributed.setup("auto")
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_setup_rejects_bad_requests(monkeypatch):
    for var in _TORCHRUN_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SpecmatchError, match="device must be one of"):
        distributed.setup("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(SpecmatchError, match="no CUDA GPU"):
            distributed.setup("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SpecmatchError, match="torchrun"):
        distributed.setup("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = distributed.setup("cpu")
    try:
        again = distributed.setup("cpu")  # idempotent: describes the existing group
        mean = distributed.all_reduce_mean(torch.tensor([float(rank + 1), 10.0 * rank]))
        with signals.StopRequest() as stop:
            before = stop.should_stop(info)
            if rank == 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            after = stop.should_stop(info)
            name = stop.signal_name
        result = {
            "info": [info.rank, info.world_size, info.backend, info.is_main, str(info.device)],
            "again": [again.rank, again.world_size, again.backend],
            "mean": mean.tolist(), "before": before, "after": after, "signal": name,
            "bcast": distributed.broadcast_object(f"from-{rank}"),
            "gather": distributed.all_gather_object(rank * 2),
            "is_main": distributed.is_main(),
        }
        distributed.barrier()
    finally:
        distributed.teardown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_process_gloo_mean_and_stop_agreement(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["info"] == [0, 2, "gloo", True, "cpu"] and r1["info"] == [1, 2, "gloo", False, "cpu"]
    assert r0["again"] == [0, 2, "gloo"] and r1["again"] == [1, 2, "gloo"]
    assert r0["mean"] == r1["mean"] == [1.5, 5.0]
    # Only rank 1 was signalled, yet both ranks agree to stop after the same step.
    assert r0["before"] is r1["before"] is False
    assert r0["after"] is r1["after"] is True
    assert r0["signal"] is None and r1["signal"] == "SIGUSR1"
    assert r0["bcast"] == r1["bcast"] == "from-0"
    assert r0["gather"] == r1["gather"] == [0, 2]
    assert r0["is_main"] and not r1["is_main"]


def test_attempt_log_records_each_attempt_and_a_fresh_start_drops_them(tmp_path):
    from types import SimpleNamespace

    from specmatch.runtime.training import AttemptLog, Interrupted, read_attempts

    info = SimpleNamespace(is_main=True, world_size=2)
    step = 0
    with pytest.raises(Interrupted):
        with AttemptLog(tmp_path, info, 0, lambda: step):
            step = 5
            raise Interrupted("signal")
    # A process killed outright writes no end line.
    killed = AttemptLog(tmp_path, info, 5, lambda: step)
    killed.__enter__()
    with AttemptLog(tmp_path, info, 5, lambda: step):
        step = 9
    with pytest.raises(ValueError):
        with AttemptLog(tmp_path, info, 9, lambda: step):
            raise ValueError("boom")
    a = read_attempts(tmp_path)
    assert [x["attempt"] for x in a] == [1, 2, 3, 4]
    assert [x["status"] for x in a] == ["interrupted", "killed or running", "finished", "failed"]
    assert [(x["start_step"], x.get("end_step")) for x in a] == [(0, 5), (5, None), (5, 9), (9, 9)]
    assert a[3]["error"] == "ValueError: boom" and a[0]["world_size"] == 2 and a[0]["pid"] == os.getpid()
    assert all(x["wall_s"] >= 0 for x in a if "wall_s" in x)
    # A torn last line (killed mid-write) is skipped, not fatal.
    with open(tmp_path / "attempts.jsonl", "a") as f:
        f.write('{"event": "end", "att')
    assert len(read_attempts(tmp_path)) == 4
    # Starting again from step 0 is a new run: earlier attempts are not its history.
    with AttemptLog(tmp_path, info, 0, lambda: 3):
        pass
    assert [(x["attempt"], x["status"], x["end_step"]) for x in read_attempts(tmp_path)] == [(1, "finished", 3)]
    # Other ranks write nothing.
    other = tmp_path / "other"
    other.mkdir()
    with AttemptLog(other, SimpleNamespace(is_main=False, world_size=2), 0, lambda: 1):
        pass
    assert read_attempts(other) == []


def test_provenance_time_starts_with_the_stage_command(tmp_path, monkeypatch):
    import time

    from specmatch.runtime import provenance

    monkeypatch.setattr(provenance, "_stage_start", None)
    provenance.mark_stage_start()
    time.sleep(1.1)
    prov = provenance.Provenance("unit", "r", {})
    (tmp_path / "o").mkdir()
    rec = prov.record(tmp_path / "out", tmp_path / "o")
    assert rec["time"]["wall_s"] >= 1.0


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_lr_factor_matches_torchs_warmup_then_constant_or_cosine_schedulers(decay):
    """`train.lr_decay`: the learning rate of each update equals torch's own schedulers (LinearLR
    warm-up from lr/warmup_steps, then ConstantLR(1) or CosineAnnealingLR down to 0 at the last
    update), including the warm-up-free case and a run no longer than its warm-up."""
    import types

    from specmatch.runtime.training import lr_factor

    sched = torch.optim.lr_scheduler
    for warm, total in ((5, 20), (1, 7), (10, 10)):
        t = types.SimpleNamespace(warmup_steps=warm, steps=total, lr_decay=decay)
        p = torch.nn.Parameter(torch.zeros(1))
        ref_opt = torch.optim.SGD([p], lr=3.0)
        after = (sched.CosineAnnealingLR(ref_opt, T_max=max(1, total - warm)) if decay == "cosine"
                 else sched.ConstantLR(ref_opt, factor=1.0, total_iters=0))
        ref = sched.SequentialLR(ref_opt, [sched.LinearLR(ref_opt, 1 / warm, 1.0, total_iters=max(1, warm - 1)), after],
                                 milestones=[warm - 1]) if warm > 1 else after
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3.0)
        ours = sched.LambdaLR(opt, lr_factor(t))
        for _ in range(total):
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12)
            ref_opt.step(), opt.step(), ref.step(), ours.step()
    # cosine ends at 0 on the last update, constant stays at the base rate
    t = types.SimpleNamespace(warmup_steps=2, steps=12, lr_decay=decay)
    assert lr_factor(t)(11) == pytest.approx(0.0 if decay == "cosine" else 1.0, abs=1e-12)
