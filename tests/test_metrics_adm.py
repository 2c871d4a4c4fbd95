"""The ADM evaluation protocol, the standard Inception Score and the streaming statistics.

Independent references: torch-fidelity (its TF1-exact Inception extractor loading the same
weights file, its `isc`, `prc` and `fid` functions), pytorch-fid, numpy transcriptions of the ADM
evaluator's definitions (openai/guided-diffusion `evaluations/evaluator.py`), and a two-pass
float64 mean/covariance. The Inception weights are the offline stand-in of bench/_fid_weights.py
(the real file cannot be downloaded here): the same architecture and file layout.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from specmatch import config, resources
from specmatch.cli import main as cli_main
from specmatch.data.prepare import prepare
from specmatch.data.reader import SplitReader
from specmatch.errors import SpecmatchError
from specmatch.metrics import adm, bootstrap, features, fid, protocol, record, streaming
from specmatch.metrics import reference, scoring
from specmatch.runtime.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._fid_weights import FILE_NAME, build_fid_inception_weights  # noqa: E402


# --------------------------------------------------------------------------- the Inception input path


def _tf1_resize_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False), from its definition:
    output (i, j) samples the input at (i * H / out_h, j * W / out_w), upper neighbours clamped."""
    h, w = img.shape
    out = np.empty((out_h, out_w), np.float64)
    for i in range(out_h):
        y = i * (h / out_h)
        y0 = int(np.floor(y))
        y1, dy = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            x = j * (w / out_w)
            x0 = int(np.floor(x))
            x1, dx = min(x0 + 1, w - 1), x - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("shape,size", [((5, 7), 11), ((13, 9), 5), ((32, 32), 299)])
def test_tf1_resize_matches_its_definition_and_torch_fidelity(shape, size):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, *shape)).astype(np.float32))
    if shape[0] != shape[1]:  # the definition: one size for both axes in the feature net
        ours = features.tf1_resize_bilinear(x, size)
        want = _tf1_resize_numpy(x[1, 2].double().numpy(), size, size)
        np.testing.assert_allclose(ours[1, 2].numpy(), want, atol=2e-4)
    ours = features.tf1_resize_bilinear(x, size)
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
    assert torch.equal(ours, ref)
    # and it is not torch's half-pixel bilinear (what pytorch-fid uses)
    half = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    assert (half - ours).abs().max() > 1.0


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    from specmatch.data.embedded import load_sources

    srcs = [np.asarray(Image.fromarray(im).convert("RGB").resize((40, 40))) for _, im in load_sources()[:10]]
    return np.stack(srcs).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, images) -> Path:
    return build_fid_inception_weights(tmp_path_factory.mktemp("inc") / FILE_NAME, calib_images=images)


