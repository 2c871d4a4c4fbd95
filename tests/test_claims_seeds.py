"""The generation claims (report.claims: C4, C4c, C5, C6) over runs that differ only in their
training seed: each side is the mean of its seeds' distances, with the standard error
sqrt(sum s_i^2 / n^2 + var_seed / n) (var_seed with ddof 1). The expected numbers here are worked
out by hand from that formula, never through report.claims' own helpers. Also: the training seed
travels from sampling.json (an older one without it still reads, as None)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from specmatch.data import sample_folder
from specmatch.errors import SpecmatchError
from specmatch.metrics.bootstrap import Bootstrap
from specmatch.report import claims

METRIC = "FD-EffNetLite0-128"


def _eval(name, variant, psnr=25.0, flat=0.3):
    """An `eval-ae` record as the claims read it; SD-VAE's sampled latents flatter than the target
    by `flat` (+- 0.05): the C4 premise holds for flat = 0.3."""
    return SimpleNamespace(
        name=name, variant=variant, dataset="ds", config="tiny", n=128, psnr=psnr,
        latent_spectrum=SimpleNamespace(psd_exponent=-2.5, target_exponent=-1.5, kl_target_to_latent=0.05),
        sampled=SimpleNamespace(psd_exponent=-1.5 + flat, kl_target_to_latent=0.06, noise_to_signal=0.6),
        sampled_flatness_bootstrap=Bootstrap(20, 0.05, flat - 0.1, flat + 0.1, 0))


EVALS = {"sd": _eval("sd", "sdvae"), "esm": _eval("esm", "esm")}


def _gen(diffusion, autoencoder, value, std=1.0, seed=0, untrained=300.0, alignment="none", **kw):
    return {"diffusion": diffusion, "autoencoder": autoencoder, "value": value, "value_std": std,
            "untrained": untrained, "untrained_std": 1.0, "model": "UViT-tiny/2", "process": "vp-linear",
            "trained_steps": 100, "sampler": "dpm-solver", "steps": 20, "cfg_scale": 1.0, "cfg_interval": "0-1",
            "n_samples": 512, "metric": METRIC, "protocol": "pytorch-fid", "alignment": alignment, "weights": "ema",
            "dataset": "ds", "train_seed": seed, "samples": f"{diffusion}-dpm", **kw}


def _c4(gen):
    rows = [r for r in claims.diffusability(gen, EVALS) if r["claim"] == "C4"]
    return rows


def test_two_seeds_per_side_pool_to_their_mean_with_the_seed_spread():
    gen = [_gen("u-esm", "esm", 100.0, 2.0, 0), _gen("u-esm-s1", "esm", 104.0, 3.0, 1),
           _gen("u-sd", "sd", 120.0, 1.0, 0), _gen("u-sd-s1", "sd", 114.0, 2.0, 1)]
    (row,) = _c4(gen)
    # ESM: mean 102; (4 + 9) / 4 = 3.25, var_seed = (2^2 + 2^2) / 1 = 8, 8 / 2 = 4: se^2 = 7.25.
    # SD-VAE: mean 117; (1 + 4) / 4 = 1.25, var_seed = (3^2 + 3^2) / 1 = 18, 18 / 2 = 9: se^2 = 10.25.
    se_a2, se_b2 = 3.25 + 4.0, 1.25 + 9.0
    assert row["z"] == pytest.approx(round(15.0 / math.sqrt(se_a2 + se_b2), 2))
    assert row["verdict"] == "supported"  # 15 / sqrt(17.5) = 3.59
    assert "u-esm, u-esm-s1 (2 seeds: 100 ± 2, 104 ± 3; mean 102 ± 2.7)" in row["evidence"]
    assert "u-sd, u-sd-s1 (2 seeds: 120 ± 1, 114 ± 2; mean 117 ± 3.2)" in row["evidence"]
    assert row["setting"].endswith("2 training seeds")
    # Every run's untrained baseline is named.
    assert all(f"[{d} untrained: 300]" in row["evidence"] for d in ("u-esm", "u-esm-s1", "u-sd", "u-sd-s1"))


def test_three_seeds_against_one():
    gen = [_gen("a0", "esm", 100.0, 1.0, 0), _gen("a1", "esm", 101.0, 1.0, 1), _gen("a2", "esm", 105.0, 1.0, 2),
           _gen("b0", "sd", 110.0, 2.0, 0)]
    (row,) = _c4(gen)
    mean = 102.0
    var = ((100 - mean) ** 2 + (101 - mean) ** 2 + (105 - mean) ** 2) / 2  # 7
    se_a = math.sqrt(3.0 / 9 + var / 3)
    assert row["z"] == pytest.approx(round((110.0 - mean) / math.sqrt(se_a ** 2 + 4.0), 2))
    assert "3 and 1 training seeds" in row["setting"] and "seed spread of b0 not measured" in row["setting"]


def test_a_large_seed_spread_leaves_a_clear_single_seed_advantage_unresolved():
    """Seed 0 alone: 100 +- 1 against 110 +- 1, z = 7.1: supported. Their seed-1 twins land 20
    higher each: the gap of the means is the same 10, but it is now within the seed spread."""
    single = [_gen("u-esm", "esm", 100.0), _gen("u-sd", "sd", 110.0)]
    (row,) = _c4(single)
    assert row["verdict"] == "supported" and row["z"] == pytest.approx(round(10 / math.sqrt(2), 2))
    assert row["setting"].endswith("1 training seed (seed spread not measured)")
    assert row["evidence"].startswith("u-esm: 100 ± 1; u-sd: 110 ± 1")
    (row,) = _c4(single + [_gen("u-esm-s1", "esm", 120.0, seed=1), _gen("u-sd-s1", "sd", 130.0, seed=1)])
    # Each side: var_seed = (10^2 + 10^2) / 1 = 200, se^2 = 2 / 4 + 200 / 2 = 100.5.
    assert row["z"] == pytest.approx(round(10.0 / math.sqrt(2 * 100.5), 2))
    assert row["verdict"] == "not resolved at this N"


def test_a_side_that_learned_on_average_is_judged_though_one_seed_learned_little():
    """Pooled over seeds: u-sd (seed 0) is 299 +- 1 against its untrained 300 +- 1, its seed-1 twin
    250 +- 1 against 310 +- 1. The side: 274.5 +- sqrt(2/4 + 1200.5/2) = 24.5 against the
    untrained 305 +- sqrt(2/4 + 50/2) = 5.05: z = 30.5 / 25.0 = 1.22, not learned. A third seed
    far below its untrained network but spreading the side (150) leaves it unlearned; one near
    the second seed (248) makes the side's mean beat its untrained networks': judged."""
    gen = [_gen("u-esm", "esm", 100.0), _gen("u-esm-s1", "esm", 102.0, seed=1),
           _gen("u-sd", "sd", 299.0, untrained=300.0), _gen("u-sd-s1", "sd", 250.0, seed=1, untrained=310.0)]
    (row,) = _c4(gen)
    assert row["verdict"].startswith("not resolved: the runs did not learn") and row["z"] is None
    gen += [_gen("u-sd-s2", "sd", 150.0, seed=2, untrained=305.0)]
    # u-sd: mean 233 (var (66^2 + 17^2 + 83^2) / 2 = 5767, se^2 = 3/9 + 5767/3 = 1922.7, se 43.8)
    # against the untrained 305 (var 25, se^2 = 3/9 + 25/3 = 8.67, se 2.94): z = 72 / 43.9 = 1.64.
    (row,) = _c4(gen)
    assert row["verdict"].startswith("not resolved: the runs did not learn")
    gen[-1] = _gen("u-sd-s2", "sd", 248.0, seed=2, untrained=305.0)
    # mean 265.7 (var (33.3^2 + 15.7^2 + 17.7^2) / 2 = 834.3, se^2 = 1/3 + 278.1, se 16.7) against
    # 305 +- 2.94: z = 39.3 / 16.9 = 2.32: learned; the claim compares the means.
    (row,) = _c4(gen)
    assert row["z"] is not None and row["verdict"] == "supported"


def test_one_seed_that_did_not_learn_leaves_the_claim_unresolved():
    # u-esm-s1: 299 against its own (seed-1) untrained network's 300 +- 1: it did not learn.
    gen = [_gen("u-esm", "esm", 100.0), _gen("u-esm-s1", "esm", 299.0, seed=1, untrained=300.0),
           _gen("u-sd", "sd", 150.0), _gen("u-sd-s1", "sd", 151.0, seed=1, untrained=310.0)]
    (row,) = _c4(gen)
    assert row["verdict"].startswith("not resolved: the runs did not learn") and row["z"] is None
    assert "[u-sd-s1 untrained: 310]" in row["evidence"]
    # The same runs with the seed-1 ESM run learning: judged.
    gen[1] = _gen("u-esm-s1", "esm", 102.0, seed=1)
    (row,) = _c4(gen)
    assert row["z"] is not None and not row["verdict"].startswith("not resolved: the runs")


def test_rows_of_another_protocol_are_never_pooled():
    gen = [_gen("u-esm", "esm", 100.0), _gen("u-esm-s1", "esm", 130.0, seed=1, steps=50),
           _gen("u-sd", "sd", 110.0), _gen("u-sd-s1", "sd", 90.0, seed=1, steps=50)]
    rows = _c4(gen)
    # One comparison per protocol, each of one seed: 100 vs 110 (20 steps), 130 vs 90 (50 steps).
    assert [r["z"] for r in rows] == [pytest.approx(round(10 / math.sqrt(2), 2)),
                                      pytest.approx(round(-40 / math.sqrt(2), 2))]
    assert [r["verdict"] for r in rows] == ["supported", "contradicted"]
    assert all("1 training seed (seed spread not measured)" in r["setting"] for r in rows)


def test_runs_that_repeat_a_seed_or_one_run_twice_are_not_pooled():
    # Two seed-0 ESM runs (not seed replicates): each compared on its own.
    gen = [_gen("u-esm", "esm", 100.0), _gen("u-esm-b", "esm", 104.0), _gen("u-sd", "sd", 110.0)]
    assert [r["z"] for r in _c4(gen)] == [pytest.approx(round(10 / math.sqrt(2), 2)),
                                          pytest.approx(round(6 / math.sqrt(2), 2))]
    # The same row listed twice (E1 and E2) counts once, not as two seeds.
    r = _gen("u-sd", "sd", 110.0)
    (row,) = _c4([_gen("u-esm", "esm", 100.0), r, r])
    assert row["z"] == pytest.approx(round(10 / math.sqrt(2), 2)) and "seeds" not in row["evidence"]


def test_unknown_seeds_count_as_distinct_seeds():
    gen = [_gen("u-esm", "esm", 100.0, seed=None), _gen("u-esm-b", "esm", 102.0, seed=float("nan")),
           _gen("u-sd", "sd", 110.0, seed=None)]
    (row,) = _c4(gen)
    # ESM mean 101: se^2 = 2/4 + 2/2 = 1.5.
    assert row["z"] == pytest.approx(round(9.0 / math.sqrt(1.5 + 1.0), 2))


def test_c4_premise_and_confound_still_apply_to_pooled_sides():
    evals = {"sd": _eval("sd", "sdvae", psnr=27.0, flat=0.02), "esm": _eval("esm", "esm", psnr=25.5)}
    gen = [_gen("u-esm", "esm", 100.0), _gen("u-esm-s1", "esm", 101.0, seed=1),
           _gen("u-sd", "sd", 120.0), _gen("u-sd-s1", "sd", 121.0, seed=1)]
    (row,) = [r for r in claims.diffusability(gen, evals) if r["claim"] == "C4"]
    assert row["verdict"].startswith(claims.NOT_TESTED)
    assert "confounded: esm reconstructs 1.5 dB worse" in row["verdict"]


def test_alignment_claims_pool_seeds_of_the_same_alignment():
    repa = "repa (enc, depth 2, lambda 0.5)"
    gen = [_gen("s", "dsm", 200.0, 1.0, 0), _gen("s-s1", "dsm", 202.0, 1.0, 1),
           _gen("s-repa", "dsm", 190.0, 1.0, 0, alignment=repa),
           _gen("s-repa-s1", "dsm", 194.0, 1.0, 1, alignment=repa),
           # another REPA depth is another setting, never a third seed
           _gen("s-repa-d4", "dsm", 150.0, 1.0, 2, alignment="repa (enc, depth 4, lambda 0.5)")]
    rows = claims.alignment(gen)
    assert [r["claim"] for r in rows] == ["C5", "C5"]
    # repa depth 2: mean 192, se^2 = 2/4 + 8/2 = 4.5; none: mean 201, se^2 = 2/4 + 2/2 = 1.5.
    assert rows[0]["z"] == pytest.approx(round(9.0 / math.sqrt(6.0), 2)) and rows[0]["verdict"] == "supported"
    # depth 4 alone: 150 +- 1 against the pooled none side.
    assert rows[1]["z"] == pytest.approx(round(51.0 / math.sqrt(1.0 + 1.5), 2))
    assert rows[1]["setting"].endswith("1 and 2 training seeds (seed spread of s-repa-d4 not measured)")


def _protocol_json(**kw):
    return {"name": "s", "fingerprint": "f" * 64, "model": "UViT-tiny/2", "diffusion": "u", "process": "vp-linear",
            "trained_steps": 100, "alignment": "none", "weights": "ema", "autoencoder": "ae", "scale_factor": 0.5,
            "sampler": "dpm-solver", "steps": 20, "nfe_per_sample": 21, "order": 2, "t_min": None, "cfg_scale": 1.0,
            "cfg_interval": [0.0, 1.0], "class_balanced": None, "n_samples": 8, "seed": 0, "batch_size": 4,
            "world_size": 1, "generated_now": 8, "seconds": 1.0, "images_per_s": 8.0, **kw}


def test_sampling_json_carries_the_training_seed_and_an_older_one_still_reads(tmp_path):
    old = _protocol_json()
    (tmp_path / sample_folder.FILE).write_text(json.dumps(old))
    p = sample_folder.read(tmp_path)
    assert p is not None and p.train_seed is None and p.diffusion == "u" and p.cfg_interval == (0.0, 1.0)
    new = sample_folder.SamplingProtocol.from_json(_protocol_json(train_seed=1), "x")
    assert new.train_seed == 1
    assert sample_folder.SamplingProtocol.from_json(new.to_json(), "x") == new
    # Every other field is still required.
    del old["seed"]
    with pytest.raises(SpecmatchError, match="missing keys \\['seed'\\]"):
        sample_folder.SamplingProtocol.from_json(old, "x")
