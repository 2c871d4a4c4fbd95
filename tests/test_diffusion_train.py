"""The diffusion trainer (`train-diffusion`): resume identity after SIGKILL, SIGTERM checkpoints,
DDP on gloo, non-finite losses, foreign checkpoints, run folders keyed by the inputs, the label
dropout wiring, the learning signal, `load_trained` and bad inputs.

Everything runs on the latent cache of a micro autoencoder (4x16x16 latents, 48 entries) with
the `tiny` networks; the code path is the product's, only the sizes differ.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
import torch

from specmatch import config
from specmatch.autoencoder import latents
from specmatch.cli import main as cli_main
from specmatch.diffusion import artifact, models, train
from specmatch.errors import SpecmatchError
from specmatch.runtime import checkpoint, distributed, signals
from specmatch.runtime.training import batch_indices

from conftest import MICRO_AE_RUN, assert_bitwise, kill_and_resume, sigterm_run, torchrun_command, weights



def uvit(steps=4, **train_kw):
    return {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, **train_kw}}


def sit(steps=4, **train_kw):
    return {"autoencoder": "micro", "model": "SiT-tiny/2", "process": {"kind": "linear"}, "conditional": True,
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, **train_kw}}


@pytest.fixture(scope="module")
def micro(micro_latents):
    return micro_latents


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):
    """A finished 2-step U-ViT run (EMA on): (params, run folder, output folder)."""
    root = tmp_path_factory.mktemp("uvit")
    params = uvit(steps=2)
    train.train(params, micro[2], root / "out", "u", run_dir=root / "run")
    return params, root / "run", root / "out"


def _fingerprint(params, lat) -> str:
    return train.fingerprint(config.validate(params, "diff_run"), train.latents_identity(lat))


def _train_args(lat, run_dir, out, params, name="t"):
    return ["train-diffusion", "--latents", str(lat), "--run-dir", str(run_dir), "--out", str(out), "--name", name,
            "--params", json.dumps(params)]


# --------------------------------------------------------------------------- resumption, signals


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, micro):
    lat = micro[2]
    params = uvit(steps=6)
    full = train.train(params, lat, tmp_path / "outA", "a", run_dir=tmp_path / "runA")
    assert full["steps"] == 6 and full["ema"] is True
    kill_and_resume(_train_args(lat, tmp_path / "runB", tmp_path / "outB", params), tmp_path / "runB",
                    tmp_path / "outB", 6)
    a, b = weights(tmp_path / "outA"), weights(tmp_path / "outB")
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("net.") for k in a)
    assert_bitwise(a, b)


def test_sigterm_writes_checkpoint_and_exits_3(tmp_path, micro):
    lat = micro[2]
    params = uvit(steps=100000, checkpoint_every=100000)
    step, ckpt = sigterm_run(_train_args(lat, tmp_path / "run", tmp_path / "out", params), tmp_path / "run",
                             tmp_path / "out")
    meta = checkpoint.verify(ckpt, kind="diffusion", fingerprint=_fingerprint(params, lat))
    assert meta["step"] == step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, micro, monkeypatch):
    real = train.LatentReader.scaled_sample
    calls = []

    def poisoned(self, mu, logvar, eps):  # the posterior sample of each step's rows
        z = real(self, mu, logvar, eps)
        calls.append(len(mu))
        return z * float("nan") if len(calls) == 4 else z  # the 4th draw is step 3's

    monkeypatch.setattr(train.LatentReader, "scaled_sample", poisoned)
    with pytest.raises(train.NonFiniteLoss, match=r"step 3 .*step-00000002"):
        train.train(uvit(steps=6), micro[2], tmp_path / "out", "a", run_dir=tmp_path / "run")
    assert len(calls) == 4
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "out").exists()


def test_foreign_checkpoint_refused(tmp_path, micro, trained):
    params, run_dir, _ = trained
    assert checkpoint.list_checkpoints(run_dir)
    other_model = {**params, "model": "SiT-tiny/2"}
    other_process = {**params, "process": {"kind": "linear"}}
    for p in (other_model, other_process):
        with pytest.raises(checkpoint.ForeignCheckpointError, match="fingerprint"):
            train.train(p, micro[2], tmp_path / "out", "b", run_dir=run_dir)
    assert not (tmp_path / "out").exists()


def test_runs_root_keys_the_run_folder_by_params_and_latents(tmp_path, micro):
    data, ae_dir, lat = micro
    params = uvit(steps=1, batch_size=4)
    root = tmp_path / "runs"
    # In-process, the CLI's early stop handlers (SIGINT among them) would outlive the command.
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        code = cli_main(["train-diffusion", "--latents", str(lat), "--runs-root", str(root), "--out",
                         str(tmp_path / "o1"), "--name", "a", "--params", json.dumps(params)])
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    assert code == 0
    fp1 = _fingerprint(params, lat)
    assert [p.name for p in root.iterdir()] == [fp1[:12]]
    assert [s for s, _ in checkpoint.list_checkpoints(root / fp1[:12])] == [1]
    assert json.loads((tmp_path / "o1" / "diffusion.json").read_text())["fingerprint"] == fp1
    # Re-extracted latents (another posterior seed): another manifest, another run folder.
    lat2 = tmp_path / "lat2"
    latents.extract({**MICRO_AE_RUN, "latents": {**MICRO_AE_RUN["latents"], "seed": 1}}, ae_dir, data, "micro", lat2)
    assert train.latents_identity(lat2) != train.latents_identity(lat)
    fp2 = _fingerprint(params, lat2)
    summary = train.train(params, lat2, tmp_path / "o2", "b", runs_root=root)
    assert summary["fingerprint"] == fp2 != fp1
    assert sorted(p.name for p in root.iterdir()) == sorted([fp1[:12], fp2[:12]])
    ckpt = checkpoint.list_checkpoints(root / fp2[:12])
    assert [s for s, _ in ckpt] == [1]
    checkpoint.verify(ckpt[0][1], kind="diffusion", fingerprint=fp2)
    with pytest.raises(SpecmatchError, match="exactly one"):
        train.train(params, lat, tmp_path / "o3", "c", run_dir=tmp_path / "r", runs_root=root)
    with pytest.raises(SpecmatchError, match="exactly one"):
        train.train(params, lat, tmp_path / "o3", "c")
    assert not (tmp_path / "o3").exists() and not (tmp_path / "r").exists()



REPA = {"kind": "repa", "encoder": "efficientnet-lite0-s8", "image_size": 64, "depth": 2, "proj_hidden": 64}


def test_fingerprint_keeps_the_value_that_keys_existing_run_folders():
    """Run folders and checkpoints are found by the fingerprint: the values the trainer computed
    before the function moved here (from `config.diffusion_fingerprint`) must not change."""
    plain = config.validate(uvit(), "diff_run")
    assert train.fingerprint(plain, "lat") == "dfea1b704aa4b9739071722b13c9da40459a9e03aafbbead8fac71923c1372cf"
    repa = config.validate({**sit(), "alignment": REPA}, "diff_run")
    assert train.fingerprint(repa, "lat", "tgt") == "590c84fbeb4be5e99ccd6f52a40e24190511e34f933f008d52e6d487b7f54cb9"


def test_fingerprint_sees_only_the_alignment_that_acts():
    plain = config.validate(sit(), "diff_run")
    repa = config.validate({**sit(), "alignment": REPA}, "diff_run")
    fp = train.fingerprint(repa, "lat", "tgt")
    assert fp != train.fingerprint(plain, "lat", "tgt")
    assert fp != train.fingerprint(repa, "lat", "other-targets")
    other_sigma = {**repa, "alignment": {**repa["alignment"], "dog": {"sigma1": 0.3, "sigma2": 5.0}}}  # not repa's
    assert train.fingerprint(other_sigma, "lat", "tgt") == fp
    deeper = {**repa, "alignment": {**repa["alignment"], "depth": 3}}
    assert train.fingerprint(deeper, "lat", "tgt") != fp
    # a run without alignment ignores the target identity entirely
    assert train.fingerprint(plain, "lat", "a") == train.fingerprint(plain, "lat", "b")


def test_snapshot_steps_and_run_length_leave_the_fingerprint_alone():
    """...with a constant schedule, whose checkpoints serve every length (train.extend); with a
    cosine one the length shapes every update, so it is part of the run."""
    a = config.validate(uvit(), "diff_run")
    b = config.validate(uvit(steps=40, snapshot_steps=[2], checkpoint_every=5, log_every=3, extend=True), "diff_run")
    assert a["train"]["snapshot_steps"] == [] and a["train"]["extend"] is False
    assert train.fingerprint(a, "x") == train.fingerprint(b, "x")
    assert train.fingerprint(a, "x") != train.fingerprint(config.validate(uvit(lr=2e-3), "diff_run"), "x")
    assert (train.fingerprint(config.validate(uvit(lr_decay="cosine"), "diff_run"), "x")
            != train.fingerprint(config.validate(uvit(steps=40, lr_decay="cosine"), "diff_run"), "x"))

# --------------------------------------------------------------------------- what the network sees


def _record_labels(monkeypatch) -> list:
    seen: list = []
    real = models.build

    def build(*a, **kw):
        net = real(*a, **kw)
        net.register_forward_pre_hook(lambda mod, args: seen.append(
            None if args[2] is None else args[2].detach().clone()))
        return net

    monkeypatch.setattr(models, "build", build)
    return seen


def test_label_dropout_reaches_the_network(tmp_path, micro, monkeypatch):
    lat = micro[2]
    seen = _record_labels(monkeypatch)
    cache = latents.LatentReader(lat)
    null = int(cache.manifest["num_classes"])  # the null label is num_classes

    train.train(sit(steps=1, batch_size=8, label_dropout=1.0, ema_decay=0.0), lat, tmp_path / "o1", "a",
                run_dir=tmp_path / "r1")
    assert len(seen) == 1 and seen[0].tolist() == [null] * 8

    seen.clear()
    train.train(sit(steps=2, label_dropout=0.0, ema_decay=0.0), lat, tmp_path / "o2", "b", run_dir=tmp_path / "r2")
    assert len(seen) == 2
    for step, y in enumerate(seen):
        _, _, labels = cache.get(batch_indices(len(cache), 4, 5, step))
        assert y.tolist() == np.asarray(labels).tolist()  # the batch's own labels, none dropped
        assert (y < null).all()

    seen.clear()
    train.train(uvit(steps=1, ema_decay=0.0), lat, tmp_path / "o3", "c", run_dir=tmp_path / "r3")
    assert seen == [None]


def test_loss_decreases(tmp_path, micro):
    """The learning signal end to end: the epsilon-prediction loss on the micro cache falls."""
    params = uvit(steps=40, batch_size=8, ema_decay=0.0, checkpoint_every=1000)
    train.train(params, micro[2], tmp_path / "out", "a", run_dir=tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses


# --------------------------------------------------------------------------- outputs, inputs


def test_load_trained_reads_ema_by_default(micro, trained):
    params, _, out = trained
    w = weights(out)
    net, summary = artifact.load(out)
    state = net.state_dict()
    ema_keys = [k for k in w if k.startswith("ema.")]
    assert ema_keys and len(ema_keys) == len([k for k in w if k.startswith("net.")])
    differing = [k[4:] for k in ema_keys if not torch.equal(w[k], w["net." + k[4:]])]
    assert differing  # after 2 steps with decay 0.9 the average lags the raw weights
    for k in differing:
        assert torch.equal(state[k], w["ema." + k])
    raw, _ = artifact.load(out, use_ema=False)
    for k in differing:
        assert torch.equal(raw.state_dict()[k], w["net." + k])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    man = latents.read_manifest(micro[2])
    assert summary["latents"]["scale_factor"] == man["scale_factor"]
    assert summary["latents"]["autoencoder"] == "micro"
    assert summary["latents"]["manifest_sha256"] == train.latents_identity(micro[2])
    assert summary["model"] == params["model"] and summary["num_classes"] == 0 and summary["world_size"] == 1


def test_load_trained_refuses_other_folders(tmp_path, trained):
    with pytest.raises(SpecmatchError, match="diffusion.json"):
        artifact.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((trained[2] / "model.safetensors").read_bytes())
    with pytest.raises(SpecmatchError, match="not a trained diffusion model"):
        artifact.load(tmp_path)


def test_bad_inputs(tmp_path, micro, monkeypatch):
    lat = micro[2]
    r, o = tmp_path / "r", tmp_path / "o"
    with pytest.raises(SpecmatchError, match="unknown diffusion network"):
        train.train({**uvit(), "model": "UViT-huge/2"}, lat, o, "a", run_dir=r)
    with pytest.raises(SpecmatchError, match="model"):
        train.train({**uvit(), "model": "ResNet-50"}, lat, o, "a", run_dir=r)
    with pytest.raises(SpecmatchError, match="not a latent cache"):
        train.train(uvit(), tmp_path, o, "a", run_dir=r)
    with pytest.raises(SpecmatchError, match="fid_every"):  # the removed in-trainer probe is refused by name
        train.train(uvit(fid_every=2), lat, o, "a", run_dir=r)
    monkeypatch.setattr(train.distributed, "setup", lambda device: distributed.DistInfo(
        rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), backend=None, is_main=True))
    with pytest.raises(SpecmatchError, match="not divisible by the 3 processes"):
        train.train(uvit(batch_size=8), lat, o, "a", run_dir=r)
    assert not r.exists() and not o.exists()


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one(tmp_path, micro):
    """torchrun with 2 CPU processes and the same global batch follows the 1-process run: the
    batch, posterior noise, t, diffusion noise and label dropout are drawn for the global batch
    and split by rows. The conditional SiT with label dropout 0.5 exercises the split of every
    stream, the labels included."""
    lat = micro[2]
    params = sit(steps=3, batch_size=8, label_dropout=0.5)
    one = train.train(params, lat, tmp_path / "o1", "one", run_dir=tmp_path / "r1")
    cmd, env = torchrun_command(_train_args(lat, tmp_path / "r2", tmp_path / "o2", params))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "o2" / "diffusion.json").read_text())
    assert summary["world_size"] == 2 and one["world_size"] == 1
    assert summary["fingerprint"] == one["fingerprint"]
    a, b = weights(tmp_path / "o1"), weights(tmp_path / "o2")
    assert a.keys() == b.keys()
    # Float tolerance: the all-reduce sums the two halves' gradients in another order than one
    # process does, and the processes run with 1 thread instead of 2 (another summation order in
    # the matmuls), so weights agree to ~1e-6, not bitwise. Adam normalises gradients, which turns
    # float noise on a parameter whose true gradient is ~0 into steps of up to ~lr (1e-3); a wrong
    # row split of any stream (batch, noise, t, dropout) moves weights by ~lr everywhere.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")
    la = [json.loads(x) for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    # The 2-process log is the mean of the ranks' losses, i.e. the global batch's loss.
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in la], [r["loss"] for r in lb], rtol=1e-4)