def test_adm_features_equal_torch_fidelity(weights, images):
    """Acceptance: our ADM extractor (pytorch-fid's network, our TF1 resize and scaling, a hook for
    `mixed_6/conv`) against torch-fidelity's TF-exact extractor loading the same weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = features.build("inception-adm", weights)
    ours = fid.extract(images, net, batch_size=4, progress=False)
    assert ours.pool.shape == (10, 2048) and ours.logits.shape == (10, 1008) and ours.spatial.shape == (10, 2023)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(weights))
    maps = []
    ref.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: maps.append(o))
    with torch.no_grad():
        pool, logits = ref(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    # `mixed_6/conv`[..., :7] of the NHWC TF map, reshaped to (N, 17 * 17 * 7) as the evaluator does
    spatial = maps[0].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
    for a, b in ((ours.pool, pool), (ours.logits, logits), (ours.spatial, spatial)):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
    assert ours.pool.std() > 1e-3 and ours.spatial.std() > 1e-3
    # logits without the classifier's bias: the evaluator's softmax/logits/MatMul
    state = torch.load(weights, weights_only=True)
    assert state["fc.bias"].abs().max() > 0
    np.testing.assert_allclose(ours.logits, ours.pool @ state["fc.weight"].numpy().T, rtol=1e-4, atol=1e-4)
    # the pytorch-fid protocol feeds the same network otherwise: different features
    pfid = fid.extract(images, features.build("inception-fid", weights), batch_size=10, progress=False)
    assert pfid.spatial is None and np.abs(pfid.pool - ours.pool).max() > 1e-3


# --------------------------------------------------------------------------- the numbers from features


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """The evaluator's compute_inception_score, transcribed (float64)."""
    z = logits - logits.max(1, keepdims=True)
    preds = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_equals_torch_fidelity_and_adm_rule():
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(40, 30))
    mean, std = fid.inception_score(logits, split_size=10)
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=4, shuffle=False)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)
    # ADM's rule with a shorter last part (10, 10, 10, 7): not equal splits
    mean37, _ = fid.inception_score(logits[:37], split_size=10)
    assert mean37 == pytest.approx(_adm_inception_score(logits[:37], 10), rel=1e-12)
    assert mean37 != pytest.approx(isc_features_to_metric(torch.from_numpy(logits[:37]), splits=4,
                                                          shuffle=False)["inception_score_mean"], rel=1e-6)
    # fewer samples than a part: one part, no spread
    assert fid.inception_score(logits[:7], split_size=5000) == (pytest.approx(_adm_inception_score(logits[:7], 5000)),
                                                                None)


def _adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The evaluator's ManifoldEstimator (one block, float64): radii = k-th smallest squared
    distance within the set (self included at 0), then coverage with <=."""
    def d2(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)

    r_real = np.partition(d2(real, real), k, axis=1)[:, k]
    r_fake = np.partition(d2(fake, fake), k, axis=1)[:, k]
    precision = np.mean((d2(fake, real) <= r_real[None, :]).any(1))
    recall = np.mean((d2(real, fake) <= r_fake[None, :]).any(1))
    return float(precision), float(recall)


def test_precision_recall_equals_torch_fidelity_and_adm():
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 24)).astype(np.float32)
    fake = (rng.normal(size=(220, 24)) * 0.8 + 0.4).astype(np.float32)
    ours = fid.precision_recall(real, fake, k=3, block=64)
    ref = prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real), prc_neighborhood=3,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    # the same decisions: the fractions agree to torch-fidelity's float32 mean (1 point = 3e-3)
    assert ours == pytest.approx((ref["precision"], ref["recall"]), abs=1e-6)
    assert ours == pytest.approx(_adm_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3), abs=0)
    assert 0.1 < ours[0] < 1.0 and 0.1 < ours[1] < 1.0, "degenerate comparison"
    assert fid.precision_recall(real, fake, k=3, block=7) == ours  # blocks change nothing


def test_frechet_distance_equals_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) * 1.3 + 0.2
    sa, sb = fid.statistics(a), fid.statistics(b)
    ref = fid_statistics_to_metric({"mu": sa.mu, "sigma": sa.sigma}, {"mu": sb.mu, "sigma": sb.sigma}, False)
    assert fid.frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma) == pytest.approx(
        ref["frechet_inception_distance"], rel=1e-9)


# --------------------------------------------------------------------------- streaming statistics

_STREAM = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from specmatch.metrics.streaming import Moments

    n_chunks, rows, dim, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    def chunk(i):
        rng = np.random.default_rng(1000 + i)
        return (rng.normal(size=(rows, dim)) * np.linspace(0.5, 2.0, dim) + 3.0).astype(np.float32)
    m = Moments()
    m.update(chunk(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(1, n_chunks):
        m.update(chunk(i))
    s = m.statistics()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(out + "_mu.npy", s.mu); np.save(out + "_sigma.npy", s.sigma)
    print(json.dumps({"n": s.n, "growth_kb": peak - base}))
""")


