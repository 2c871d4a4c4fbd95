"""`train.compile` / `sample.compile`: torch.compile of the networks' forwards (issue 29).

Inductor compiles one small model here (SiT-tiny/2, tens of seconds on 2 cores; its FX graph
cache makes the later compiles of the same graphs cheap): its training run against the eager one,
and its checkpoints loaded by an eager run and back. The autoencoder's path (a generator with
graph breaks, a fullgraph discriminator) runs under the `aot_eager` backend: dynamo and AOT
autograd capture the same graphs without inductor's C++ build.

Tolerance: compiled and eager run the same float32 arithmetic in another order (fused kernels,
reassociated reductions), so one forward differs by a few float32 roundings, ~1e-6 relative;
four Adam steps (lr 1e-3) keep the losses and weights within 1e-4 relative (1e-5 absolute for
weights near zero). A wrong graph (a dropped conditioning input, a stale guard) is off by far
more.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from specmatch.autoencoder import train as ae_train
from specmatch.diffusion import models
from specmatch.diffusion import train as diff_train
from specmatch.runtime import checkpoint
from specmatch.runtime.training import compile_forward

from conftest import MICRO_AE, weights

RTOL, ATOL = 1e-4, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _sit(compile_: bool, steps: int = 4) -> dict:
    return {"autoencoder": "micro", "model": "SiT-tiny/2", "process": {"kind": "linear"}, "conditional": True,
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, "precision": "fp32", "compile": compile_}}


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, {k}: {m}")


def test_compiled_diffusion_run_matches_eager_and_checkpoints_cross(micro_latents, tmp_path):
    lat = micro_latents[2]
    runs = {}
    for c in (False, True):
        d = tmp_path / ("compiled" if c else "eager")
        diff_train.train(_sit(c), lat, d / "out", "a", run_dir=d / "run")
        runs[c] = d
    # The training forward, compiled against eager: the same losses from the first step (same
    # weights) on, and the same final weights.
    torch.testing.assert_close(torch.tensor(_losses(runs[True] / "run")), torch.tensor(_losses(runs[False] / "run")),
                               rtol=RTOL, atol=0.0)
    _close(weights(runs[True] / "out"), weights(runs[False] / "out"), "output of the compiled run vs eager")
    # Checkpoints keep the eager key names: nothing compiled leaks into the files.
    for step, folder in checkpoint.list_checkpoints(runs[True] / "run"):
        keys = set(load_file(folder / "model.safetensors"))
        assert not any("_orig_mod" in k for k in keys), sorted(keys)[:5]
        assert keys == set(load_file(runs[False] / "run" / "checkpoints" / folder.name / "model.safetensors"))

    # A compiled run's step-2 checkpoint resumed by an eager run, and an eager one's by a compiled
    # run (`compile` is not in the fingerprint): both finish where the uninterrupted runs did.
    for src, resume_compiled in ((True, False), (False, True)):
        d = tmp_path / f"resume-{src}-{resume_compiled}"
        shutil.copytree(runs[src] / "run", d / "run")
        for step, folder in checkpoint.list_checkpoints(d / "run"):
            if step > 2:
                shutil.rmtree(folder)
        diff_train.train(_sit(resume_compiled), lat, d / "out", "a", run_dir=d / "run")
        _close(weights(d / "out"), weights(runs[src] / "out"), f"resumed from a {'compiled' if src else 'eager'} run")

    # The compiled forward itself, on new weights: outputs equal eager's within float32 rounding.
    torch.manual_seed(0)
    net = models.build("SiT-tiny/2", in_channels=4, input_size=16, num_classes=10)
    x, t, y = torch.randn(4, 4, 16, 16), torch.rand(4), torch.randint(0, 10, (4,))
    eager = net(x, t, y)
    compile_forward(net, True)
    torch.testing.assert_close(net(x, t, y), eager, rtol=1e-5, atol=1e-6)
    assert not any("_orig_mod" in k for k in net.state_dict())


@pytest.fixture
def aot_eager_compiles(monkeypatch) -> list:
    """`nn.Module.compile` through dynamo with the `aot_eager` backend (no C++ compile: seconds,
    not a minute); the list of (module class, fullgraph) it was called with."""
    real = torch.nn.Module.compile
    seen = []

    def aot_eager(self, **kw):
        seen.append((type(self).__name__, kw.get("fullgraph")))
        return real(self, backend="aot_eager", **kw)

    monkeypatch.setattr(torch.nn.Module, "compile", aot_eager)
    return seen


def test_autoencoder_compile_path(micro_latents, tmp_path, aot_eager_compiles):
    """train-ae with `train.compile`: the generator (graph breaks allowed) and the discriminator
    (fullgraph) through dynamo, past the GAN start, equal to eager; eager key names."""
    seen = aot_eager_compiles
    runs = {}
    for c in (False, True):
        d = tmp_path / str(c)
        run = {"dataset": "embedded", "config": MICRO_AE, "variant": "dsm",
               "train": {"steps": 4, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.0, "log_every": 1,
                         "seed": 3, "precision": "fp32", "compile": c},
               "loss": {"lpips_weight": 0.0, "gan_start": 1, "dsm_ks": [0, 8]}, "disc": {"channels": 8, "n_layers": 2}}
        ae_train.train(run, micro_latents[0], d / "run", d / "out", "t")
        runs[c] = d
    assert seen == [("_Generator", False), ("PatchDiscriminator", True)]
    _close(weights(runs[True] / "out"), weights(runs[False] / "out"), "compiled autoencoder vs eager")
    ck = checkpoint.list_checkpoints(runs[True] / "run")[-1][1]
    assert not any("_orig_mod" in k for k in load_file(ck / "model.safetensors"))


def test_sampler_compile_path(micro_latents, tmp_path, aot_eager_compiles):
    """`sample.compile`: the network compiled (fullgraph, through dynamo with `aot_eager`) makes
    the same images as eager, under the same sample-set fingerprint (compile is not in it)."""
    from specmatch.diffusion import sample

    from conftest import load_split

    data, ae, lat = micro_latents
    run = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
           "train": {"steps": 2, "batch_size": 8, "device": "cpu", "lr": 1e-3, "ema_decay": 0.5, "log_every": 1}}
    diff_train.train(run, lat, tmp_path / "uvit", "u", run_dir=tmp_path / "urun")
    seen = aot_eager_compiles
    got = {}
    for c in (False, True):
        p = {"method": "dpm-solver", "steps": 3, "n_samples": 4, "shard_size": 2, "batch_size": 2, "device": "cpu",
             "seed": 4, "compile": c}
        proto = sample.sample(tmp_path / "uvit", ae, p, "u", tmp_path / f"out-{c}", work_dir=tmp_path / f"work-{c}")
        got[c] = (proto.fingerprint, load_split(tmp_path / f"out-{c}", sample.SPLIT)[0])
    assert seen == [("UViT", True)]
    assert got[True][0] == got[False][0]
    np.testing.assert_array_equal(got[True][1], got[False][1])
