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
def data(micro_data) -> Path:
    return micro_data


def _train_args(data, run_dir, out, params):
    return ["train-ae", "--dataset", str(data), "--run-dir", str(run_dir), "--out", str(out), "--name", "t",
            "--params", json.dumps(params)]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, data):
    full = train.train(run_params(steps=6), data, tmp_path / "runA", tmp_path / "outA", "a")
    # alternating from iteration 1: G, D, G, D, G, D
    assert full["generator_steps"] == 3 and full["discriminator_steps"] == 3
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
    with pytest.raises(train.NonFiniteLoss, match=r"iteration 3 .*step-00000002"):
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
    p = run_params(steps=2)
    p["loss"].update(gan_start=0, dsm_ks=[8])
    p["train"]["hflip"] = 0.0
    train.train(p, data, tmp_path / "run", tmp_path / "out", "a")
    reader = train.SplitReader(data, "train")
    # Calls: iteration 0 the generator's GAN term (fake); iteration 1 the discriminator: real, fake.
    x = train.load_batch(reader, train.batch_indices(len(reader), 4, 3, 1), 0.0, 3, 1, torch.device("cpu"))
    assert len(seen) == 3
    torch.testing.assert_close(seen[1], spectral.block_lowpass(x, 8))
    assert not torch.allclose(seen[1], x, atol=1e-3)


def _adam_steps(run_dir: Path, fp: str) -> tuple[int, int]:
    """Updates each optimiser made, read from its own state in the final checkpoint (Adam counts
    its steps per parameter): evidence independent of the trainer's counters."""
    (_, last), = checkpoint.list_checkpoints(run_dir)[-1:]
    _, state, _ = checkpoint.load(last, "autoencoder", fp)

    def count(opt):
        steps = {int(v["step"]) for v in opt["state"].values()}
        assert len(steps) <= 1, steps
        return steps.pop() if steps else 0

    return count(state["opt_g"]), count(state["opt_d"])


@pytest.mark.parametrize("schedule,updates", [
    # iterations 0-2 before gan_start: G; then even G (with the GAN term), odd D (the authors')
    ("alternating", ["G", "G", "G", "D", "G", "D", "G"]),
    # LDM's two-optimiser scheme: G every iteration, D too from gan_start
    ("joint", ["G", "G", "G", "G+D", "G+D", "G+D", "G+D"]),
])
def test_generator_discriminator_schedule(tmp_path, data, monkeypatch, schedule, updates):
    d_calls = []
    orig = train.PatchDiscriminator.forward

    def spy(self, x):
        d_calls.append(x.shape[0])
        return orig(self, x)

    monkeypatch.setattr(train.PatchDiscriminator, "forward", spy)
    p = run_params(steps=7, checkpoint_every=100)
    p["loss"]["gan_start"] = 3
    p["disc"]["schedule"] = schedule
    out = train.train(p, data, tmp_path / "run", tmp_path / "out", "a")
    n_g, n_d = sum("G" in u for u in updates), sum("D" in u for u in updates)
    assert (out["iterations"], out["generator_steps"], out["discriminator_steps"]) == (7, n_g, n_d)
    assert out["schedule"] == schedule
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in log] == updates
    assert [("d_loss" in r, "g_adv" in r) for r in log] == [
        ("D" in u, "G" in u and i >= 3) for i, u in enumerate(updates)]
    fp = train.fingerprint(train.config_mod.validate(p, "ae_run"), train.SplitReader(data, "train").images_sha256)
    assert _adam_steps(tmp_path / "run", fp) == (n_g, n_d)
    # D forwards: one per generator GAN term, two (real, fake) per discriminator update
    assert len(d_calls) == sum("G" in u and i >= 3 for i, u in enumerate(updates)) + 2 * n_d


def test_no_autoencoder_ema_by_default(tmp_path, data):
    p = run_params(steps=2)
    del p["train"]["ema_decay"]
    out = train.train(p, data, tmp_path / "run", tmp_path / "out", "a")
    assert out["ema"] is False
    assert not any(k.startswith("ema.") for k in weights(tmp_path / "out"))


def test_padding_is_part_of_the_fingerprint(data):
    run = train.config_mod.validate(run_params(), "ae_run")
    sha = train.SplitReader(data, "train").images_sha256
    sd = {**run, "config": {**MICRO, "downsample_padding": "sd"}}
    assert train.fingerprint(run, sha) != train.fingerprint(sd, sha)
    assert train.fingerprint(run, sha) == train.fingerprint({**run, "config": {**MICRO, "downsample_padding": "symmetric"}},
                                                            sha)


def test_fingerprint_keeps_the_value_that_keys_existing_run_folders():
    """Run folders and checkpoints are found by the fingerprint: the value the trainer computed
    before the function moved here (from `config.ae_fingerprint`) must not change."""
    run = train.config_mod.validate(run_params(), "ae_run")
    assert train.fingerprint(run, "a" * 64) == "b2a7b111d0d5839766ac5cacea2d2c700423af8662df51adbf4a0349e9004e50"
    # With a constant schedule the run's length (which checkpoints record and resume compares:
    # tests/test_run_identity.py), its bookkeeping intervals and train.extend keep the run's
    # folder; the data do not, nor does the length where the schedule depends on it.
    longer = {**run, "train": {**run["train"], "steps": 99, "checkpoint_every": 7, "log_every": 3, "extend": True}}
    assert train.fingerprint(longer, "a" * 64) == train.fingerprint(run, "a" * 64)
    assert train.fingerprint(run, "b" * 64) != train.fingerprint(run, "a" * 64)
    cosine = {**run, "train": {**run["train"], "lr_decay": "cosine"}}
    assert train.fingerprint({**cosine, "train": {**cosine["train"], "steps": 99}}, "a" * 64) != train.fingerprint(
        cosine, "a" * 64)


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


