"""The bootstrap of a Fréchet distance: its eigendecomposition form equals the scipy/pytorch-fid
computation, and its spread estimates the real sampling spread of the distance."""

from __future__ import annotations

import numpy as np
import pytest

from specmatch.errors import SpecmatchError
from specmatch.metrics import bootstrap, fid


def _pair(rng, n1, n2, d):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n1, d)) @ mix, rng.normal(size=(n2, d)) @ mix * 1.3 + 0.2


@pytest.mark.parametrize("n1,n2,d", [(300, 400, 32), (40, 50, 64), (64, 64, 64), (500, 30, 48)])
def test_eigh_form_equals_the_sqrtm_distance(n1, n2, d):
    x, y = _pair(np.random.default_rng(n1 + d), n1, n2, d)
    sx, sy = fid.statistics(x), fid.statistics(y)
    ref = fid.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert bootstrap.frechet_distance_eigh(x, y) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("n,d", [(200, 24), (128, 256)])
def test_bootstrap_spread_estimates_the_sampling_spread(n, d):
    """The distance of n samples of a fixed Gaussian to its reference statistics varies from draw
    to draw; the bootstrap of one draw must estimate that standard deviation, for n above and
    below the dimension (conservatively: measured 1.1x and 1.4x; the classic with-replacement
    bootstrap gives 6x at n = 128, d = 256, which this range rejects)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    real = rng.normal(size=(20000, d)) @ mix
    ref = fid.statistics(real)
    draws = [rng.normal(size=(n, d)) @ mix * 1.1 + 0.05 for _ in range(60)]
    # The eigh form equals the sqrtm distance (test above) and is quick.
    dists = [bootstrap.frechet_distance_eigh(x, real) for x in draws]
    true_std = float(np.std(dists, ddof=1))
    est = [bootstrap.against_reference(x, ref.mu, ref.sigma, 40, seed=i).std for i, x in enumerate(draws[:10])]
    assert 0.8 * true_std < np.median(est) < 1.7 * true_std, (n, true_std, est)


def test_bootstrap_interval_and_determinism():
    rng = np.random.default_rng(1)
    x, y = _pair(rng, 100, 100, 16)
    ref = fid.statistics(y)
    a = bootstrap.against_reference(x, ref.mu, ref.sigma, 30, seed=7)
    b = bootstrap.against_reference(x, ref.mu, ref.sigma, 30, seed=7)
    assert a == b and a.n == 30 and a.low < a.high and a.std > 0
    point = fid.frechet_distance(fid.statistics(x).mu, fid.statistics(x).sigma, ref.mu, ref.sigma)
    assert (a.low + a.high) / 2 == pytest.approx(point, rel=1e-6) and a.high - a.low == pytest.approx(3.92 * a.std)
    assert a.to_json()["ci95"] == [a.low, a.high] and a.to_json()["n"] == 30


def test_paired_bootstrap():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(80, 12))
    same = bootstrap.paired(x, x.copy(), 20, seed=0)
    assert same.std == pytest.approx(0.0, abs=1e-9) and abs(same.high) < 1e-8
    noisy = bootstrap.paired(x, x * 1.5 + 1.0, 20, seed=0)
    assert noisy.std > 0 and noisy.low > 0


def test_bad_inputs():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 4))
    with pytest.raises(SpecmatchError, match="N >= 6"):
        bootstrap.paired(x[:5], x[:5], 5, 0)
    with pytest.raises(SpecmatchError, match="differ in shape"):
        bootstrap.paired(x, x[:9], 5, 0)
    with pytest.raises(SpecmatchError, match="n_boot"):
        bootstrap.against_reference(x, x.mean(0), np.cov(x, rowvar=False), 1, 0)
