"""bf16 on the CPU (`train.precision: bf16`): the same seeded runs of every trainer in bf16 and in
fp32 agree within the rounding bf16 explains, stay finite, really run autocast in bf16, and keep
the spectral terms (ESM loss, DSM masks, DoG targets) in float32.

Tolerance. bf16 keeps 8 significant bits, so one rounding has a relative error of at most
u = 2^-8 (about 0.39%). The first loss differs from fp32's only by the roundings of one forward
pass through a few matmuls/convolutions (their accumulation stays float32), a few u; every update
then feeds its own rounding error into the weights, and over s steps of Adam (whose step size does
not depend on the gradient's scale) the deviations add up at most linearly. So step s (1-based) is
held to |L_bf16 - L_fp32| <= (4 + s) u max(|L_fp32|, mean |L_fp32| over the run): the second term
keeps terms that cross zero (the generator's GAN loss, the alignment cosine) from a relative test
they cannot pass. At 30 steps that is 13.3% of the loss; what we measure is at most 4.5% (KL)
and under 1% (the total loss). The bound is not loose: a 6-step SD-VAE with its GAN from step 3
reached 1.03 times it (the adaptive GAN weight is most sensitive right after the GAN start), so
the GAN starts mid-run here. A loss computed wholly in bf16 where it must not be (a spectrum's
logs, a variance) is caught by the dtype checks below rather than by this bound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specmatch import spectral
from specmatch.autoencoder import train as ae_train
from specmatch.diffusion import train as diff_train
from specmatch.runtime.training import use_bf16

from conftest import MICRO_AE

U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits)
STEPS = 30
ENC = "efficientnet-lite0-s8"


pytestmark = pytest.mark.usefixtures("one_thread")


def tolerance(step: int, ref: float, scale: float) -> float:
    return (4 + step) * U * max(abs(ref), scale)


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


class Watch:
    """What ran under autocast during a training run: the output dtypes of every Linear and
    Conv2d, and of the spectral functions (with whether autocast was on at their call)."""

    SPECTRAL = ("esm_loss", "block_lowpass", "dog_filter")

    def __init__(self, monkeypatch):
        self.layers: set[torch.dtype] = set()
        self.spectral: dict[str, set[tuple[bool, torch.dtype]]] = {k: set() for k in self.SPECTRAL}
        for name in self.SPECTRAL:
            real = getattr(spectral, name)

            def wrapped(*a, _real=real, _name=name, **kw):
                out = _real(*a, **kw)
                self.spectral[_name].add((torch.is_autocast_enabled("cpu"), out.dtype))
                return out

            monkeypatch.setattr(spectral, name, wrapped)

    def __enter__(self):
        def hook(module, args, out):
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and isinstance(out, torch.Tensor):
                self.layers.add(out.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _compare(a: list[dict], b: list[dict], keys: tuple[str, ...], what: str) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for k in keys:
        ref = np.array([r[k] for r in a if k in r])
        got = np.array([r[k] for r in b if k in r])
        assert len(ref) == len(got) > 0, f"{what}: term {k} logged in one run only"
        assert np.isfinite(got).all() and np.isfinite(ref).all(), f"{what}: non-finite {k}: {got}"
        steps = np.array([r["step"] for r in a if k in r])
        tol = np.array([tolerance(s, x, np.abs(ref).mean()) for s, x in zip(steps, ref)])
        bad = np.abs(got - ref) > tol
        assert not bad.any(), (f"{what}: {k} in bf16 departs from fp32 beyond (4+s)u at steps {steps[bad]}: "
                               f"bf16 {got[bad]}, fp32 {ref[bad]}, tolerance {tol[bad]}")
    for r in b:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float)), f"{what}: non-finite log line {r}"


def test_precision_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (use_bf16("auto", cpu), use_bf16("auto", cuda)) == (False, True)
    assert use_bf16("bf16", cpu) and use_bf16("bf16", cuda)
    assert not use_bf16("fp32", cpu) and not use_bf16("fp32", cuda)


def test_spectral_terms_stay_float32_under_autocast():
    """Called inside bf16 autocast with bf16 inputs, the spectral functions return float32 equal
    to their value on the same numbers in float32 (autocast would run their matmuls in bf16)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    y = torch.randn(2, 8, 8, 8, generator=g).bfloat16()
    cases = {"esm_loss": lambda: spectral.esm_loss(x, z), "block_lowpass": lambda: spectral.block_lowpass(z, 8),
             "dog_filter": lambda: spectral.dog_filter(y), "scale_lowpass": lambda: spectral.scale_lowpass(z, 2)}
    for name, f in cases.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = f()
        assert got.dtype == torch.float32, f"spectral.{name} under bf16 autocast returned {got.dtype}, expected float32"
        ref = {"esm_loss": lambda: spectral.esm_loss(x, z.float()),
               "block_lowpass": lambda: spectral.block_lowpass(z.float(), 8),
               "dog_filter": lambda: spectral.dog_filter(y.float()),
               "scale_lowpass": lambda: spectral.scale_lowpass(z.float(), 2)}[name]()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"spectral.{name}: {m}")