_SYNC_BN_WORKER = r"""
import json, os, sys, copy
import torch
from specmatch.autoencoder import train
from specmatch.autoencoder.discriminator import PatchDiscriminator, sync_batchnorm
from specmatch.errors import SpecmatchError
from specmatch.runtime import distributed

device, out = sys.argv[1], sys.argv[2]
info = distributed.setup("cpu")  # gloo: the only backend two processes can share one GPU with
rank, world = info.rank, info.world_size
res = {"world": world}
torch.manual_seed(0)
plain = PatchDiscriminator(3, 8, 2)
try:
    train.prepare_discriminator(copy.deepcopy(plain), True, info)
    res["refused"] = None
except SpecmatchError as e:
    res["refused"] = str(e)
res["off"] = type(train.prepare_discriminator(copy.deepcopy(plain), False, info)).__name__
synced = sync_batchnorm(copy.deepcopy(plain))
res["norms"] = sorted({type(m).__name__ for m in synced.modules() if "Norm" in type(m).__name__})
res["same_state"] = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), synced.state_dict().values()))
torch.manual_seed(1)
x = torch.randn(8, 3, 32, 32)
synced.eval(); plain.eval()
res["eval_equal"] = bool(torch.allclose(synced(x), plain(x)))
synced.train(); plain.train()
if device == "cpu":
    try:
        synced(x[rank * 4:(rank + 1) * 4])
        res["train_forward"] = "ran"
    except ValueError as e:
        res["train_forward"] = str(e)
else:  # one GPU, two processes: the global batch statistics of SyncBatchNorm
    synced, plain = synced.to(device), plain.to(device)
    x = x.to(device)
    mine = synced(x[rank * 4:(rank + 1) * 4])
    ref = plain(x)
    res["forward_err"] = float((mine - ref[rank * 4:(rank + 1) * 4]).abs().max())
    mine.sum().backward(); ref.sum().backward()
    grads = [p.grad for p in synced.parameters()]
    for g in grads:
        torch.distributed.all_reduce(g)
    res["grad_err"] = max(float((g - p.grad).abs().max()) for g, p in zip(grads, plain.parameters()))
    res["running_mean_err"] = max(float((a - b).abs().max()) for a, b in zip(
        [m.running_mean for m in synced.modules() if hasattr(m, "running_mean")],
        [m.running_mean for m in plain.modules() if hasattr(m, "running_mean")]))
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(res, f)
distributed.teardown()
"""


def _sync_bn_run(tmp_path, device: str) -> list[dict]:
    script = tmp_path / "sync_bn_worker.py"
    script.write_text(_SYNC_BN_WORKER)
    cmd, env = torchrun_command([], nproc=2)
    cmd = cmd[:cmd.index("-m", 3)] + [str(script), device, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_discriminator_sync_batchnorm_in_two_rank_run(tmp_path):
    """In a 2-process job the discriminator's BatchNorms become SyncBatchNorm over the job with
    the same weights and statistics (eval forward unchanged), and the train-mode forward takes
    the synchronised path, which PyTorch runs on GPUs only: on CPU processes it raises, and the
    trainer refuses `sync_batchnorm` there with an error naming the key."""
    for res in _sync_bn_run(tmp_path, "cpu"):
        assert res["world"] == 2
        assert res["norms"] == ["SyncBatchNorm"] and res["same_state"] and res["eval_equal"]
        assert "expected input tensor to be on GPU" in res["train_forward"]
        assert "disc.sync_batchnorm" in res["refused"] and "GPUs only" in res["refused"]
        assert res["off"] == "PatchDiscriminator"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's SyncBatchNorm computes on GPUs only")
def test_sync_batchnorm_statistics_on_gpu(tmp_path):
    """Two processes on one GPU, each with half the batch: outputs, summed gradients and running
    statistics equal those of plain BatchNorm on the whole batch."""
    for res in _sync_bn_run(tmp_path, "cuda:0"):
        assert res["forward_err"] < 1e-4 and res["grad_err"] < 1e-3 and res["running_mean_err"] < 1e-5


def test_mask_draw_per_rank_option():
    shared = objectives.objective("dsm")
    per_rank = objectives.objective("dsm", {"mask_draw": "per-rank"})
    assert all(objectives.draw_mask(shared, 0, s, 0) == objectives.draw_mask(shared, 0, s, 1) for s in range(50))
    differ = [objectives.draw_mask(per_rank, 0, s, 0) != objectives.draw_mask(per_rank, 0, s, 1) for s in range(50)]
    assert 10 < sum(differ) < 50
    with pytest.raises(SpecmatchError, match="mask_draw"):
        objectives.objective("dsm", {"mask_draw": "random"})


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path, data):
    """torchrun with 2 CPU processes and the same global batch follows the 1-process run. The
    GAN is off here: the PatchGAN's BatchNorm takes batch statistics per process (as in the
    reference multi-GPU training), so with it on the two runs legitimately differ; the second
    torchrun run below covers the discriminator's all-reduce path."""
    params = run_params(steps=3)
    params["train"]["hflip"] = 0.5
    params["loss"]["gan_start"] = 100
    params["disc"]["sync_batchnorm"] = False  # PyTorch's SyncBatchNorm runs on GPUs only
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
    # iterations 0 G, 1 D, 2 G
    assert log[-1]["d_step"] == 1 and log[-1]["g_step"] == 2
    assert all(np.isfinite(r["d_loss"]) for r in log if "d_loss" in r)