def test_streaming_statistics_fixed_memory_and_equal_to_two_pass(tmp_path):
    """200k feature vectors through the streaming path in a fresh process: peak RSS grows by far
    less than the N x D array would take, and mean/covariance equal the two-pass float64 result."""
    n_chunks, rows, dim = 200, 1000, 256
    out = subprocess.run([sys.executable, "-c", _STREAM, str(n_chunks), str(rows), str(dim), str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["n"] == n_chunks * rows
    full_mb = n_chunks * rows * dim * 8 / 2**20  # the float64 array of every vector: 390 MiB
    assert res["growth_kb"] / 1024 < 40 < full_mb / 5, res

    def chunk(i):
        rng = np.random.default_rng(1000 + i)
        return (rng.normal(size=(rows, dim)) * np.linspace(0.5, 2.0, dim) + 3.0).astype(np.float32)

    total = sum(chunk(i).astype(np.float64).sum(0) for i in range(n_chunks))
    mu = total / (n_chunks * rows)
    m2 = sum((c := chunk(i).astype(np.float64) - mu).T @ c for i in range(n_chunks))
    sigma = m2 / (n_chunks * rows - 1)
    np.testing.assert_allclose(np.load(tmp_path / "s_mu.npy"), mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.load(tmp_path / "s_sigma.npy"), sigma, rtol=0, atol=1e-10)


def test_statistics_equal_numpy_cov_and_reject_bad_batches():
    rng = np.random.default_rng(4)
    f = (rng.normal(size=(501, 12)) + 100.0).astype(np.float32)  # a large mean: no cancellation allowed
    s = streaming.statistics(f, chunk=37)
    np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    m = streaming.Moments("x")
    m.update(f[:5])
    with pytest.raises(SpecmatchError, match="dimension 3 after batches of 12"):
        m.update(f[:5, :3])


# --------------------------------------------------------------------------- parameters and protocols


def test_protocol_resolution_and_bad_parameters():
    assert protocol.settings({}).protocol == "adm" and protocol.settings({}).feature_net == "inception-adm"
    eff = protocol.settings({"net": "efficientnet-lite0-128"})
    assert eff.protocol == "pytorch-fid" and eff.feature_net == "efficientnet-lite0-128"
    pf = protocol.settings({"protocol": "pytorch-fid"})
    assert pf.feature_net == "inception-fid" and pf.min_samples == 4
    over = {"datasets": {"celebahq": {"protocol": "pytorch-fid", "max_images": 100}}}
    assert protocol.settings(over, "celebahq").feature_net == "inception-fid"
    assert protocol.settings(over, "celebahq").max_images == 100
    assert protocol.settings(over, "imagenet").protocol == "adm"
    with pytest.raises(SpecmatchError, match=r"metrics.protocol is 'adm'.*net is 'efficientnet-lite0'"):
        protocol.settings({"protocol": "adm", "net": "efficientnet-lite0"})
    with pytest.raises(SpecmatchError, match=r"metrics.datasets.x.bootstrap must be 0 \(off\) or at least 2"):
        protocol.settings({"datasets": {"x": {"bootstrap": 1}}}, "x")
    with pytest.raises(SpecmatchError, match="reference_batch is an ADM reference batch"):
        protocol.settings({"protocol": "pytorch-fid", "reference_batch": "adm-imagenet256"})
    with pytest.raises(SpecmatchError, match=r"metrics.pr_ref_size \(3\) must exceed pr_k \(3\)"):
        protocol.settings({"pr_ref_size": 3})
    with pytest.raises(SpecmatchError, match="is_splits"):
        protocol.settings({"is_splits": 10})
    with pytest.raises(SpecmatchError, match="datasets"):
        protocol.settings({"datasets": {"x": {"nope": 1}}}, "x")


def test_paper_and_tiny_presets_name_their_protocols():
    paper = config.load(REPO / "params.yaml")["metrics"]
    assert protocol.settings(paper, "imagenet").protocol == "adm"
    assert protocol.settings(paper, "imagenet").reference_batch == "adm-imagenet256"
    assert protocol.settings(paper, "celebahq").protocol == "pytorch-fid"
    assert protocol.settings(paper, "celebahq").reference_batch is None
    tiny = protocol.settings(config.load(REPO / "params.yaml", preset="tiny")["metrics"], "embedded")
    assert (tiny.protocol, tiny.feature_net, tiny.bootstrap) == ("pytorch-fid", "efficientnet-lite0-128", 20)
    assert resources.get("adm-imagenet256").file == "VIRTUAL_imagenet256_labeled.npz"


# --------------------------------------------------------------------------- ADM npz files


def _stats(rng):
    a = rng.normal(size=(2048, 4))
    b = rng.normal(size=(2023, 4))
    return {"mu": rng.normal(size=2048), "sigma": a @ a.T, "mu_s": rng.normal(size=2023), "sigma_s": b @ b.T}


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.pop("sigma_s"), r"no key 'sigma_s'"),
    (lambda d: d.update(mu=np.zeros(2047)), r"key 'mu' is float64\(2047,\), expected float \(2048,\)"),
    (lambda d: d.update(arr_0=d["arr_0"].astype(np.float32)), r"key 'arr_0' is float32"),
    (lambda d: d.pop("arr_0"), r"no key 'arr_0'"),
    (lambda d: d.update(arr_0=d["arr_0"][..., 0]), r"key 'arr_0' is uint8\(4, 8, 8\)"),
    (lambda d: d["mu_s"].__setitem__(0, np.nan), r"key 'mu_s' holds non-finite values"),
])
def test_reference_batch_validation_names_file_and_key(tmp_path, mutate, msg):
    rng = np.random.default_rng(5)
    d = {"arr_0": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), **_stats(rng)}
    mutate(d)
    path = tmp_path / "ref.npz"
    np.savez(path, **d)
    with pytest.raises(SpecmatchError, match=re.escape(str(path)) + ": (.*)?" + msg):
        adm.read_reference_batch(path)


