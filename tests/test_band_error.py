"""The band-error measurement (`specmatch.diffusion.band_error`) against independent closed forms.

The data are synthetic Gaussian maps built in the DCT domain: N = 2000 images of 1x16x16 whose
coefficients are independent, zero-mean, with variance P(r) = 1 / max(r, 1)^2 + 1e-3 (a power
law in the radial DCT frequency r with a floor). For such data the Wiener denoiser is the exact
MMSE estimator, so its measured band errors must equal the closed form up to the sampling error
of N images, which each test derives (delta method on sums of chi-squares) and uses at 5 sigma.
The theory here is written with numpy and scipy from the schedule formulas of docs/method.md §6,
not with the module's helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from specmatch import spectral
from specmatch.diffusion import band_error as be
from specmatch.diffusion import transport
from specmatch.errors import SpecmatchError

N, H, K = 2000, 16, 16
T_GRID = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 0.95]
Z = 5.0  # tolerance in standard errors: P(|z| > 5) = 6e-7 per comparison, a few hundred comparisons


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The machine is shared; small float64 matmuls are slower with contending threads than with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _power_law(h: int = H) -> torch.Tensor:
    u = torch.arange(h, dtype=torch.float64)
    r = torch.sqrt(u[:, None] ** 2 + u[None, :] ** 2)
    return (1.0 / r.clamp_min(1.0) ** 2 + 1e-3)[None]  # (1, h, h)


def _to_pixels(X: torch.Tensor) -> torch.Tensor:
    d = spectral.dct_matrix(X.shape[-1], dtype=torch.float64)
    return d.T @ X @ d


def _dct(x: torch.Tensor) -> torch.Tensor:
    d = spectral.dct_matrix(x.shape[-1], dtype=torch.float64)
    return d @ x.to(torch.float64) @ d.T


@pytest.fixture(scope="module")
def data():
    P = _power_law()
    gen = torch.Generator().manual_seed(1234)
    X = torch.randn((N, 1, H, H), generator=gen, dtype=torch.float64) * P.sqrt()
    return P, _to_pixels(X)


# ----------------------------------------------------------------------------- independent theory


def _sched(kind: str, t):
    """alpha, sigma, d_alpha, d_sigma of docs/method.md §6, in numpy."""
    t = np.asarray(t, np.float64)
    if kind == "vp-linear":
        b0, b1 = 0.1, 20.0
        la = -0.25 * t * t * (b1 - b0) - 0.5 * t * b0
        a = np.exp(la)
        s = np.sqrt(-np.expm1(2 * la))
        beta = b0 + t * (b1 - b0)
        return a, s, -0.5 * beta * a, 0.5 * beta * a * a / s
    return 1.0 - t, t, -np.ones_like(t), np.ones_like(t)


def _bands_np(h: int = H) -> np.ndarray:
    return spectral.radial_bins(h, h, K).numpy().reshape(-1)


def _theory_rel(P: np.ndarray, kind: str, t: float, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R_k, SE of the measured ratio, SE of the closed form on the sample's P) for data of true
    per-coefficient variances P (flattened), at t.

    Per coefficient, with r = s^2 / (a^2 P + s^2), the Wiener error e = (1 - g a) X - g s eps has
    variance v = P r and Cov(e, X) = P r, so for A = sum e^2, B = sum X^2 over a band,
    Var(A - R B) = 2 sum P^2 (r^2 - 2 R r^2 + R^2) (Gaussian moments: Var(e^2) = 2 v^2,
    Cov(e^2, X^2) = 2 Cov(e, X)^2 = 2 P^2 r^2, Var(X^2) = 2 P^2);
    the measured ratio has Var = that / (N (sum P)^2), plus the centring of the denominator by
    the sample mean, which adds P (1 - chi2_1) per coefficient: Var 2 R^2 sum P^2 / (N sum P)^2.
    The closed form evaluated on the sample's unbiased P_hat (Var 2 P^2 / (N - 1)) moves by
    sum (r^2 - R) dP / sum P (derivative of h(P) = P r is r^2)."""
    a, s, _, _ = _sched(kind, t)
    bins = _bands_np()
    r = s * s / (a * a * P + s * s)
    R, se, se_cf = np.zeros(K), np.zeros(K), np.zeros(K)
    for k in range(K):
        p, rk = P[bins == k], r[bins == k]
        R[k] = (p * rk).sum() / p.sum()
        var = 2 * (p * p * (rk * rk - 2 * R[k] * rk * rk + R[k] ** 2)).sum() / (n * p.sum() ** 2)
        var += 2 * R[k] ** 2 * (p * p).sum() / (n * p.sum()) ** 2
        se[k] = math.sqrt(var)
        se_cf[k] = math.sqrt(2 * (p * p * (rk * rk - R[k]) ** 2).sum() / ((n - 1) * p.sum() ** 2))
    return R, se, se_cf


