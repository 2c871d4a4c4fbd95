"""The autoencoder trainer: resume identity after SIGKILL, SIGTERM checkpoints, DDP on gloo,
non-finite losses, foreign checkpoints, and the loss wiring (DSM targets, adaptive weight).

A micro config (8/16 channels, 32 px) keeps each run to seconds on 2 CPU cores; the code path
is the product's, only the sizes differ.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from specmatch import spectral
from specmatch.autoencoder import objectives, train
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError
from specmatch.runtime import checkpoint

# The tests folder is on sys.path (pytest's rootdir conftest).
from conftest import assert_bitwise, kill_and_resume, sigterm_run, torchrun_command, weights

MICRO = {"name": "micro", "channels": [8, 16], "z_channels": 4, "num_res_blocks": 1, "norm_groups": 4}


def run_params(steps=4, variant="dsm", **train_kw):
    return {"dataset": "embedded", "config": MICRO, "variant": variant,
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "warmup_steps": 2,
                      "ema_decay": 0.9, "checkpoint_every": 2, "log_every": 1, "seed": 3, **train_kw},
            "loss": {"lpips_weight": 0.0, "gan_start": 1, "dsm_ks": [0, 8]},
            "disc": {"channels": 8, "n_layers": 2}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aedata") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 24, "n_test": 8, "shard_size": 10},
            "embedded", out)
    return out


def _train_args(data, run_dir, out, params):
    return ["train-ae", "--dataset", str(data), "--run-dir", str(run_dir), "--out", str(out), "--name", "t",
            "--params", json.dumps(params)]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data):
    full = train.train(run_params(steps=6), data, tmp_path / "runA", tmp_path / "outA", "a")
    assert full["generator_steps"] == 6 and full["discriminator_steps"] == 5
    params = run_params(steps=6)
    kill_and_resume(_train_args(data, tmp_path / "runB", tmp_path / "outB", params), tmp_path / "runB",
                    tmp_path / "outB", 6)
    assert_bitwise(weights(tmp_path / "outA"), weights(tmp_path / "outB"))


def test_sigterm_writes_checkpoint_and_exits_3(tmp_path, data):
    params = run_params(steps=100000, checkpoint_every=100000)
    _, ckpt = sigterm_run(_train_args(data, tmp_path / "run", tmp_path / "out", params), tmp_path / "run",
                          tmp_path / "out")
    checkpoint.verify(ckpt, kind="autoencoder", fingerprint=train.fingerprint(
        train.config_mod.validate(params, "ae_run"), train.SplitReader(data, "train").images_sha256))


def test_foreign_checkpoint_refused(tmp_path, data):
    train.train(run_params(steps=2), data, tmp_path / "run", tmp_path / "out", "a")
    with pytest.raises(checkpoint.ForeignCheckpointError, match="fingerprint"):
        train.train(run_params(steps=4, variant="esm"), data, tmp_path / "run", tmp_path / "out2", "b")
    assert not (tmp_path / "out2").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data, monkeypatch):
    real = train.load_batch

    def poisoned(reader, idx, hflip, seed, step, device, rows=slice(None)):
        x = real(reader, idx, hflip, seed, step, device, rows)
        return x * float("nan") if step == 3 else x

    monkeypatch.setattr(train, "load_batch", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"step 3 .*step-00000002"):
        train.train(run_params(steps=6), data, tmp_path / "run", tmp_path / "out", "a")
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "out").exists()


def test_dsm_discriminator_sees_lowpassed_real(tmp_path, data, monkeypatch):
    """With k = 8 forced, every image-space target is LP_8(x): the discriminator's real input
    included (docs/method.md §4.3)."""
    seen = []
    orig = train.PatchDiscriminator.forward

    def spy(self, x):
        seen.append(x.detach().clone())
        return orig(self, x)

    monkeypatch.setattr(train.PatchDiscriminator, "forward", spy)
    p = run_params(steps=1)
    p["loss"].update(gan_start=0, dsm_ks=[8])
    p["train"]["hflip"] = 0.0
    train.train(p, data, tmp_path / "run", tmp_path / "out", "a")
    reader = train.SplitReader(data, "train")
    x = train.load_batch(reader, train.batch_indices(len(reader), 4, 3, 0), 0.0, 3, 0, torch.device("cpu"))
    # Calls: generator term (fake), then the discriminator step: real, fake.
    assert len(seen) == 3
    torch.testing.assert_close(seen[1], spectral.block_lowpass(x, 8))
    assert not torch.allclose(seen[1], x, atol=1e-3)


def test_adaptive_weight_against_hand_gradients():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    v = torch.tensor([1.0, 2.0])
    out = w @ v
    rec = (out ** 2).sum()              # d/dw = 2 out v^T
    g = out.sum() * 0.25                # d/dw = 0.25 * 1 v^T
    lam = objectives.adaptive_weight(rec, g, w)
    ref = torch.linalg.norm(2 * torch.outer(out.detach(), v)) / torch.linalg.norm(0.25 * torch.outer(torch.ones(2), v))
    assert lam.item() == pytest.approx(ref.item(), rel=1e-6)
    assert not lam.requires_grad
    big = objectives.adaptive_weight((w @ v).sum(), (w @ v).sum() * 1e-9, w, max_weight=1e4)
    assert big.item() == pytest.approx(1e4)


def test_mask_draws_depend_on_step_only_and_cover_choices():
    obj = objectives.objective("dsm")
    draws = [objectives.draw_mask(obj, 0, s).k for s in range(400)]
    assert set(draws) == {0, 8, 10, 12}
    assert draws == [objectives.draw_mask(obj, 0, s).k for s in range(400)]
    assert draws != [objectives.draw_mask(obj, 1, s).k for s in range(400)]
    assert objectives.draw_mask(objectives.objective("sdvae"), 0, 5).identity
    with pytest.raises(SpecmatchError, match="unknown key"):
        objectives.objective("dsm", {"dsm_k": [8]})
    with pytest.raises(SpecmatchError, match="unknown autoencoder variant"):
        objectives.objective("vqgan")


def test_batches_are_epoch_permutations():
    idx = np.concatenate([train.batch_indices(10, 4, 0, s) for s in range(5)])  # 20 = two epochs
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert not np.array_equal(idx[:10], idx[10:20])


def test_bad_inputs(tmp_path, data):
    with pytest.raises(SpecmatchError, match="do not tile"):
        train.train({**run_params(), "config": {**MICRO, "channels": [8, 16, 16, 16, 16, 16]}}, data,
                    tmp_path / "r", tmp_path / "o", "a")
    with pytest.raises(SpecmatchError, match="train.lr"):
        train.train({**run_params(), "train": {"lr": "fast"}}, data, tmp_path / "r", tmp_path / "o", "a")
    with pytest.raises(SpecmatchError, match="not a prepared dataset"):
        train.train(run_params(), tmp_path, tmp_path / "r", tmp_path / "o", "a")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path, data):
    """torchrun with 2 CPU processes and the same global batch follows the 1-process run. The
    GAN is off here: the PatchGAN's BatchNorm takes batch statistics per process (as in the
    reference multi-GPU training), so with it on the two runs legitimately differ; the second
    torchrun run below covers the discriminator's all-reduce path."""
    params = run_params(steps=3)
    params["train"]["hflip"] = 0.5
    params["loss"]["gan_start"] = 100
    one = train.train(params, data, tmp_path / "r1", tmp_path / "o1", "one")
    cmd, env = torchrun_command(_train_args(data, tmp_path / "r2", tmp_path / "o2", params))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "o2" / "autoencoder.json").read_text())
    assert summary["world_size"] == 2 and one["world_size"] == 1
    a, b = weights(tmp_path / "o1"), weights(tmp_path / "o2")
    # Float tolerance: the all-reduce sums in another order, and Adam turns the float noise on
    # parameters whose true gradient is 0 (the attention key bias, which softmax ignores) into
    # steps of up to ~lr; a wrong batch split or noise draw moves weights by ~1e-3 (seen).
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    params["loss"]["gan_start"] = 1
    cmd[cmd.index("--run-dir") + 1], cmd[cmd.index("--out") + 1] = str(tmp_path / "r3"), str(tmp_path / "o3")
    cmd[cmd.index("--params") + 1] = json.dumps(params)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = [json.loads(line) for line in (tmp_path / "r3" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["d_step"] == 2 and all(np.isfinite(r["d_loss"]) for r in log if "d_loss" in r)