def test_reference_batch_reads_stats_and_streams_images(tmp_path):
    rng = np.random.default_rng(6)
    d = {"arr_0": rng.integers(0, 256, (600, 4, 4, 3), dtype=np.uint8), **_stats(rng)}
    np.savez(tmp_path / "plain.npz", **d)
    batch = adm.read_reference_batch(tmp_path / "plain.npz")
    assert batch.n_images == 600 and batch.image_shape == (4, 4, 3)
    np.testing.assert_array_equal(np.concatenate(list(batch.images(256))), d["arr_0"])
    assert all(np.array_equal(batch.stats[k], d[k]) for k in adm.STAT_SHAPES)
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=d["arr_0"])  # the streaming reader reads both layouts
    deflated = adm.read_reference_batch(tmp_path / "deflated.npz")
    assert deflated.stats is None
    np.testing.assert_array_equal(np.concatenate(list(deflated.images(7))), d["arr_0"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SpecmatchError, match="junk.npz: not an npz file"):
        adm.read_reference_batch(tmp_path / "junk.npz")


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("admds") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 10, "n_test": 9, "shard_size": 4},
            "embedded", out)
    return out


def test_export_adm_sample_batch(tmp_path, small_ds):
    assert cli_main(["export-adm", "--samples", str(small_ds), "--split", "test", "--name", "e",
                     "--out", str(tmp_path / "x")]) == 0
    npz = tmp_path / "x" / adm.FILE
    with np.load(npz) as z:  # what the evaluator's np.load sees
        assert sorted(z.files) == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    reader = SplitReader(small_ds, "test")
    want_images, want_labels = reader.get(np.arange(len(reader)))
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    info = json.loads((tmp_path / "x" / adm.EXPORT_JSON).read_text())
    assert info["images_sha256"] == reader.images_sha256 and info["n"] == 9
    assert (tmp_path / "x" / "provenance.json").is_file()
    back = adm.read_sample_batch(npz)
    assert back.n == 9 and back.image_shape == (32, 32, 3)
    np.savez(tmp_path / "bad.npz", arr_0=images, mu=np.zeros(2048))
    with pytest.raises(SpecmatchError, match="bad.npz: has a key 'mu'"):
        adm.read_sample_batch(tmp_path / "bad.npz")
    assert cli_main(["export-adm", "--samples", str(small_ds), "--split", "val", "--name", "e",
                     "--out", str(tmp_path / "y")]) != 0
    assert not (tmp_path / "y").exists()