def _loss_density(P: np.ndarray, kind: str):
    """t -> per-coefficient variance of the Wiener error in the training target's space:
    eps: a^2 P / (a^2 P + s^2); velocity: (a d_sigma - s d_alpha)^2 P / (a^2 P + s^2) (from
    v_hat - v = d_alpha (x0_hat - x0) + d_sigma (eps_hat - eps) and eps_hat - eps = -(a / s)(x0_hat - x0))."""
    def v(t):
        a, s, da, ds = _sched(kind, t)
        kappa = a if kind == "vp-linear" else a * ds - s * da
        return kappa ** 2 * P / (a * a * P + s * s)
    return v


def _train_range(kind: str) -> tuple[float, float]:
    return (1e-3, 1.0) if kind == "vp-linear" else (0.0, 1.0)  # VPLinear(t_eps=1e-3), Linear(t_eps_train=0)


def _theory_loss(P: np.ndarray, kind: str, n: int) -> dict[str, np.ndarray]:
    """Band losses of the Wiener denoiser over t ~ U[t_lo, t_hi] (mean over the C h w elements),
    their shares, and the Monte-Carlo SE of one draw (t_n, eps_n) per image over n images: given t
    the band loss l_k = sum_i v_i(t) z_i^2 / (C h w) with z_i standard normal, so
    E[l_j l_k | t] = m_j m_k + 2 [j = k] q_k with m = band sums of v, q = band sums of v^2."""
    lo, hi = _train_range(kind)
    v, bins, cells = _loss_density(P, kind), _bands_np(), P.size

    def mean_t(f):
        val, err = integrate.quad(f, lo, hi, limit=400, epsabs=0, epsrel=1e-11,
                                  points=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1])
        return val / (hi - lo)

    def m(t, k):
        return v(t)[bins == k].sum() / cells

    def q(t, k):
        return (v(t)[bins == k] ** 2).sum() / cells ** 2

    def m_tot(t):
        return v(t).sum() / cells

    loss = np.array([mean_t(lambda t, k=k: m(t, k)) for k in range(K)])
    total = loss.sum()
    share = loss / total
    e_kk = np.array([mean_t(lambda t, k=k: m(t, k) ** 2 + 2 * q(t, k)) for k in range(K)])
    e_kt = np.array([mean_t(lambda t, k=k: m(t, k) * m_tot(t) + 2 * q(t, k)) for k in range(K)])
    e_tt = mean_t(lambda t: m_tot(t) ** 2 + 2 * sum(q(t, k) for k in range(K)))
    loss_se = np.sqrt((e_kk - loss ** 2) / n)
    # delta method for sum l_k / sum l_tot: Var(l_k - S l_tot) / (n E[l_tot]^2)
    share_se = np.sqrt((e_kk - 2 * share * e_kt + share ** 2 * e_tt) / (n * total ** 2))
    return {"loss": loss, "share": share, "loss_se": loss_se, "share_se": share_se}


@pytest.fixture(scope="module")
def measured(data):
    P, x0 = data
    out = {}
    for path in (transport.VPLinear(), transport.Linear()):
        out[path.name] = be.measure(be.wiener_model_fn(P[0:1], path), path, x0, T_GRID, seed=7, batch_size=500,
                                    n_boot=100, label=path.name)
    return out


@pytest.fixture(scope="module")
def loss_theory(data):
    P = data[0].numpy().reshape(-1)
    return {kind: _theory_loss(P, kind, N) for kind in ("vp-linear", "linear")}