MICRO_DISC = {"channels": 8, "n_layers": 2}


def _ae_run(variant: str, precision: str, loss: dict) -> dict:
    return {"dataset": "embedded", "config": MICRO_AE, "variant": variant,
            "train": {"steps": STEPS, "batch_size": 4, "device": "cpu", "lr": 1e-3, "warmup_steps": 2,
                      "ema_decay": 0.0, "checkpoint_every": 1000, "log_every": 1, "seed": 3, "precision": precision},
            "loss": {"lpips_weight": 0.0, **loss}, "disc": MICRO_DISC}


@pytest.mark.parametrize("variant,loss,spectral_used", [
    ("sdvae", {"gan_start": STEPS // 2}, ()),
    ("esm", {}, ("esm_loss",)),
    ("dsm", {"dsm_ks": [8, 10]}, ("block_lowpass",)),
])
def test_autoencoder_bf16_matches_fp32(variant, loss, spectral_used, micro_latents, tmp_path, monkeypatch):
    data = micro_latents[0]
    logs = {}
    for precision in ("fp32", "bf16"):
        watch = Watch(monkeypatch)
        with watch:
            ae_train.train(_ae_run(variant, precision, loss), data, tmp_path / f"run-{precision}",
                           tmp_path / f"out-{precision}", "t")
        logs[precision] = _log(tmp_path / f"run-{precision}")
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert want in watch.layers, f"{variant} {precision}: layer outputs {watch.layers}, expected {want}"
        for name in spectral_used:
            # Called with autocast on in the bf16 run (the DSM mask of the latent, inside the
            # generator's forward), and float32 out all the same.
            seen = watch.spectral[name]
            assert {d for _, d in seen} == {torch.float32}, f"{variant} {precision}: spectral.{name} returned {seen}"
            assert any(on for on, _ in seen) == (precision == "bf16"), f"{variant} {precision}: {name} {seen}"
    keys = ("loss", "l1", "kl") + {"sdvae": ("g_adv", "d_loss"), "esm": ("esm",), "dsm": ()}[variant]
    _compare(logs["fp32"], logs["bf16"], keys, f"{variant} autoencoder")
    if variant == "sdvae":  # the GAN phase was reached: both updates ran in bf16
        d_turns = sum(s % 2 for s in range(STEPS // 2, STEPS))  # alternating: odd iterations from gan_start
        assert sum("d_loss" in r for r in logs["bf16"]) == d_turns
        assert sum("g_adv" in r for r in logs["bf16"]) == STEPS - STEPS // 2 - d_turns


@pytest.fixture(scope="module")
def tcache(micro_latents, tmp_path_factory):
    from specmatch.alignment import targets

    out = tmp_path_factory.mktemp("targets") / "tg"
    targets.extract({"encoder": ENC, "image_size": 64, "device": "cpu", "batch_size": 7, "shard_size": 10,
                     "dtype": "float32"}, micro_latents[0], "t", out)
    return out


def _diff_run(model: str, kind: str, precision: str, dog: bool) -> dict:
    p = {"autoencoder": "micro", "model": model, "process": {"kind": kind}, "conditional": True,
         "train": {"steps": STEPS, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.0,
                   "checkpoint_every": 1000, "log_every": 1, "seed": 5, "precision": precision}}
    if dog:
        p["alignment"] = {"kind": "dog", "encoder": ENC, "image_size": 64, "depth": 2, "proj_hidden": 64}
    return p


@pytest.mark.parametrize("model,kind,dog", [("UViT-tiny/2", "vp-linear", False), ("SiT-tiny/2", "linear", True)])
def test_diffusion_bf16_matches_fp32(model, kind, dog, micro_latents, tcache, tmp_path, monkeypatch):
    lat = micro_latents[2]
    logs = {}
    for precision in ("fp32", "bf16"):
        watch = Watch(monkeypatch)
        with watch:
            diff_train.train(_diff_run(model, kind, precision, dog), lat, tmp_path / f"out-{precision}", "a",
                             run_dir=tmp_path / f"run-{precision}", targets=tcache if dog else None)
        logs[precision] = _log(tmp_path / f"run-{precision}")
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert want in watch.layers, f"{model} {precision}: layer outputs {watch.layers}, expected {want}"
        if dog:
            assert {d for _, d in watch.spectral["dog_filter"]} == {torch.float32}, watch.spectral
    keys = ("loss", "diffusion_loss", "align_loss") if dog else ("loss",)
    _compare(logs["fp32"], logs["bf16"], keys, model)
