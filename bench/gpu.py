"""The prepared device check (issue 29): everything a first GPU run would execute for the first
time, run once, measured, and written as one JSON and one Markdown table.

Parts (each a function below; `--quick` runs every one of them at micro sizes on the CPU, so the
test suite keeps them working, `tests/test_bench_gpu.py`):
1. precision: the trainers (`train-ae` SD-VAE with its GAN phase, ESM-AE, DSM-AE; `train-diffusion`
   U-ViT and SiT with DoG-REPA) on a micro dataset, same seed, bf16 against fp32: every logged
   term within (4 + s) u max(|L_fp32|, mean |L_fp32|) at step s, u = 2^-8 (tests/test_precision.py
   derives it), nothing non-finite;
2. train steps: SiT-B/2 (batch 256, halved until it fits), U-ViT-S/2 and the f16d16 autoencoder
   at the authors' per-GPU batch, bf16 autocast, eager and `torch.compile`d: step time, model
   TFLOP/s (FLOPs of one forward and backward from `torch.utils.flop_counter.FlopCounterMode`)
   and MFU against the device's dense bf16 peak (`PEAKS`);
3. FID features: our `inception-fid` path (`metrics.fid.embed`) against pytorch-fid's
   `InceptionV3` on the same images in memory, images/s, and the statistics' differences;
4. sampling: images/s of DPM-Solver 20 steps (on U-ViT-S/2: DPM-Solver needs the VP path) and
   Euler-Maruyama 250 steps (SiT-B/2), bf16, no decoding;
5. torchrun: `specmatch train-diffusion` under torchrun (one process), SIGUSR1 mid-run (a
   checkpoint and exit status 3), `--resume auto` to the end, and the final weights compared
   bitwise with an uninterrupted run; plus a one-rank process group on the device's backend
   (NCCL on a GPU, gloo on the CPU) with an all-reduce. A one-process torchrun job does not
   create a process group (`runtime.distributed.setup`: WORLD_SIZE 1 is a single process), so
   the backend is exercised by the second half.

    PYTHONPATH=src python bench/gpu.py --out results/bench_gpu            # one GPU, < 8 minutes
    PYTHONPATH=src python bench/gpu.py --quick --out /tmp/bench_gpu_quick  # CPU, micro sizes

Writes `<out>/gpu.json` and `<out>/gpu.md`. A part that fails is recorded with its error and
the others still run; the exit status is 1 if any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "src"))

from specmatch.autoencoder import model as ae_model  # noqa: E402
from specmatch.autoencoder import train as ae_train  # noqa: E402
from specmatch.autoencoder.objectives import Mask, objective  # noqa: E402
from specmatch.diffusion import models, samplers, transport  # noqa: E402
from specmatch.diffusion import train as diff_train  # noqa: E402

U = 2.0 ** -8  # bf16 unit roundoff

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first
# name contained in the device name wins, so the PCIe H100 comes before the SXM one.
PEAKS = [("H100 PCIe", 756.0, "H100 PCIe"), ("H100", 989.0, "H100 SXM"), ("H200", 989.0, "H200"),
         ("A100", 312.0, "A100")]

MICRO_AE = {"name": "micro", "channels": [8, 16], "z_channels": 4, "num_res_blocks": 1, "norm_groups": 4}
ENC = "efficientnet-lite0-s8"


def peak_for(name: str) -> tuple[float | None, str | None]:
    for key, tflops, label in PEAKS:
        if key.lower() in name.lower():
            return tflops, label
    return None, None


class Bench:
    def __init__(self, quick: bool, device: torch.device, work: Path):
        self.quick, self.device, self.work = quick, device, work
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn, n: int) -> float:
        """Seconds per call of `fn`, after one untimed call (allocations, autotuning, compilation)."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - t0) / n

    # ------------------------------------------------------------------ 1. precision

    def dataset(self) -> Path:
        from specmatch.data.prepare import prepare

        out = self.work / "embedded"
        if not out.exists():
            prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 24, "n_test": 8,
                     "shard_size": 10}, "embedded", out)
        return out

    def latents_and_targets(self) -> tuple[Path, Path]:
        from specmatch.alignment import targets
        from specmatch.autoencoder import latents

        lat, tg = self.work / "lat", self.work / "tg"
        if not lat.exists():
            run = {"dataset": "embedded", "config": MICRO_AE, "variant": "sdvae",
                   "train": {"steps": 2, "batch_size": 4, "device": self.device.type, "ema_decay": 0.0,
                             "log_every": 1}, "loss": {"lpips_weight": 0.0},
                   "latents": {"batch_size": 7, "shard_size": 10, "device": self.device.type}}
            ae_train.train(run, self.dataset(), self.work / "aerun", self.work / "ae", "micro")
            latents.extract(run, self.work / "ae", self.dataset(), "micro", lat)
            targets.extract({"encoder": ENC, "image_size": 64, "device": self.device.type, "batch_size": 7,
                             "shard_size": 10, "dtype": "float32"}, self.dataset(), "t", tg)
        return lat, tg

    def precision(self) -> dict:
        steps = 12 if self.quick else 30
        dev = self.device.type
        out: dict = {"steps": steps, "unit_roundoff": U, "tolerance": "(4 + s) u max(|L_fp32|, mean |L_fp32|)",
                     "runs": {}}

        def compare(name, a, b, keys):
            worst, finite = 0.0, True
            for k in keys:
                ref = np.array([r[k] for r in a if k in r])
                got = np.array([r[k] for r in b if k in r])
                s = np.array([r["step"] for r in a if k in r])
                finite &= bool(np.isfinite(got).all() and np.isfinite(ref).all())
                tol = (4 + s) * U * np.maximum(np.abs(ref), np.abs(ref).mean())
                worst = max(worst, float((np.abs(got - ref) / tol).max()))
            out["runs"][name] = {"worst_diff_over_tolerance": round(worst, 4), "finite": finite,
                                 "ok": finite and worst <= 1.0}

        def log(run_dir):
            return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

        data = self.dataset()
        for variant, loss, keys in [("sdvae", {"gan_start": steps // 2}, ("loss", "l1", "kl", "g_adv", "d_loss")),
                                    ("esm", {}, ("loss", "l1", "kl", "esm")),
                                    ("dsm", {"dsm_ks": [8, 10]}, ("loss", "l1", "kl"))]:
            logs = {}
            for prec in ("fp32", "bf16"):
                run = {"dataset": "embedded", "config": MICRO_AE, "variant": variant,
                       "train": {"steps": steps, "batch_size": 4, "device": dev, "lr": 1e-3, "warmup_steps": 2,
                                 "ema_decay": 0.0, "checkpoint_every": 1000, "log_every": 1, "seed": 3,
                                 "precision": prec},
                       "loss": {"lpips_weight": 0.0, **loss}, "disc": {"channels": 8, "n_layers": 2}}
                d = self.work / f"prec-ae-{variant}-{prec}"
                ae_train.train(run, data, d / "run", d / "out", "t")
                logs[prec] = log(d / "run")
            compare(f"ae-{variant}", logs["fp32"], logs["bf16"], keys)
        lat, tg = self.latents_and_targets()
        for model, kind, dog in [("UViT-tiny/2", "vp-linear", False), ("SiT-tiny/2", "linear", True)]:
            logs = {}
            for prec in ("fp32", "bf16"):
                run = {"autoencoder": "micro", "model": model, "process": {"kind": kind}, "conditional": True,
                       "train": {"steps": steps, "batch_size": 4, "device": dev, "lr": 1e-3, "ema_decay": 0.0,
                                 "checkpoint_every": 1000, "log_every": 1, "seed": 5, "precision": prec}}
                if dog:
                    run["alignment"] = {"kind": "dog", "encoder": ENC, "image_size": 64, "depth": 2, "proj_hidden": 64}
                d = self.work / f"prec-{model.replace('/', '')}-{prec}"
                diff_train.train(run, lat, d / "out", "a", run_dir=d / "run", targets=tg if dog else None)
                logs[prec] = log(d / "run")
            compare(model + (" DoG-REPA" if dog else ""), logs["fp32"], logs["bf16"],
                    ("loss", "diffusion_loss", "align_loss") if dog else ("loss",))
        out["ok"] = all(r["ok"] for r in out["runs"].values())
        return out

    # ------------------------------------------------------------------ 2. train steps

    def _step_case(self, name: str, build, batch: int, compile_: bool) -> dict:
        """One training step (bf16 autocast, AdamW) of the module `build()` makes, at `batch`."""
        net, loss_fn = build(batch)
        # Quick mode captures the graph (dynamo, AOT autograd: where fullgraph breaks) without
        # inductor's code generation, a minute of C++ compilation on 2 cores; tests/test_compile.py
        # runs inductor itself on one small model.
        # fullgraph where the trainers ask for it (runtime.training.compile_forward); a wrapper
        # rather than compiling in place, so the FLOP count below runs the eager module.
        fwd = (torch.compile(net, backend="aot_eager" if self.quick else "inductor", fullgraph=not name.endswith("AE"),
                             dynamic=False) if compile_ else net)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):  # the paper's precision
                loss = loss_fn(fwd)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        step()  # compilation happens here
        self.sync()
        first = time.perf_counter() - t0
        sec = self.timed(step, 2 if self.quick else 10)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss_fn(net).backward()
        flops = counter.get_total_flops()
        peak, _ = peak_for(torch.cuda.get_device_name(self.device)) if self.cuda else (None, None)
        row = {"model": name, "batch": batch, "compiled": (("aot_eager" if self.quick else "inductor") if compile_
                                                           else False), "step_s": sec, "first_step_s": first,
               "flops_per_step": flops, "tflops_per_s": flops / sec / 1e12,
               "mfu": flops / sec / 1e12 / peak if peak else None}
        # Where the time goes, when the MFU is low (under 40%) or unknown (no peak: the CPU).
        if name.startswith("SiT") and not compile_ and (row["mfu"] is None or row["mfu"] < 0.4):
            row["profile"] = self._profile(step)
        return row

    def _profile(self, step) -> list[dict]:
        """The ten ops of most self time over three steps (torch.profiler)."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            self.sync()
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:10]
        total = sum(getattr(e, key) for e in prof.key_averages()) or 1.0
        return [{"op": e.key, "self_ms": getattr(e, key) / 1000 / 3, "share": getattr(e, key) / total}
                for e in events]

    def _fit(self, name, build, batch, compile_) -> dict:
        """`_step_case` at `batch`, halved on CUDA out-of-memory down to 1."""
        while True:
            try:
                return self._step_case(name, build, batch, compile_)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch //= 2
                torch.cuda.empty_cache()

    def train_steps(self) -> dict:
        dev = self.device
        q = self.quick

        def diffusion(model, kind, classes, c, size):
            def build(batch):
                net = models.build(model, in_channels=c, input_size=size, num_classes=classes).to(dev)
                path = transport.make_path(kind)
                g = torch.Generator(device=dev).manual_seed(0)
                x0 = torch.randn(batch, c, size, size, device=dev, generator=g)
                y = torch.randint(0, classes, (batch,), device=dev, generator=g) if classes else None

                def loss(f):
                    t = path.sample_t(batch, g, dev)
                    x_t, target = path.interpolate(x0, torch.randn_like(x0), t)
                    return path.loss(f(x_t, t, y).float(), target).mean()
                return net, loss
            return build

        def autoencoder(cfg, res):
            def build(batch):
                ae = ae_model.build(ae_model.config(cfg)).to(dev)
                gen = ae_train._Generator(ae)
                obj = objective("sdvae", {"lpips_weight": 0.0})
                g = torch.Generator(device=dev).manual_seed(0)
                x = torch.rand(batch, 3, res, res, device=dev, generator=g) * 2 - 1
                cfg_ = ae.cfg
                h = res // cfg_.down_factor
                noise = torch.randn(batch, cfg_.z_channels, h, h, device=dev, generator=g)

                def loss(f):
                    x_hat, _, kl = f(x, noise, Mask(), obj)
                    return (x - x_hat.float()).abs().mean() + obj.kl_weight * kl.mean()
                return gen, loss
            return build

        if q:
            cases = [("SiT-tiny/2", diffusion("SiT-tiny/2", "linear", 10, 4, 16), 8, True),
                     ("UViT-tiny/2", diffusion("UViT-tiny/2", "vp-linear", 0, 4, 16), 8, False),
                     ("micro AE", autoencoder(MICRO_AE, 32), 4, False)]
        else:
            # SiT-B/2 on the public SD-VAE's 4x32x32 latents (E3); U-ViT-S/2 at 128 per GPU (the
            # U-ViT recipe's 1024 over 8 GPUs); the f16d16 autoencoder at the authors' 12 per GPU
            # (48 over 4 GPUs, params.yaml) on 256 px.
            cases = [("SiT-B/2", diffusion("SiT-B/2", "linear", 1000, 4, 32), 256, True),
                     ("UViT-S/2", diffusion("UViT-S/2", "vp-linear", 0, 4, 32), 128, True),
                     ("f16d16 AE", autoencoder("f16d16", 256), 12, True)]
        peak, label = peak_for(torch.cuda.get_device_name(dev)) if self.cuda else (None, None)
        rows = []
        for name, build, batch, with_compiled in cases:
            # Quick mode compiles one model only: inductor's CPU compile is tens of seconds each.
            for compile_ in ((False, True) if with_compiled else (False,)):
                rows.append(self._fit(name, build, batch, compile_))
                if self.cuda:
                    torch.cuda.empty_cache()
        return {"dtype": "bfloat16 autocast", "peak_tflops": peak, "peak_of": label, "rows": rows}

    # ------------------------------------------------------------------ 3. FID features

    def fid_features(self) -> dict:
        from fid import _compare, images  # bench/fid.py
        from _fid_weights import FILE_NAME, build_fid_inception_weights
        from pytorch_fid.inception import InceptionV3

        from specmatch.metrics import features, fid

        n, size, batch = (8, 64, 4) if self.quick else (2000, 256, 200)
        imgs = images(n, size)
        dev = self.device
        hub = self.work / "hub"
        weights = build_fid_inception_weights(hub / "checkpoints" / FILE_NAME, calib_images=imgs[:16])
        # The stand-in weights (_fid_weights.py): the real file cannot be downloaded here; same
        # architecture, so the same cost.
        net = features.build("inception-fid", weights, dev)
        ours = {}
        t_ours = self.timed(lambda: ours.setdefault("e", fid.embed(imgs, net, batch, dev, keep=False,
                                                                    progress=False)), 1)
        torch.hub.set_dir(str(hub))  # pytorch-fid's InceptionV3 reads the same file from there
        ref = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(dev).eval()

        @torch.inference_mode()
        def theirs():
            # pytorch-fid's input: float images in [0, 1] (its ToTensor), its own resize and scaling.
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
            feats = [ref(x[i:i + batch].to(dev).float() / 255)[0].squeeze(-1).squeeze(-1).double().cpu()
                     for i in range(0, n, batch)]
            f = torch.cat(feats).numpy()
            return f.mean(0), np.cov(f, rowvar=False)

        got = {}
        t_ref = self.timed(lambda: got.setdefault("s", theirs()), 1)
        e = ours["e"]
        return {"n": n, "size": size, "batch": batch, "ours_images_per_s": n / t_ours,
                "pytorch_fid_images_per_s": n / t_ref, **_compare(e.pool.mu, e.pool.sigma, *got["s"])}

    # ------------------------------------------------------------------ 4. sampling

    def sampling(self) -> dict:
        dev = self.device
        cases = ([("dpm-solver", "UViT-tiny/2", "vp-linear", 0), ("euler-maruyama", "SiT-tiny/2", "linear", 10)]
                 if self.quick else
                 [("dpm-solver", "UViT-S/2", "vp-linear", 0), ("euler-maruyama", "SiT-B/2", "linear", 1000)])
        batch, c, size = (4, 4, 16) if self.quick else (256, 4, 32)
        steps_q = ({"dpm-solver": 5, "euler-maruyama": 10} if self.quick
                   else {"dpm-solver": 20, "euler-maruyama": 250})
        rows = []
        for method, name, kind, classes in cases:
            net = models.build(name, in_channels=c, input_size=size, num_classes=classes).to(dev).eval()
            path = transport.make_path(kind)
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(batch, c, size, size, device=dev, generator=g)
            y = torch.randint(0, classes, (batch,), device=dev, generator=g) if classes else None

            def model_fn(x_t, t):
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    return net(x_t, t, y).float()

            steps = steps_q[method]
            with torch.inference_mode():
                samplers.sample(method, model_fn, x, path, 2, generator=g)
                self.sync()
                t0 = time.perf_counter()
                _, nfe = samplers.sample(method, model_fn, x, path, steps, generator=g)
                self.sync()
                sec = time.perf_counter() - t0
            rows.append({"sampler": method, "model": name, "steps": steps, "nfe": nfe, "batch": batch,
                         "images_per_s": batch / sec})
        return {"dtype": "bfloat16 autocast", "rows": rows}

    # ------------------------------------------------------------------ 5. torchrun

    def torchrun(self) -> dict:
        lat, _ = self.latents_and_targets()
        steps = 8
        params = {"autoencoder": "micro", "model": "SiT-tiny/2", "process": {"kind": "linear"}, "conditional": True,
                  "train": {"steps": steps, "batch_size": 4, "device": self.device.type, "lr": 1e-3,
                            "ema_decay": 0.9, "checkpoint_every": 1000, "log_every": 1, "seed": 5}}

        def command(tag):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                    str(port), "-m", "specmatch.cli", "train-diffusion", "--latents", str(lat),
                    "--run-dir", str(self.work / f"tr-{tag}" / "run"), "--out", str(self.work / f"tr-{tag}" / "out"),
                    "--name", "t", "--params", json.dumps(params)]

        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
        whole = subprocess.run(command("whole"), env=env, capture_output=True, text=True, timeout=300)
        if whole.returncode:
            raise RuntimeError(f"uninterrupted torchrun run failed: {whole.stderr[-2000:]}")
        log = self.work / "tr-cut" / "run" / "metrics.jsonl"
        proc = subprocess.Popen(command("cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not (log.exists() and log.read_text().count("\n") >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"torchrun run ended before SIGUSR1: {proc.communicate()[1][-2000:]}")
            time.sleep(0.02)
        # torchrun's agent does not forward SIGUSR1 (and would die of it): the worker is signalled
        # by its pid, as the SLURM profile's warning signal reaches the trainer (docs/cluster.md).
        import psutil

        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "specmatch.cli" in " ".join(c.cmdline())]
        if len(workers) != 1:
            raise RuntimeError(f"expected one torchrun worker, found {len(workers)}")
        workers[0].send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
        # torchrun ends with status 1 when its worker stops with the trainer's 3 (docs/cluster.md);
        # the worker's own status is in its failure summary.
        import re

        found = re.search(r"exitcode\s*:\s*(-?\d+)", err)
        interrupted = {"torchrun": proc.returncode, "worker": int(found.group(1)) if found else None}
        resumed = subprocess.run(command("cut"), env=env, capture_output=True, text=True, timeout=300)
        if resumed.returncode:
            raise RuntimeError(f"resumed torchrun run failed: {resumed.stderr[-2000:]}")
        from safetensors.torch import load_file

        a = load_file(self.work / "tr-whole" / "out" / "model.safetensors")
        b = load_file(self.work / "tr-cut" / "out" / "model.safetensors")
        bitwise = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        group = self._process_group()
        return {"steps": steps, "interrupted_exit_status": interrupted, "checkpoint_saved": "checkpoint saved" in err,
                "resumed": "resumed from" in resumed.stderr, "bitwise_equal_to_uninterrupted": bitwise,
                "process_group": group,
                "ok": (interrupted["worker"] == 3 and "checkpoint saved" in err and "resumed from" in resumed.stderr
                       and bitwise and group["ok"])}

    def _process_group(self) -> dict:
        """A one-rank process group on this device's backend, with an all-reduce."""
        import torch.distributed as dist

        backend = "nccl" if self.cuda else "gloo"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if self.cuda else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kw)
        try:
            x = torch.full((4,), 2.0, device=self.device)
            dist.all_reduce(x)
            ok = bool((x == 2.0).all())
        finally:
            dist.destroy_process_group()
        return {"backend": backend, "all_reduce_ok": ok, "ok": ok}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Device check ({'quick, CPU micro sizes' if m['quick'] else 'full'})", "",
             f"device **{m['device_name']}**, torch {m['torch']}, CUDA {m['cuda']}, dtype {m['dtype']}, "
             f"peak {m['peak_tflops']} TFLOP/s ({m['peak_of']}), {m['wall_s']:.0f} s", ""]
    parts = res["parts"]
    p = parts.get("precision", {})
    if "runs" in p:
        lines += ["## bf16 against fp32", "", f"{p['steps']} steps, tolerance {p['tolerance']}, u = 2^-8", "",
                  "| run | worst diff / tolerance | finite | ok |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['worst_diff_over_tolerance']} | {v['finite']} | {v['ok']} |"
                  for k, v in p["runs"].items()]
        lines.append("")
    t = parts.get("train_steps", {})
    if "rows" in t:
        lines += ["## Training step", "", "| model | batch | compiled | step (ms) | first step (s) | TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['model']} | {r['batch']} | {r['compiled']} | {1000 * r['step_s']:.1f} | "
                         f"{r['first_step_s']:.1f} | {r['tflops_per_s']:.3f} | {mfu} |")
        lines.append("")
        for r in t["rows"]:
            if "profile" in r:
                lines += [f"Where {r['model']}'s eager step goes (torch.profiler, self time per step):", "",
                          "| op | ms | share |", "|---|---|---|"]
                lines += [f"| `{e['op']}` | {e['self_ms']:.2f} | {100 * e['share']:.1f}% |" for e in r["profile"]]
                lines.append("")
    f = parts.get("fid_features", {})
    if "n" in f:
        lines += ["## FID features", "", "| n | size | ours images/s | pytorch-fid images/s | max abs mu diff | "
                  "max abs sigma diff |", "|---|---|---|---|---|---|",
                  f"| {f['n']} | {f['size']} | {f['ours_images_per_s']:.1f} | {f['pytorch_fid_images_per_s']:.1f} | "
                  f"{f['max_abs_mu_diff']:.3g} | {f['max_abs_sigma_diff']:.3g} |", ""]
    s = parts.get("sampling", {})
    if "rows" in s:
        lines += ["## Sampling", "", "| sampler | model | steps | NFE | batch | images/s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['model']} | {r['steps']} | {r['nfe']} | {r['batch']} | "
                  f"{r['images_per_s']:.2f} |" for r in s["rows"]]
        lines.append("")
    r = parts.get("torchrun", {})
    if "steps" in r:
        lines += ["## torchrun", "", f"one process, {r['steps']} steps: SIGUSR1 exit status "
                  f"{r['interrupted_exit_status']['worker']} (torchrun {r['interrupted_exit_status']['torchrun']}), "
                  f"checkpoint saved {r['checkpoint_saved']}, resumed {r['resumed']}, bitwise equal to the "
                  f"uninterrupted run "
                  f"{r['bitwise_equal_to_uninterrupted']}; one-rank {r['process_group']['backend']} all-reduce "
                  f"{r['process_group']['all_reduce_ok']}", ""]
    failed = {k: v["error"] for k, v in parts.items() if "error" in v}
    if failed:
        lines += ["## Failed parts", ""] + [f"- {k}: `{v.splitlines()[-1]}`" for k, v in failed.items()] + [""]
    return "\n".join(lines)


PARTS = ("precision", "train_steps", "fid_features", "sampling", "torchrun")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every part at micro sizes on the CPU")
    ap.add_argument("--out", type=Path, required=True, help="folder of gpu.json and gpu.md")
    ap.add_argument("--only", nargs="*", choices=PARTS, default=list(PARTS))
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    peak, label = peak_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, None)
    res = {"meta": {"quick": args.quick, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else (platform.processor() or "cpu"),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": "bfloat16 autocast (fp32 weights)",
                    "threads": torch.get_num_threads(), "peak_tflops": peak, "peak_of": label}, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.quick, device, Path(tmp))
        for part in args.only:
            t = time.perf_counter()
            try:
                res["parts"][part] = getattr(bench, part)()
            except Exception:  # noqa: BLE001 - recorded, and the other parts still run
                res["parts"][part] = {"error": traceback.format_exc()[-4000:]}
            res["parts"][part]["wall_s"] = round(time.perf_counter() - t, 2)
            print(f"{part}: {res['parts'][part]['wall_s']} s", file=sys.stderr, flush=True)
    res["meta"]["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "gpu.md").write_text(markdown(res))
    failed = [k for k, v in res["parts"].items() if "error" in v or v.get("ok") is False]
    if failed:
        print(f"failed parts: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