# ----------------------------------------------------------------------------- closed form vs measurement


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_wiener_model_reproduces_the_closed_form_band_curves(data, measured, kind):
    P = data[0].numpy().reshape(-1)
    res = measured[kind]
    assert res.rel_err.shape == (len(T_GRID), K) and res.n_images == N and res.shape == (1, H, H)
    ratios, informative = [], []
    for j, t in enumerate(T_GRID):
        R, se, se_cf = _theory_rel(P, kind, t, N)
        z = (res.rel_err[j] - R) / se
        assert np.all(np.abs(z) < Z), f"t={t}: measured {res.rel_err[j]} vs theory {R} (z {z.round(1)})"
        z_cf = (res.rel_err_wiener[j] - R) / se_cf
        assert np.all(np.abs(z_cf) < Z), f"t={t}: closed form on the sample's P, z {z_cf.round(1)}"
        ratios.append(res.rel_err_se[j] / se)
        informative.append(R < 0.9)
    # The half-sample bootstrap estimates the same spread (n_boot = 100: each SE to about 7%)
    # where the error is informative. Where rel_err ~ 1 the spread left is the O(1/N) centring
    # term, which the bootstrap (holding the mean M fixed) overestimates up to 2x: conservative.
    ratios, informative = np.array(ratios), np.array(informative)
    assert 0.85 < float(np.median(ratios[informative])) < 1.2, np.median(ratios[informative])
    assert np.all((ratios[informative] > 0.6) & (ratios[informative] < 1.6)), ratios.round(2)
    assert np.all((ratios > 0.6) & (ratios < 2.5)), ratios.round(2)
    # The curves themselves: monotone in t and from ~0 to ~1, low bands recovered first.
    assert np.all(np.diff(res.rel_err_wiener, axis=0) > 0)
    assert res.rel_err_wiener[0, 0] < 0.01 and res.rel_err_wiener[-1].min() > 0.98
    assert np.all(np.diff(res.rel_err_wiener[4]) > 0)


def test_closed_form_limits(data):
    P = data[0]
    for path in (transport.VPLinear(), transport.Linear()):
        low = be.wiener_rel_err(P, path, [1e-9]).numpy()
        assert np.all(low < 1e-5), low  # s -> 0: the noisy map is the data
        high = be.wiener_rel_err(P, path, [1 - 1e-9]).numpy()
        # t -> 1: nothing but the mean is left; VP keeps alpha(1) = exp(-5.025) of signal, so
        # 1 - rel = sum a^2 P^2 / (a^2 P + s^2) / sum P <= a(1)^2 max P.
        a1 = float(path.alpha(torch.tensor(1.0, dtype=torch.float64)))
        assert np.all(high > 1 - a1 ** 2 * float(P.max()) - 1e-12), high
        fine = np.linspace(1e-4, 1 - 1e-4, 200)
        assert np.all(np.diff(be.wiener_rel_err(P, path, fine).numpy(), axis=0) >= 0)


@pytest.mark.parametrize("kind,t", [("vp-linear", 0.05), ("vp-linear", 0.3), ("linear", 0.2), ("linear", 0.7)])
def test_per_coefficient_mmse_by_brute_force(kind, t):
    """Least squares finds the best scalar gain on samples; it must match a P / (a^2 P + s^2), and
    the Wiener model's own estimate must achieve the mean squared error P s^2 / (a^2 P + s^2)."""
    n = 100_000
    P = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 0.3, 0.03, 3e-3, 5.0, 0.5, 0.05, 2.0, 20.0],
                     dtype=torch.float64).reshape(1, 4, 4)
    path = transport.make_path(kind)
    a, s, _, _ = (float(v) for v in _sched(kind, t))
    gen = torch.Generator().manual_seed(5)
    X = torch.randn((n, 1, 4, 4), generator=gen, dtype=torch.float64) * P.sqrt()
    E = torch.randn((n, 1, 4, 4), generator=gen, dtype=torch.float64)
    Y = a * X + s * E
    g_ls = (Y * X).sum(0) / (Y * Y).sum(0)
    # SE of a least-squares slope: sqrt(residual variance / sum y^2).
    resid = (X - g_ls * Y).square().mean(0)
    g_se = (resid / (Y * Y).sum(0)).sqrt()
    assert torch.all((g_ls - be.wiener_gain(P, a, s)).abs() < Z * g_se)
    mse_th = P * s * s / (a * a * P + s * s)
    assert torch.all((resid - mse_th).abs() < Z * math.sqrt(2 / n) * mse_th)
    assert torch.allclose(be.wiener_mse(P, a, s), mse_th)
    # The model, through the path's conversion, on the same samples (pixel domain in and out).
    fn = be.wiener_model_fn(P, path)
    tt = torch.full((n,), t, dtype=torch.float64)
    x_t = _to_pixels(Y)
    x0_hat = path.to_x0(fn(x_t, tt), x_t, tt)
    X0_hat = _dct(x0_hat)
    g_model = (Y * X0_hat).sum(0) / (Y * Y).sum(0)
    assert torch.allclose(g_model, be.wiener_gain(P, a, s), rtol=1e-9, atol=1e-12)
    mse_model = (X0_hat - X).square().mean(0)
    assert torch.all((mse_model - mse_th).abs() < Z * math.sqrt(2 / n) * mse_th)