# --------------------------------------------------------------------------- the stages under adm


ADM = {"protocol": "adm", "device": "cpu", "batch_size": 5, "split": "test", "pr_ref_size": None}


def _frechet_eigh(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance through symmetric eigendecompositions (exact for covariances): a
    stand-in for scipy's sqrtm in the stage tests, where 2048 x 2048 products of 10 images take
    20-40 s each on these CPUs. `fid.frechet_distance` itself is tested against pytorch-fid and
    torch-fidelity above."""
    root = bootstrap.psd_sqrt(np.asarray(sigma1, np.float64))
    w = np.linalg.eigvalsh(root @ np.asarray(sigma2, np.float64) @ root)
    d = np.asarray(mu1, np.float64) - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(w, 0, None)).sum())


@pytest.fixture()
def stand_in(monkeypatch, weights):
    """The stages load the Inception through the resources manifest, whose checksum the stand-in
    cannot have: load the stand-in file instead (everything else as in a real run)."""
    monkeypatch.setattr(reference.feature_nets, "load", lambda name, device="cpu", resources_dir=None:
                        features.build(name, weights, device))
    monkeypatch.setattr(reference.fid, "frechet_distance", _frechet_eigh)


def test_adm_ref_and_calc_with_dataset_and_reference_batch(tmp_path, small_ds, stand_in, weights):
    info = reference.ref(small_ds, ADM, "embedded", tmp_path / "ref")
    assert info["protocol"]["name"] == "adm" and info["protocol"]["spatial_dim"] == 2023
    with np.load(tmp_path / "ref" / reference.STATS_NAME) as z:
        assert sorted(z.files) == ["mu", "mu_s", "pr_features", "sigma", "sigma_s"]  # no per-image features
        stats = {k: z[k] for k in z.files}
    images, _ = SplitReader(small_ds, "test").get(np.arange(9))
    direct = fid.extract(images, features.build("inception-adm", weights), batch_size=9, progress=False)
    np.testing.assert_allclose(stats["mu"], direct.pool.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma_s"], np.cov(direct.spatial.astype(np.float64), rowvar=False),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["pr_features"], direct.pool, rtol=1e-5, atol=1e-6)

    m = scoring.calc(small_ds, "train", tmp_path / "ref", {**ADM, "bootstrap": 3}, "gen", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / record.FILE).read_text())
    assert saved["protocol"]["name"] == "adm" and saved["metric"] == "FID" and "sFID" in saved
    assert set(saved["FID_bootstrap"]) == {"n", "std", "ci95", "seed", "method"} and saved["FID_bootstrap"]["n"] == 3
    back = record.read(tmp_path / "m")
    assert back == m and back.protocol_name == "adm" and back.uncertainty.n == 3
    assert m.value > 1.0 and m.sfid > 0.1 and m.inception_score.name == "IS" and m.inception_score.std is None
    assert m.uncertainty.low < m.value < m.uncertainty.high

    # The same images and statistics as an ADM reference batch: the same reference. The DAG's way:
    # the dataset's parameters name the batch, a resource found in the resources folder.
    batch = tmp_path / "res" / resources.get("adm-imagenet256").file
    batch.parent.mkdir()
    np.savez(batch, arr_0=images, **{k: stats[k] for k in adm.STAT_SHAPES})
    reference.ref(small_ds, {**ADM, "datasets": {"embedded": {"reference_batch": "adm-imagenet256",
                                                              "resources_dir": str(batch.parent)}}},
                  "embedded", tmp_path / "ref_b")
    rb = reference.load_ref(tmp_path / "ref_b")
    assert rb.info["source"]["sha256"] == sha256_file(batch) and rb.info["n"] is None
    assert rb.info["source"]["resource"] == "adm-imagenet256" and rb.dataset == "embedded"
    assert all(np.array_equal(getattr(rb, k), stats[k]) for k in adm.STAT_SHAPES)
    np.testing.assert_allclose(rb.pr_features, stats["pr_features"], rtol=1e-6, atol=1e-6)
    # ... and without stored statistics they are computed from arr_0, as the evaluator does
    np.savez(tmp_path / "bare.npz", arr_0=images)
    reference.ref(None, ADM, "embedded", tmp_path / "ref_c", reference_batch=tmp_path / "bare.npz")
    rc = reference.load_ref(tmp_path / "ref_c")
    assert rc.info["n"] == 9 and rc.info["source"]["statistics"] == "computed from arr_0"
    for k in adm.STAT_SHAPES:
        np.testing.assert_allclose(getattr(rc, k), stats[k], rtol=1e-5, atol=1e-6)
    # a record measured against the batch names its file and stored statistics as the reference
    label = dataclasses.replace(m, reference={**m.reference, "split": rb.info["split"], "n": rb.info["n"]})
    assert label.reference_label == "embedded/VIRTUAL_imagenet256_labeled.npz (its stored statistics)"


def test_adm_bad_inputs_write_nothing(tmp_path, small_ds, stand_in):
    reference.ref(small_ds, ADM, "embedded", tmp_path / "ref")
    before = sorted(p.name for p in tmp_path.iterdir())
    # another protocol than the reference's
    with pytest.raises(SpecmatchError, match=r"ref/stats.json: the reference was made under protocol adm with "
                                             r"'inception-adm'.*protocol pytorch-fid with 'inception-fid'"):
        scoring.calc(small_ds, "train", tmp_path / "ref", {**ADM, "protocol": "pytorch-fid"}, "x", tmp_path / "o")
    # fewer samples than the protocol's minimum (k + 1)
    with pytest.raises(SpecmatchError, match=r"\(train\): 10 images, fewer than the 11 that protocol adm scores "
                                             r"\(metrics.pr_k = 10"):
        scoring.calc(small_ds, "train", tmp_path / "ref", {**ADM, "pr_k": 10}, "x", tmp_path / "o")
    # an ADM batch under the pytorch-fid protocol; a broken batch
    np.savez(tmp_path / "b.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(2048))
    with pytest.raises(SpecmatchError, match="measured under protocol adm"):
        reference.ref(None, {**ADM, "protocol": "pytorch-fid"}, "embedded", tmp_path / "o",
                      reference_batch=tmp_path / "b.npz")
    with pytest.raises(SpecmatchError, match=r"b.npz: has \['mu'\] but no key 'sigma'"):
        reference.ref(None, ADM, "embedded", tmp_path / "o", reference_batch=tmp_path / "b.npz")
    # a dataset whose parameters name a reference batch that is not in the resources folder
    with pytest.raises(SpecmatchError, match=r"'VIRTUAL_imagenet256_labeled.npz' \(adm-imagenet256: .*missing: "
                                             r"looked in the resources folder .*Nothing is downloaded"):
        reference.ref(small_ds, {**ADM, "reference_batch": "adm-imagenet256", "resources_dir": str(tmp_path / "no")},
                      "embedded", tmp_path / "o")
    # statistics of an older version
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / "stats.npz", mu=np.zeros(3))
    (tmp_path / "old" / "stats.json").write_text(json.dumps({"dataset": "x", "protocol": {}}))
    with pytest.raises(SpecmatchError, match=r"old/stats.json: key schema is None"):
        scoring.calc(small_ds, "train", tmp_path / "old", ADM, "x", tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["b.npz", "old"])
