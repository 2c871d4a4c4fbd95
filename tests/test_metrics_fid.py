"""Fréchet distance, IS, precision/recall, feature nets, resources and the `fid` stages.

References are independent: closed forms, pytorch-fid's own functions and its command line on
PNG folders, and brute-force numpy for precision/recall.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from specmatch import resources
from specmatch.cli import main as cli_main
from specmatch.data import shards
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError
from specmatch.metrics import features, fid, record
from specmatch.metrics import reference, scoring
from specmatch.runtime import hashing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._fid_weights import FILE_NAME, build_fid_inception_weights  # noqa: E402
from conftest import load_split  # noqa: E402


def _pfi_frechet():
    from pytorch_fid.fid_score import calculate_frechet_distance

    return calculate_frechet_distance


def _rand_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, 7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    mu, s = rng.normal(size=5), _rand_cov(rng, 5)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9
    mu2, s2 = rng.normal(size=5), _rand_cov(rng, 5)
    assert fid.frechet_distance(mu, s, mu2, s2) == pytest.approx(fid.frechet_distance(mu2, s2, mu, s), rel=1e-8)


@pytest.mark.parametrize("rank", [None, 3])
def test_frechet_matches_pytorch_fid(rank):
    """Full-rank and rank-deficient (near-singular) covariances, as pytorch-fid handles them."""
    rng = np.random.default_rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _rand_cov(rng, d, rank), _rand_cov(rng, d, rank)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = _pfi_frechet()(mu1, s1, mu2, s2)
    assert ours == pytest.approx(float(ref), abs=1e-6, rel=1e-8)


def test_frechet_shape_mismatch():
    with pytest.raises(SpecmatchError, match="differ in shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(SpecmatchError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_statistics_float64_and_few_samples_warning():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(5, 8)).astype(np.float32)
    st = fid.statistics(f)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    np.testing.assert_allclose(st.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-12)
    assert st.n == 5 and any("5 samples < 8 feature dimensions" in w for w in st.warnings)
    assert fid.statistics(rng.normal(size=(20, 4))).warnings == []
    with pytest.raises(SpecmatchError, match="at least 2 samples"):
        fid.statistics(f[:1])


# --------------------------------------------------------------------------- IS, precision/recall


def test_inception_score_bounds():
    assert fid.inception_score(np.zeros((20, 10)), split_size=10) == (pytest.approx(1.0), pytest.approx(0.0))
    # confident, evenly spread over C classes: IS = C; one part: no spread over parts
    logits = np.full((40, 8), -1e4)
    logits[np.arange(40), np.arange(40) % 8] = 0.0
    assert fid.inception_score(logits, split_size=40) == (pytest.approx(8.0, rel=1e-6), None)
    # parts of 16, 16, 8 samples: each spread evenly over 8 classes, each scores 8
    assert fid.inception_score(logits, split_size=16)[0] == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(SpecmatchError, match=r"need \(N >= 1, C\) logits"):
        fid.inception_score(np.zeros((0, 3)))


def _pr_bruteforce(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def cov(q, ref, r):
        d = np.linalg.norm(q[:, None] - ref[None], axis=-1)
        return np.mean((d <= r[None]).any(axis=1))

    return cov(fake, real, radii(real)), cov(real, fake, radii(fake))


def test_precision_recall_against_bruteforce():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(60, 5))
    fake = rng.normal(loc=0.7, scale=0.6, size=(45, 5))
    ours = fid.precision_recall(real, fake, k=3, block=16)
    assert ours == pytest.approx(_pr_bruteforce(real, fake, 3), abs=1e-12)
    assert fid.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    with pytest.raises(SpecmatchError, match="more than k=3"):
        fid.precision_recall(real[:3], fake)


# --------------------------------------------------------------------------- image checks


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((2, 8, 8, 3), np.float32), "expected uint8"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"shape \(N, H, W, 3\)"),
    (np.zeros((8, 8, 3), np.uint8), r"shape \(N, H, W, 3\)"),
])
def test_bad_images_rejected(bad, msg):
    with pytest.raises(SpecmatchError, match=msg):
        fid.check_images(bad)


# --------------------------------------------------------------------------- resources


def test_resources_missing_and_mismatched(tmp_path):
    with pytest.raises(SpecmatchError) as e:
        resources.require("inception-fid", tmp_path)
    msg = str(e.value)
    assert FILE_NAME in msg and str(tmp_path.absolute()) in msg and "6726825d" in msg and "Nothing is downloaded" in msg
    (tmp_path / FILE_NAME).write_bytes(b"not the weights")
    with pytest.raises(SpecmatchError, match="expected sha256 starting with 6726825d"):
        resources.require("inception-fid", tmp_path)
    assert resources.check(resources.get("inception-fid"), tmp_path)["ok"] is False
    with pytest.raises(SpecmatchError, match="no pretrained resource named 'nope'"):
        resources.get("nope")


def test_resources_package_file_verified():
    path, digest = resources.require("efficientnet-lite0")
    assert path.is_file() and digest == resources.get("efficientnet-lite0").sha256
    path, digest = resources.require("lpips-vgg-v0.1")
    assert path.name == "vgg.pth" and path.parent.name == "v0.1"


def test_resources_env_folder_and_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(resources.ENV_DIR, str(tmp_path))
    assert resources.resources_dir() == tmp_path
    assert cli_main(["resources", "check", "efficientnet-lite0"]) == 0
    assert "efficientnet-lite0" in capsys.readouterr().out
    assert cli_main(["resources", "check", "vgg16"]) == 2
    assert "MISSING" in capsys.readouterr().out


def test_manifest_symlink_and_entries():
    assert (REPO / "resources" / "manifest.yaml").resolve() == resources.MANIFEST.resolve()
    m = resources.manifest()
    assert set(m) >= {"inception-fid", "vgg16", "lpips-vgg-v0.1", "dinov2-vitb14", "efficientnet-lite0"}
    for r in m.values():
        assert r.stages and r.source


# --------------------------------------------------------------------------- feature nets


@pytest.fixture(scope="module")
def image_sets():
    from PIL import Image

    from specmatch.data.embedded import load_sources

    rng = np.random.default_rng(5)
    srcs = [np.asarray(Image.fromarray(im).convert("RGB").resize((48, 48))) for _, im in load_sources()[:12]]
    a = np.stack(srcs).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)[::-1].copy()
    return a, b


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory, image_sets) -> Path:
    return build_fid_inception_weights(tmp_path_factory.mktemp("hub") / "checkpoints" / FILE_NAME,
                                       calib_images=image_sets[0])


def test_inception_features_batch_invariant(inception_weights, image_sets):
    net = features.build("inception-fid", inception_weights)
    a, _ = image_sets
    f1 = fid.extract(a, net, batch_size=12, progress=False)
    f2 = fid.extract([a[:5], a[5:]], net, batch_size=4, progress=False)
    assert f1.pool.shape == (12, 2048) and f1.logits.shape == (12, 1008)
    np.testing.assert_allclose(f1.pool, f2.pool, rtol=1e-4, atol=1e-5)
    assert f1.pool.std() > 1e-3, "features vanished: BatchNorm not calibrated"
    with pytest.raises(SpecmatchError, match="empty"):
        fid.extract(a[:0], net, progress=False)


@pytest.mark.slow
def test_fid_equals_pytorch_fid_cli(tmp_path, inception_weights, image_sets):
    """Acceptance: same images, same weights file, `python -m pytorch_fid` on PNG folders."""
    from PIL import Image

    a, b = image_sets
    for name, imgs in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(tmp_path / name / f"{i:03d}.png")
    torch_home = tmp_path / "torch_home"  # pytorch-fid finds the weights in $TORCH_HOME/hub/checkpoints
    (torch_home / "hub").mkdir(parents=True)
    (torch_home / "hub" / "checkpoints").symlink_to(inception_weights.parent)
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    # The installed tool itself, in a fresh interpreter that imports nothing of ours first:
    # torch and torchvision must be builds that belong together for it to import at all.
    out = subprocess.run([sys.executable, "-m", "pytorch_fid", "--device", "cpu", "--batch-size", "5", "--num-workers", "0",
                          str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ref = float(out.stdout.strip().split("FID:")[-1])
    net = features.build("inception-fid", inception_weights)
    # A batch size other than the CLI's: the protocol, not the batching, must match.
    sa, sb = (fid.feature_statistics(x, net, batch_size=7, progress=False) for x in (a, b))
    ours = fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert 1.0 < ref < 1e4, "degenerate comparison: the two sets should differ, on a realistic scale"
    assert ours == pytest.approx(ref, abs=1e-3)


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fidds") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 40, "n_test": 24, "shard_size": 16},
            "embedded", out)
    return out


EFF = {"net": "efficientnet-lite0", "batch_size": 16, "device": "cpu"}


def test_fid_ref_and_calc_stages(tmp_path, small_ds):
    info = reference.ref(small_ds, {**EFF, "split": "test"}, "emb-test", tmp_path / "ref")
    man = json.loads((small_ds / "manifest.json").read_text())
    assert info["images_sha256"] == man["splits"]["test"]["images_sha256"]
    assert info["protocol"]["metric"] == "FD-EffNetLite0"
    assert info["protocol"]["weights_sha256"] == resources.get("efficientnet-lite0").sha256
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["provenance.json", "stats.json", "stats.npz"]
    same = scoring.calc(small_ds, "test", tmp_path / "ref", EFF, "self", tmp_path / "self")
    other = scoring.calc(small_ds, "train", tmp_path / "ref", EFF, "train", tmp_path / "train")
    saved = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert "FID" not in saved and saved["metric"] == "FD-EffNetLite0" and saved["FD-EffNetLite0"] == same.value
    assert same.metric == "FD-EffNetLite0" and same.protocol_name == "pytorch-fid" and same.sfid is None
    assert record.read(tmp_path / "self") == same  # what consumers read back is what the stage measured
    assert same.inception_score is None or same.inception_score.name == "IS-EffNetLite0"
    broken = dict(saved)
    del broken["FD-EffNetLite0"]  # the value under the metric's name
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text(json.dumps(broken))
    with pytest.raises(SpecmatchError, match=r"broken/metrics.json: not a generation metrics record.*FD-EffNetLite0"):
        record.read(tmp_path / "broken")
    with pytest.raises(SpecmatchError, match="no metrics.json"):
        record.read(tmp_path / "ref")
    assert abs(same.value) < 1e-3 and same.precision == 1.0 and same.recall == 1.0
    assert other.value > 1.0
    assert other.samples["n"] == 40 and other.reference["n"] == 24
    # A seeded subset of the split (the real floor at a sample count): its images and no others.
    sub = scoring.calc(small_ds, "train", tmp_path / "ref", EFF, "sub", tmp_path / "sub", n_images=20)
    keep = shards.subset_indices(40, 20, EFF.get("seed", 0))
    images, _ = load_split(small_ds, "train")
    assert sub.samples["n"] == 20 and sub.samples["images_sha256"] == hashing.sha256_images(images[keep])
    assert any("feature dimensions" in w for w in other.warnings)
    rec = json.loads((tmp_path / "train" / "provenance.json").read_text())
    assert rec["protocol"]["reference_stats_sha256"] == other.reference["stats_sha256"]
    assert {i["role"] for i in rec["inputs"]} == {"samples", "reference", "weights:efficientnet-lite0"}


def test_fid_calc_refuses_other_net_and_writes_nothing(tmp_path, small_ds):
    reference.ref(small_ds, {**EFF, "split": "test", "max_images": 8}, "r", tmp_path / "ref")
    with pytest.raises(SpecmatchError, match="meaningless"):
        scoring.calc(small_ds, "train", tmp_path / "ref", {**EFF, "net": "inception-fid"}, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="not reference statistics"):
        scoring.calc(small_ds, "train", tmp_path, EFF, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="no split 'val'"):
        scoring.calc(small_ds, "val", tmp_path / "ref", EFF, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match=r"--n-images 41 is not in \[1, 40\]"):
        scoring.calc(small_ds, "train", tmp_path / "ref", EFF, "x", tmp_path / "out", n_images=41)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ref"]


def test_fid_ref_missing_weights_names_file(tmp_path, small_ds):
    with pytest.raises(SpecmatchError, match=FILE_NAME):
        reference.ref(small_ds, {"net": "inception-fid", "resources_dir": str(tmp_path / "empty")}, "r",
                      tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


def test_fid_params_validated(tmp_path, small_ds):
    with pytest.raises(SpecmatchError, match="metrics"):
        reference.ref(small_ds, {"net": "resnet"}, "r", tmp_path / "ref")


# --------------------------------------------------------------------------- reconstruction


def _distorted(rng, n=4, size=32, noise=20):
    a = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    # smooth images so SSIM is not trivially ~0
    a = np.cumsum(np.cumsum(a.astype(np.float64) - 127.5, 1), 2)
    a = ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_psnr_ssim_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from specmatch.metrics import recon

    a, b = _distorted(np.random.default_rng(6))
    ours_p, ours_s = recon.psnr(a, b).numpy(), recon.ssim(a, b).numpy()
    for i in range(len(a)):
        assert ours_p[i] == pytest.approx(peak_signal_noise_ratio(a[i], b[i], data_range=255), rel=1e-10)
        ref = structural_similarity(a[i], b[i], data_range=255, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ours_s[i] == pytest.approx(ref, abs=1e-7)
    assert np.all(recon.ssim(a, a).numpy() == pytest.approx(1.0))
    assert np.isinf(recon.psnr(a, a).numpy()).all()
    with pytest.raises(SpecmatchError, match="differ in shape"):
        recon.psnr(a, b[:, :16])
    with pytest.raises(SpecmatchError, match="uint8"):
        recon.ssim(a.astype(np.float32), b)
    with pytest.raises(SpecmatchError, match="at least 11x11"):
        recon.ssim(a[:, :8, :8], b[:, :8, :8])


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory) -> Path:
    import torchvision as tv

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(tv.models.vgg16(weights=None).state_dict(), path)
    return path


def test_lpips_backbone_mapping_and_behaviour(vgg_weights):
    from specmatch.metrics import recon

    lp = recon.load_lpips(vgg_weights=vgg_weights)
    state = torch.load(vgg_weights, weights_only=True)
    for k, r in recon._LPIPS_SLICES:
        for i in r:
            if f"features.{i}.weight" in state:
                assert torch.equal(getattr(getattr(lp.model.net, f"slice{k}"), str(i)).weight, state[f"features.{i}.weight"])
    assert lp.heads_sha256 == resources.get("lpips-vgg-v0.1").sha256
    rng = np.random.default_rng(7)
    a, b = _distorted(rng, noise=10)
    _, c = _distorted(np.random.default_rng(7), noise=60)
    d_ab, d_ac = lp(a, b), lp(a, c)
    assert torch.allclose(lp(a, a), torch.zeros(len(a), dtype=torch.float64), atol=1e-6)
    assert (d_ac > d_ab).all() and (d_ab > 0).all()
    assert torch.allclose(lp(b, a), d_ab, rtol=1e-4)


def test_lpips_missing_backbone_names_file(tmp_path):
    from specmatch.metrics import recon

    with pytest.raises(SpecmatchError, match="vgg16-397923af.pth"):
        recon.load_lpips(resources_dir=tmp_path)


def test_recon_accumulator_one_pass(vgg_weights):
    from specmatch.metrics import recon

    eff = features.load("efficientnet-lite0")
    acc = recon.ReconAccumulator(recon.load_lpips(vgg_weights=vgg_weights), eff)
    rng = np.random.default_rng(8)
    batches = [_distorted(rng, n=6) for _ in range(2)]
    for a, b in batches:
        acc.add(a, b)
    s = acc.summary()
    a = np.concatenate([x for x, _ in batches])
    b = np.concatenate([y for _, y in batches])
    assert s["n"] == 12 and s["psnr"] == pytest.approx(float(recon.psnr(a, b).mean()))
    assert s["ssim"] == pytest.approx(float(recon.ssim(a, b).mean()))
    assert s["rFD-EffNetLite0"] > 0
    with pytest.raises(SpecmatchError, match="no images"):
        recon.ReconAccumulator().summary()


# --------------------------------------------------------------------------- torch.distributed


def _ddp_worker(rank, world, port, images, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = features.load("efficientnet-lite0")
        part = images[fid.rank_slice(len(images))]
        feats = fid.extract(part, net, batch_size=4, progress=False)
        np.save(Path(out_dir) / f"rank{rank}.npy", feats.pool)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_features_equal_single_process(tmp_path):
    """Two gloo ranks embed their parts (7 and 6 images); every rank gets all 13 in order."""
    import socket

    import torch.multiprocessing as mp

    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, images, str(tmp_path)), nprocs=2, join=True)
    single = fid.extract(images, features.load("efficientnet-lite0"), batch_size=13, progress=False).pool
    for r in range(2):
        gathered = np.load(tmp_path / f"rank{r}.npy")
        assert gathered.shape == single.shape
        np.testing.assert_allclose(gathered, single, rtol=1e-4, atol=1e-5)