def test_wiener_model_with_the_data_mean(data):
    """Data with a mean: the affine Wiener estimator (mean from `coefficient_power`) is as good on
    shifted data as the centred one on centred data, and returns the mean at t -> 1."""
    P, x0 = data
    shifted = x0[:400] + torch.linspace(-2, 3, H, dtype=torch.float64)[None, None, :, None]
    Pc, M = be.coefficient_power(shifted)
    path = transport.VPLinear()
    t = [0.05, 0.5, 0.999]
    got = be.measure(be.wiener_model_fn(Pc, path, M), path, shifted, t, n_boot=0, batch_size=400)
    centred = be.measure(be.wiener_model_fn(Pc, path), path, shifted - _to_pixels(M)[None], t, n_boot=0,
                         batch_size=400)
    np.testing.assert_allclose(got.rel_err, centred.rel_err, rtol=1e-9)
    assert got.rel_err_se is None
    # rel_err -> 1 when the estimate is the mean (unbiased variance in the denominator)
    assert abs(got.rel_err[-1].mean() - 1) < 0.02


# ----------------------------------------------------------------------------- a model that ignores a band


def _ignoring(base, path: transport.Path, band: int, h: int = H):
    cells = (spectral.radial_bins(h, h, K) == band).to(torch.float64)

    def fn(x_t, t):
        x0_hat = path.to_x0(base(x_t, t), x_t, t)
        X = _dct(x0_hat) * (1 - cells)
        return be.prediction_from_x0(path, _to_pixels(X), x_t, t)
    return fn


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_a_model_that_ignores_a_band_shows_it(data, measured, kind):
    P, x0 = data
    path = transport.make_path(kind)
    band = 4
    res = be.measure(_ignoring(be.wiener_model_fn(P, path), path, band), path, x0, T_GRID, seed=7,
                     batch_size=500, n_boot=0)
    base = measured[kind]
    others = [k for k in range(K) if k != band]
    # Same seed, same noise: every other band is unchanged (up to rounding of the round trips).
    np.testing.assert_allclose(res.rel_err[:, others], base.rel_err[:, others], rtol=1e-8, atol=1e-12)
    # The ignored band's estimate is 0, its error the coefficient itself: sum X^2 over the
    # centred-and-unbiased sum, whose ratio is 1 + O(sqrt(2 sum P^2) / (N sum P)).
    p = P.numpy().reshape(-1)[_bands_np() == band]
    tol = Z * math.sqrt(2 * (p * p).sum()) / (N * p.sum())
    assert np.all(np.abs(res.rel_err[:, band] - 1) < tol), res.rel_err[:, band]
    assert np.all(base.rel_err[:4, band] < 0.35)  # the Wiener model got it at low noise
    assert res.loss_share_model[band] > base.loss_share_model[band]


