"""`bench/gpu.py --quick`: every part of the prepared device check, at micro sizes on the CPU, so
the script a GPU run will execute has run before (issue 29). Checks the JSON and the Markdown it
writes, not the timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, SRC

PARTS = {"precision", "train_steps", "fid_features", "sampling", "torchrun"}


def test_quick_mode_runs_every_part(tmp_path):
    out = tmp_path / "bench"
    # One thread: the micro sizes gain nothing from more, and a shared machine's load then does
    # not multiply the run time.
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    res = json.loads((out / "gpu.json").read_text())
    parts = res["parts"]
    errors = {k: v["error"] for k, v in parts.items() if "error" in v}
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(parts) == PARTS
    meta = res["meta"]
    assert meta["quick"] and meta["device"] == "cpu" and meta["torch"] and meta["dtype"].startswith("bfloat16")

    prec = parts["precision"]
    assert set(prec["runs"]) == {"ae-sdvae", "ae-esm", "ae-dsm", "UViT-tiny/2", "SiT-tiny/2 DoG-REPA"}
    assert all(r["ok"] and r["finite"] and 0 <= r["worst_diff_over_tolerance"] <= 1 for r in prec["runs"].values())

    rows = parts["train_steps"]["rows"]
    assert {r["model"] for r in rows} == {"SiT-tiny/2", "UViT-tiny/2", "micro AE"}
    assert [r["compiled"] for r in rows if r["model"] == "SiT-tiny/2"] == [False, "aot_eager"]
    for r in rows:
        assert r["step_s"] > 0 and r["flops_per_step"] > 0 and r["mfu"] is None  # no peak for a CPU
        assert abs(r["tflops_per_s"] - r["flops_per_step"] / r["step_s"] / 1e12) < 1e-9
    # No peak on a CPU, so the MFU is unknown and the profile of where SiT's eager step goes is taken.
    prof = [r for r in rows if "profile" in r]
    assert [(r["model"], r["compiled"]) for r in prof] == [("SiT-tiny/2", False)]
    ops = prof[0]["profile"]
    assert 0 < len(ops) <= 10 and all(o["self_ms"] >= 0 and 0 <= o["share"] <= 1 for o in ops)
    assert [o["self_ms"] for o in ops] == sorted((o["self_ms"] for o in ops), reverse=True)
    # Compiling changes the schedule, not the arithmetic: the counted FLOPs agree.
    sit = [r["flops_per_step"] for r in rows if r["model"] == "SiT-tiny/2"]
    assert sit[0] == sit[1]

    fidf = parts["fid_features"]
    assert fidf["ours_images_per_s"] > 0 and fidf["pytorch_fid_images_per_s"] > 0
    # The same network on the same images: the statistics agree to float32 rounding.
    assert fidf["max_abs_mu_diff"] < 1e-3 and fidf["max_abs_sigma_diff"] < 1e-3

    assert [(r["sampler"], r["nfe"] > 0) for r in parts["sampling"]["rows"]] == [("dpm-solver", True),
                                                                                  ("euler-maruyama", True)]
    tr = parts["torchrun"]
    assert tr["interrupted_exit_status"]["worker"] == 3 and tr["checkpoint_saved"] and tr["resumed"]
    assert tr["bitwise_equal_to_uninterrupted"] and tr["process_group"] == {"backend": "gloo", "all_reduce_ok": True,
                                                                            "ok": True}

    md = (out / "gpu.md").read_text()
    for title in ("## bf16 against fp32", "## Training step", "## FID features", "## Sampling", "## torchrun"):
        assert title in md, title
    assert "Failed parts" not in md
    assert "| SiT-tiny/2 | 8 | aot_eager |" in md and "Where SiT-tiny/2's eager step goes" in md