# ----------------------------------------------------------------------------- loss shares


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_wiener_band_loss_matches_an_independent_integral(data, loss_theory, kind):
    P = data[0]
    th = loss_theory[kind]
    got = be.wiener_band_loss(P, transport.make_path(kind)).numpy()
    np.testing.assert_allclose(got, th["loss"], rtol=1e-8)
    share = be.wiener_loss_share(P, transport.make_path(kind)).numpy()
    assert abs(share.sum() - 1) < 1e-12
    np.testing.assert_allclose(share, th["share"], rtol=1e-8)


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_measured_loss_shares(data, measured, loss_theory, kind):
    res, th = measured[kind], loss_theory[kind]
    assert abs(res.loss_share_model.sum() - 1) < 1e-12 and abs(res.loss_share_wiener.sum() - 1) < 1e-12
    # Monte Carlo over the training's t (one draw per image) against the integral of the truth.
    z = (res.loss_model - th["loss"]) / th["loss_se"]
    assert np.all(np.abs(z) < Z), z.round(1)
    z = (res.loss_share_model - th["share"]) / th["share_se"]
    assert np.all(np.abs(z) < Z), z.round(1)
    ratio = res.loss_share_model_se / th["share_se"]
    assert np.all((ratio > 0.55) & (ratio < 1.8)), ratio.round(2)
    # The stored closed form is the one of the sample's own powers.
    P_hat, _ = be.coefficient_power(data[1])
    np.testing.assert_allclose(res.loss_share_wiener, be.wiener_loss_share(P_hat, transport.make_path(kind)),
                               rtol=1e-12)
    # The Wiener model is the optimum: its pooled ratio to the closed form is 1 within its SE,
    # plus the closed form's own error from the sample's P (relative sqrt(2 / N) per coefficient,
    # pooled over 256 of them: about 0.002).
    rho, se = be.pooled_ratio(res, range(K))
    assert abs(rho - 1) < Z * se + 5 * math.sqrt(2 / N / (H * H))


def test_eps_loss_weight_sits_in_the_low_bands(loss_theory):
    """Under the VP eps loss, the per-coefficient loss a^2 P / (a^2 P + s^2) grows with P: on a
    power law, the lowest third of the bands carries more loss per DCT cell than the highest."""
    share = loss_theory["vp-linear"]["share"]
    counts = spectral.bin_counts(H, H, K).numpy()
    per_cell = share / counts
    g = be.band_groups(K)
    assert per_cell[g["low"]].mean() > 2 * per_cell[g["high"]].mean()
    assert np.all(np.diff(per_cell) < 1e-12)


# ----------------------------------------------------------------------------- bookkeeping


def test_draws_do_not_depend_on_the_batch_size_and_float32_agrees(data):
    P, x0 = data
    path = transport.Linear()
    fn = be.wiener_model_fn(P, path)
    a = be.measure(fn, path, x0[:60], [0.1, 0.5], seed=3, batch_size=60, n_boot=20)
    b = be.measure(fn, path, x0[:60], [0.1, 0.5], seed=3, batch_size=7, n_boot=20)
    np.testing.assert_allclose(a.rel_err, b.rel_err, rtol=1e-12)
    np.testing.assert_allclose(a.loss_model, b.loss_model, rtol=1e-12)
    np.testing.assert_allclose(a.rel_err_se, b.rel_err_se, rtol=1e-12)
    c = be.measure(fn, path, x0[:60].float(), [0.1, 0.5], seed=3, batch_size=60, n_boot=0)
    np.testing.assert_allclose(c.rel_err, a.rel_err, rtol=1e-4)


def test_json_round_trip_snapshots_and_band_table(data):
    P, x0 = data
    path = transport.VPLinear()
    series = be.measure_snapshots([("early", _ignoring(be.wiener_model_fn(P, path), path, 2)),
                                   ("late", be.wiener_model_fn(P, path))], path, x0[:100], [0.05, 0.5],
                                  n_boot=10, batch_size=50)
    assert [r.label for r in series] == ["early", "late"]
    back = be.BandError.from_json(json.loads(json.dumps(series[0].to_json())))
    for k in be.BandError.ARRAYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(series[0], k))
    assert back.path["prediction"] == "eps" and back.path["train_t"] == [1e-3, 1.0]
    assert back.bands == series[0].bands and back.per_image is None
    assert len(back.bands) == K and sum(b["cells"] for b in back.bands) == H * H
    assert back.bands[-1]["r_hi"] == pytest.approx(math.sqrt(2) * (H - 1))
    assert back.bands[-1]["f_hi"] == pytest.approx(math.sqrt(2) * (H - 1) / (2 * H))
    # band_power is §2.4's per-cell energy of the centred maps, channels averaged
    P_hat, _ = be.coefficient_power(x0[:100])
    bins = spectral.radial_bins(H, H, K)
    expect = np.array([float(P_hat[0][bins == k].mean()) for k in range(K)])
    np.testing.assert_allclose(series[0].band_power, expect, rtol=1e-5)
    # the ignored band improves from "early" to "late"; the others do not move
    ex = np.stack([r.excess_ratio() for r in series])
    assert ex[0, 2] > 5 * ex[1, 2]
    np.testing.assert_allclose(ex[0, [0, 1, 3]], ex[1, [0, 1, 3]], rtol=1e-9)
    with pytest.raises(SpecmatchError, match="snapshots: labels must be distinct"):
        be.measure_snapshots([("a", None), ("a", None)], path, x0[:10], [0.5])


def test_improvement_step():
    steps = [0, 100, 200, 400]
    v = np.array([[2.0, 2.0, 1.0], [1.2, 1.9, 1.0], [1.1, 1.5, 1.0], [1.0, 1.0, 1.0]])
    got = be.improvement_step(steps, v, 0.5)
    assert got[0] == pytest.approx(62.5) and got[1] == pytest.approx(200)
    assert math.isnan(got[2])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument(data):
    P, x0 = data
    path = transport.VPLinear()
    fn = be.wiener_model_fn(P, path)
    with pytest.raises(SpecmatchError, match=r"x0: maps must be square.*16x8"):
        be.measure(fn, path, x0[:20, :, :, :8], [0.5])
    with pytest.raises(SpecmatchError, match=r"t: every noise level must lie in the open interval \(0, 1\).*1\.0"):
        be.measure(fn, path, x0[:20], [0.5, 1.0])
    with pytest.raises(SpecmatchError, match=r"t: every noise level.*0\.0"):
        be.wiener_rel_err(P, path, [0.0])
    with pytest.raises(SpecmatchError, match=r"t: .*strictly increasing"):
        be.measure(fn, path, x0[:20], [0.5, 0.2])
    with pytest.raises(SpecmatchError, match=r"n_bins: 16 radial bands leave bands .* of a 4x4 map.*n_bins <= 8"):
        be.measure(fn, path, x0[:20, :, :4, :4], [0.5])
    with pytest.raises(SpecmatchError, match=r"n_bins: .*4x4"):
        be.wiener_rel_err(P[:, :4, :4], path, [0.5])
    with pytest.raises(SpecmatchError, match=r"wiener model: x_t must be \(B, 1, 16, 16\) like P, got \(20, 1, 8, 8\)"):
        be.measure(fn, path, x0[:20, :, :8, :8], [0.5])
    with pytest.raises(SpecmatchError, match=r"model_fn: must return a prediction shaped like x_t \(20, 1, 16, 16\)"):
        be.measure(lambda x, t: x[:, :, :8], path, x0[:20], [0.5])
    with pytest.raises(SpecmatchError, match=r"labels: expected one label per image of x0, shape \(20,\)"):
        be.measure(fn, path, x0[:20], [0.5], labels=torch.zeros(19, dtype=torch.long))
    with pytest.raises(SpecmatchError, match=r"x0: expected shape \(N, C, h, w\)"):
        be.measure(fn, path, x0[:20, 0], [0.5])
    with pytest.raises(SpecmatchError, match=r"x0: need at least 6 images"):
        be.measure(fn, path, x0[:3], [0.5])
    with pytest.raises(SpecmatchError, match=r"mean: expected finite DCT-domain means shaped like P"):
        be.wiener_model_fn(P, path, torch.zeros(1, 8, 8))
    with pytest.raises(SpecmatchError, match=r"x0: bands \[0\] have no power"):
        be.measure(lambda x, t: x, path, torch.ones(8, 1, 4, 4, dtype=torch.float64), [0.5], n_bins=1)
