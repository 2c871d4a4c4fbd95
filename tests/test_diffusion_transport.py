"""Generative paths and samplers (docs/method.md §6): specmatch.diffusion.transport / samplers.

Gaussian data x0 ~ N(m, diag(s^2)) makes every quantity exact: with a = alpha(t), b = sigma(t),
V = a^2 s^2 + b^2,
    E[eps | x_t] = b (x_t - a m) / V,   E[x0 | x_t] = m + a s^2 (x_t - a m) / V,
the probability-flow ODE maps x_1 = a1 m + sqrt(V1) z to x_t = a m + sqrt(V) z, and the marginal
at t is N(a m, V). The schedules and the exact model below are written out here, independently
of the library's conversion helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from specmatch.diffusion import samplers as S
from specmatch.diffusion.transport import Linear, VPLinear, make_path
from specmatch.errors import SpecmatchError

F64 = torch.float64
BMIN, BMAX = 0.1, 20.0

# Gaussian data in d = 4 dims, a different mean and scale per dim.
M = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
SD = torch.tensor([1.0, 0.5, 2.0, 0.7], dtype=F64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small elementwise ops, where intra-op threading costs more than it
    gains (100x on a 2-core runner); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# independent formulas
# ------------------------------------------------------------------------------------------
def coeffs(kind: str, t: torch.Tensor, bmin: float = BMIN, bmax: float = BMAX):
    """alpha, sigma, d_alpha, d_sigma written out for each path (float64)."""
    t = torch.as_tensor(t, dtype=F64)
    if kind == "linear":
        return 1.0 - t, t.clone(), -torch.ones_like(t), torch.ones_like(t)
    log_a = -t * t * (bmax - bmin) / 4.0 - t * bmin / 2.0
    a = torch.exp(log_a)
    b = torch.sqrt(1.0 - a * a)
    beta = bmin + t * (bmax - bmin)
    return a, b, -0.5 * beta * a, 0.5 * beta * a * a / b


def posterior(kind: str, x: torch.Tensor, t: torch.Tensor, m=M, s=SD):
    """(x0_hat, eps_hat, (a, b, da, db)) of Gaussian data at (x, t), t of shape [B]."""
    if bool((t == t[0]).all()):  # one time for the batch: scalar coefficients (fast)
        cs = coeffs(kind, t[0].to(F64))
    else:
        cs = tuple(c[:, None] for c in coeffs(kind, t.to(F64)))
    a, b, _, _ = cs
    xd = x.to(F64)
    var = a * a * s * s + b * b
    eps_hat = b * (xd - a * m) / var
    x0_hat = m + a * s * s * (xd - a * m) / var
    return x0_hat, eps_hat, cs


def gauss_model(kind: str, m=M, s=SD):
    """The exact prediction of the path's parameterisation (eps for VP, velocity for linear)."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        x0_hat, eps_hat, (_, _, da, db) = posterior(kind, x, t, m, s)
        out = eps_hat if kind == "vp-linear" else da * x0_hat + db * eps_hat
        return out.to(x.dtype)
    return fn


def marginal(kind: str, z: torch.Tensor, t: float, m=M, s=SD) -> torch.Tensor:
    """The exact PF-ODE flow of z: a(t) m + sqrt(a^2 s^2 + b^2) z."""
    a, b, _, _ = coeffs(kind, torch.tensor(t, dtype=F64))
    return a * m + torch.sqrt(a * a * s * s + b * b) * z


def zs(n: int, seed: int = 0, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bmin,bmax", [(0.1, 20.0), (0.5, 8.0), (0.0, 12.0)])
def test_vp_alpha_is_exp_of_integrated_beta(bmin, bmax):
    path = make_path("vp-linear", beta_min=bmin, beta_max=bmax)
    grid = torch.linspace(0.0, 1.0, 20001, dtype=F64)
    beta = bmin + grid * (bmax - bmin)
    integral = torch.cat([torch.zeros(1, dtype=F64),
                          torch.cumulative_trapezoid(beta, grid)])
    alpha_num = torch.exp(-0.5 * integral)
    idx = torch.arange(0, 20001, 500)
    t = grid[idx]
    assert torch.allclose(path.alpha(t), alpha_num[idx], rtol=1e-8, atol=1e-12)
    assert torch.allclose(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)
    assert path.sigma(torch.tensor(0.0, dtype=F64)).item() == 0.0
    assert path.alpha(torch.tensor(1.0, dtype=F64)).item() == pytest.approx(
        math.exp(-(bmax - bmin) / 4 - bmin / 2), rel=1e-12)
    # small t: sigma accurate (no cancellation in 1 - alpha^2)
    t_small = torch.tensor([1e-7, 1e-5], dtype=F64)
    expect = torch.sqrt(bmin * t_small + (bmax - bmin) * t_small**2 / 2)  # sqrt(-2 log alpha)
    assert torch.allclose(path.sigma(t_small.float()).double(), expect, rtol=1e-3)


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_schedule_matches_written_formulas_and_derivatives(kind):
    path = make_path(kind)
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    a, b, da, db = coeffs(kind, t)
    assert torch.allclose(path.alpha(t), a, rtol=1e-12)
    assert torch.allclose(path.sigma(t), b, rtol=1e-12)
    h = 1e-6
    fd_a = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_s = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    assert torch.allclose(path.d_alpha(t), fd_a, rtol=1e-6, atol=1e-8)
    assert torch.allclose(path.d_sigma(t), fd_s, rtol=1e-6, atol=1e-8)
    assert torch.allclose(path.d_alpha(t), da, rtol=1e-12)
    assert torch.allclose(path.d_sigma(t), db, rtol=1e-12)


def test_linear_path_endpoints_and_prediction():
    path = make_path("linear")
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert path.alpha(ends).tolist() == [1.0, 0.0]
    assert path.sigma(ends).tolist() == [0.0, 1.0]
    assert path.prediction == "velocity" and (path.t_min, path.t_max) == (0.0, 1.0)
    vp = make_path("vp-linear")
    assert vp.prediction == "eps" and (vp.t_min, vp.t_max) == (1e-3, 1.0)


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_lambda_and_its_inverse(kind):
    path = make_path(kind)
    t = torch.cat([torch.logspace(-5, -1, 20, dtype=F64), torch.linspace(0.11, 0.999, 40, dtype=F64)])
    lam = path.lambda_(t)
    a, b, _, _ = coeffs(kind, t)
    assert torch.allclose(lam, torch.log(a / b), rtol=1e-9, atol=1e-9)
    assert bool((lam[1:] < lam[:-1]).all())  # decreasing in t
    assert torch.allclose(path.t_of_lambda(lam), t, rtol=1e-9, atol=1e-12)


def test_sample_t_range_and_determinism():
    vp = make_path("vp-linear", t_eps=0.01)
    t1 = vp.sample_t(4096, torch.Generator().manual_seed(3), "cpu")
    t2 = vp.sample_t(4096, torch.Generator().manual_seed(3), "cpu")
    assert t1.shape == (4096,) and t1.dtype == torch.float32 and torch.equal(t1, t2)
    assert t1.min() >= 0.01 and t1.max() <= 1.0 and t1.min() < 0.02 and t1.max() > 0.99
    lin = make_path("linear", t_eps_train=0.1)
    t3 = lin.sample_t(4096, torch.Generator().manual_seed(3))
    assert t3.min() >= 0.1 and t3.max() <= 0.9
    assert abs(make_path("linear").sample_t(20000, torch.Generator().manual_seed(0)).mean() - 0.5) < 0.01


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_interpolate_target_and_loss(kind):
    path = make_path(kind)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.rand(6, generator=g) * 0.98 + 0.01
    x_t, target = path.interpolate(x0, eps, t)
    a, b, _, _ = coeffs(kind, t)
    expect = a.float()[:, None, None, None] * x0 + b.float()[:, None, None, None] * eps
    assert torch.allclose(x_t, expect, atol=1e-6)
    assert torch.allclose(target, eps if kind == "vp-linear" else eps - x0, atol=1e-6)
    pred = target + torch.arange(6.0)[:, None, None, None] * 0.1
    loss = path.loss(pred, target)
    assert loss.shape == (6,)
    assert torch.allclose(loss, (torch.arange(6.0) * 0.1) ** 2, atol=1e-6)
    assert torch.allclose(path.loss(x0, eps), ((x0 - eps) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_conversions_recover_x0_eps_velocity_score(kind):
    path = make_path(kind)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(8, 2, 3, generator=g, dtype=F64)
    t = torch.rand(8, generator=g, dtype=F64) * 0.98 + 0.01
    x_t, target = path.interpolate(x0, eps, t)
    a, b, da, db = (c[:, None, None] for c in coeffs(kind, t))
    assert torch.allclose(path.to_x0(target, x_t, t), x0, atol=1e-9)
    assert torch.allclose(path.to_eps(target, x_t, t), eps, atol=1e-9)
    assert torch.allclose(path.velocity(target, x_t, t), da * x0 + db * eps, atol=1e-8)
    assert torch.allclose(path.score(target, x_t, t), -eps / b, atol=1e-8)
    # one scalar time for the whole batch gives the same as the per-sample vector
    ts = 0.37
    x_s, tgt_s = path.interpolate(x0, eps, torch.full((8,), ts, dtype=F64))
    for conv in (path.to_x0, path.to_eps, path.velocity, path.score):
        assert torch.allclose(conv(tgt_s, x_s, ts), conv(tgt_s, x_s, torch.full((8,), ts, dtype=F64)),
                              atol=1e-12)


@pytest.mark.parametrize("kind", ["vp-linear", "linear"])
def test_gaussian_model_conversions_give_posterior_means(kind):
    """The PF-ODE drift of the path is d_alpha x0_hat + d_sigma eps_hat of the posterior means."""
    path = make_path(kind)
    x = zs(64, seed=5) * 1.5
    t = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=F64) * 0.9 + 0.05
    pred = gauss_model(kind)(x, t)
    x0_hat, eps_hat, (a, b, da, db) = posterior(kind, x, t)
    assert torch.allclose(path.to_x0(pred, x, t), x0_hat, atol=1e-10)
    assert torch.allclose(path.to_eps(pred, x, t), eps_hat, atol=1e-10)
    assert torch.allclose(path.velocity(pred, x, t), da * x0_hat + db * eps_hat, atol=1e-9)
    assert torch.allclose(path.score(pred, x, t), -(x - a * M) / (a * a * SD * SD + b * b), atol=1e-9)


# ------------------------------------------------------------------------------------------
# time grids
# ------------------------------------------------------------------------------------------
def test_timesteps_uniform_and_logsnr():
    ts = S.timesteps(10, 1.0, 0.0)
    assert ts.shape == (11,) and ts.dtype == F64 and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.allclose(ts[:-1] - ts[1:], torch.full((10,), 0.1, dtype=F64))
    vp = make_path("vp-linear")
    tl = S.timesteps(25, 1.0, 1e-3, spacing="logsnr", path=vp)
    assert tl[0] == 1.0 and tl[-1] == 1e-3 and bool((tl[1:] < tl[:-1]).all())
    steps = vp.lambda_(tl).diff()
    assert torch.allclose(steps, steps.mean().expand(25), rtol=1e-9)
    lin = make_path("linear")
    tll = S.timesteps(8, 0.99, 0.01, spacing="logsnr", path=lin)
    assert torch.allclose(lin.lambda_(tll).diff(), lin.lambda_(tll).diff().mean().expand(8))
    with pytest.raises(SpecmatchError, match="lambda"):
        S.timesteps(8, 1.0, 0.01, spacing="logsnr", path=lin)  # lambda(1) = -inf
    with pytest.raises(SpecmatchError, match="spacing"):
        S.timesteps(8, spacing="cosine")
    with pytest.raises(SpecmatchError):
        S.timesteps(0)
    with pytest.raises(SpecmatchError):
        S.timesteps(5, t_max=0.5, t_min=0.6)


# ------------------------------------------------------------------------------------------
# probability-flow ODE samplers
# ------------------------------------------------------------------------------------------
def test_ode_samplers_linear_path_accuracy_and_order():
    path = make_path("linear")
    model = gauss_model("linear")
    z = zs(512)
    exact = M + SD * z  # x_1 = z (alpha(1) = 0, sigma(1) = 1)
    e_eul = {n: maxerr(S.euler_ode(model, z, path, n)[0], exact) for n in (50, 100, 200)}
    e_heun = {}
    for n in (25, 50, 100):
        x, nfe = S.heun_ode(model, z, path, n)
        assert nfe == 2 * n - 1  # the step that ends at t = 0 is Euler
        e_heun[n] = maxerr(x, exact)
    # measured: Heun 25/50/100 -> 6.3e-3 / 1.5e-3 / 3.7e-4 (max over 2048 entries, s up to 2;
    # dominated by the final Euler step to t = 0); Euler 50/100/200 -> 0.178 / 0.090 / 0.045.
    assert e_heun[50] < 2.5e-3
    assert 1.7 < e_eul[50] / e_eul[100] < 2.3 and 1.7 < e_eul[100] / e_eul[200] < 2.3
    assert 3.4 < e_heun[25] / e_heun[50] < 4.6 and 3.4 < e_heun[50] / e_heun[100] < 4.6
    # Euler's last step from t = h to 0 on the linear path is exactly the Tweedie denoiser.
    assert S.euler_ode(model, z, path, 50)[1] == 50


def test_ode_samplers_vp_path():
    path = make_path("vp-linear")
    model = gauss_model("vp-linear")
    z = zs(256)
    x_T = marginal("vp-linear", z, 1.0)
    exact = marginal("vp-linear", z, 1e-3)
    e50 = maxerr(S.heun_ode(model, x_T, path, 50, t_min=1e-3)[0], exact)
    e100 = maxerr(S.heun_ode(model, x_T, path, 100, t_min=1e-3)[0], exact)
    assert e100 < 1.5e-3 and 3.4 < e50 / e100 < 4.6  # measured 2.3e-3 / 5.7e-4 at 50 / 100
    x, nfe = S.heun_ode(model, x_T, path, 10, t_min=1e-3)
    assert nfe == 20  # t_min > 0: every step is a full Heun step
    eu = maxerr(S.euler_ode(model, x_T, path, 100, t_min=1e-3)[0], exact)
    assert eu < 0.08


# ------------------------------------------------------------------------------------------
# DPM-Solver++
# ------------------------------------------------------------------------------------------
def _dpm_err(steps, order, final_denoise=False, n=256):
    path = make_path("vp-linear")
    z = zs(n)
    x_T = marginal("vp-linear", z, 1.0)
    x, nfe = S.dpm_solver(gauss_model("vp-linear"), x_T, path, steps, order=order,
                          final_denoise=final_denoise)
    exact = marginal("vp-linear", z, 1e-3)
    if final_denoise:
        exact = posterior("vp-linear", exact, torch.full((n,), 1e-3, dtype=F64))[0]
    return maxerr(x, exact), nfe


def test_dpm_solver_2m_accuracy_and_nfe():
    e50, nfe = _dpm_err(50, 2)
    assert nfe == 50
    assert e50 < 0.02  # measured 0.0138 (values up to ~8)
    e50d, nfe_d = _dpm_err(50, 2, final_denoise=True)
    assert nfe_d == 51 and e50d < 0.02
    # second order: error ratio per halving of the step -> 4
    e20, _ = _dpm_err(20, 2)
    e40, _ = _dpm_err(40, 2)
    e80, _ = _dpm_err(80, 2)
    assert 3.2 < e20 / e40 < 4.5 and 3.6 < e40 / e80 < 4.4


def test_dpm_solver_orders_1_and_3():
    e1 = [_dpm_err(n, 1)[0] for n in (20, 40)]
    assert 1.8 < e1[0] / e1[1] < 2.2  # DDIM: first order
    e3 = [_dpm_err(n, 3)[0] for n in (20, 40)]
    e2_20 = _dpm_err(20, 2)[0]
    assert e3[0] < 0.3 * e2_20  # measured 0.0168 vs 0.080
    assert e3[0] / e3[1] > 8.0  # measured 16.6 (third order or better on this problem)


def test_dpm_solver_lower_order_final_and_few_steps():
    path = make_path("vp-linear")
    z = zs(64)
    x_T = marginal("vp-linear", z, 1.0)
    model = gauss_model("vp-linear")
    for steps in (1, 2, 3, 5):
        x, nfe = S.dpm_solver(model, x_T, path, steps, order=3, final_denoise=False)
        assert nfe == steps and torch.isfinite(x).all()
    # with steps < 10 the last step is first order: a 2-step order-2 run equals DDIM (order 1)
    a = S.dpm_solver(model, x_T, path, 2, order=2, final_denoise=False)[0]
    b = S.dpm_solver(model, x_T, path, 2, order=1, final_denoise=False)[0]
    assert torch.equal(a, b)
    c = S.dpm_solver(model, x_T, path, 2, order=2, final_denoise=False, lower_order_final=False)[0]
    assert not torch.equal(a, c)


# ------------------------------------------------------------------------------------------
# Euler-Maruyama
# ------------------------------------------------------------------------------------------
def _em_output_law(kind: str, t_min: float, last_step: str, w: float):
    """Mean and std of the output when x(t_min) follows the exact marginal N(a m, V): the last
    step is affine in x for Gaussian data."""
    a, b, da, db = coeffs(kind, torch.tensor(t_min, dtype=F64))
    var = a * a * SD * SD + b * b
    if last_step == "mean":
        # x - t_min (v - w/2 score), v = da x0_hat + db eps_hat, score = -(x - a m)/V
        slope = 1.0 - t_min * (da * a * SD * SD + db * b + 0.5 * w) / var
        mean = a * M - t_min * da * M
    else:
        slope = a * SD * SD / var
        mean = M
    return mean, slope.abs() * torch.sqrt(var)


@pytest.mark.parametrize("kind", ["linear", "vp-linear"])
def test_euler_maruyama_matches_data_distribution(kind):
    path = make_path(kind)
    n = 20000
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float32)
    x, nfe = S.euler_maruyama(gauss_model(kind), x_T, path, 250, generator=g)
    assert nfe == 250 and x.dtype == torch.float32
    t_min = path.sde_t_min
    w = S.diffusion_coefficient(path, t_min)
    mean, std = _em_output_law(kind, t_min, "mean", w)
    xm, xs = x.double().mean(0), x.double().std(0)
    se_mean = std / math.sqrt(n)
    se_std = std / math.sqrt(2 * n)
    # statistical tolerance: 4.5 standard errors (plus 0.5% of std for the time discretisation)
    assert bool(((xm - mean).abs() < 4.5 * se_mean + 0.005 * std).all()), (xm, mean)
    assert bool(((xs - std).abs() < 4.5 * se_std + 0.005 * std).all()), (xs, std)
    # ... and the data law itself, up to the known bias of stopping at t_min (< 1.5% of s here)
    assert bool(((xm - M).abs() < 0.03 * SD + 4.5 * se_mean).all())
    assert bool(((xs - SD).abs() < 0.02 * SD + 4.5 * se_std).all())


@pytest.mark.parametrize("kind", ["linear", "vp-linear"])
@pytest.mark.parametrize("last_step", ["mean", "tweedie"])
def test_euler_maruyama_steps_written_out(kind, last_step):
    """Three NFE: two stochastic steps on linspace(1, t_min, 3), then the deterministic step."""
    path = make_path(kind)
    model = gauss_model(kind)
    x_T = zs(16, seed=3)
    t_min = 0.05
    x, nfe = S.euler_maruyama(model, x_T, path, 3, generator=torch.Generator().manual_seed(7),
                              t_min=t_min, last_step=last_step)
    assert nfe == 3
    g = torch.Generator().manual_seed(7)
    y = x_T.clone()
    grid = [1.0, (1.0 + t_min) / 2, t_min]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        tt = torch.full((16,), t_cur, dtype=F64)
        x0_hat, eps_hat, (a, b, da, db) = posterior(kind, y, tt)
        w = 2.0 * b
        drift = da * x0_hat + db * eps_hat + 0.5 * w * eps_hat / b
        dt = t_next - t_cur
        y = y + dt * drift + torch.sqrt(w * abs(dt)) * torch.randn(y.shape, generator=g, dtype=F64)
    tt = torch.full((16,), t_min, dtype=F64)
    x0_hat, eps_hat, (a, b, da, db) = posterior(kind, y, tt)
    if last_step == "mean":
        y = y - t_min * (da * x0_hat + db * eps_hat + b * eps_hat / b)
    else:
        y = x0_hat
    assert torch.allclose(x, y, atol=1e-10)


def test_euler_maruyama_determinism_and_options():
    path = make_path("linear")
    model = gauss_model("linear")
    x_T = zs(32, seed=9)
    a = S.euler_maruyama(model, x_T, path, 20, generator=torch.Generator().manual_seed(1))[0]
    b = S.euler_maruyama(model, x_T, path, 20, generator=torch.Generator().manual_seed(1))[0]
    c = S.euler_maruyama(model, x_T, path, 20, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # REPA's diffusion on the linear path: w(t) = 2 t
    assert S.diffusion_coefficient(path, 0.3) == pytest.approx(0.6)
    # "sbdm" is the path's own forward-SDE g^2: beta(t) for VP, 2t/(1-t) for the linear path
    vp = make_path("vp-linear")
    assert S.diffusion_coefficient(vp, 0.3, "sbdm") == pytest.approx(BMIN + 0.3 * (BMAX - BMIN))
    assert S.diffusion_coefficient(path, 0.3, "sbdm") == pytest.approx(0.6 / 0.7)
    with pytest.raises(SpecmatchError, match="not finite"):
        S.euler_maruyama(model, x_T, path, 20, diffusion="sbdm")
    x, _ = S.euler_maruyama(model, x_T, path, 20, t_max=0.95, diffusion="sbdm",
                            generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    with pytest.raises(SpecmatchError, match="diffusion"):
        S.euler_maruyama(model, x_T, path, 20, diffusion="cosine")
    with pytest.raises(SpecmatchError, match="last_step"):
        S.euler_maruyama(model, x_T, path, 20, last_step="none")
    with pytest.raises(SpecmatchError):
        S.euler_maruyama(model, x_T, path, 1)


# ------------------------------------------------------------------------------------------
# dispatcher and errors
# ------------------------------------------------------------------------------------------
def test_sample_dispatcher_all_methods_both_paths():
    z = zs(8).float()
    for kind in ("linear", "vp-linear"):
        path = make_path(kind)
        model = gauss_model(kind)
        methods = ["euler", "heun", "euler-maruyama"] + (["dpm-solver"] if kind == "vp-linear" else [])
        for method in methods:
            kw = {"t_min": 1e-3} if (kind == "vp-linear" and method in ("euler", "heun")) else {}
            x, nfe = S.sample(method, model, z, path, 6, generator=torch.Generator().manual_seed(0), **kw)
            assert x.shape == z.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert nfe == {"euler": 6, "heun": 12 if kw else 11, "euler-maruyama": 6,
                           "dpm-solver": 7}[method]


def test_errors_are_clear():
    with pytest.raises(SpecmatchError, match="unknown diffusion path kind"):
        make_path("cosine")
    with pytest.raises(SpecmatchError, match="beta_min"):
        make_path("vp-linear", beta_min=20.0, beta_max=0.1)
    with pytest.raises(SpecmatchError, match="beta_min"):
        make_path("vp-linear", beta_min=5.0, beta_max=5.0)
    with pytest.raises(SpecmatchError, match="beta_min"):
        make_path("vp-linear", beta_min=-1.0)
    with pytest.raises(SpecmatchError, match="t_eps"):
        make_path("vp-linear", t_eps=0.0)
    with pytest.raises(SpecmatchError, match="unknown parameter"):
        make_path("linear", beta_min=0.1)
    with pytest.raises(SpecmatchError, match="t_eps_train"):
        make_path("linear", t_eps_train=0.7)
    assert isinstance(make_path("vp-linear", beta_max=10.0), VPLinear)
    assert isinstance(make_path("linear"), Linear)
    z = zs(4).float()
    lin = make_path("linear")
    with pytest.raises(SpecmatchError, match="unknown sampler"):
        S.sample("ddim", gauss_model("linear"), z, lin, 10)
    with pytest.raises(SpecmatchError, match="vp-linear"):
        S.sample("dpm-solver", gauss_model("linear"), z, lin, 10)
    with pytest.raises(SpecmatchError, match="vp-linear"):
        S.dpm_solver(gauss_model("linear"), z, lin, 10)
    with pytest.raises(SpecmatchError, match="unknown option"):
        S.sample("euler", gauss_model("linear"), z, lin, 10, order=2)
    with pytest.raises(SpecmatchError, match="order"):
        S.dpm_solver(gauss_model("vp-linear"), z, make_path("vp-linear"), 10, order=4)


# ------------------------------------------------------------------------------------------
# classifier-free guidance
# ------------------------------------------------------------------------------------------
NULL = 10


class MockModel:
    """model(x, t, y): a different affine map per label (the null label included); records the
    batch size of every call."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, x, t, y):
        self.calls.append(x.shape[0])
        if y is None:
            yf = torch.full((x.shape[0],), -1.0)
        else:
            yf = y.to(x.dtype)
        return x * (1.0 + 0.1 * yf)[:, None] + (t * (yf + 2.0))[:, None]


def _cond(x, t, y):
    return x * (1.0 + 0.1 * y.to(x.dtype))[:, None] + (t * (y.to(x.dtype) + 2.0))[:, None]


def test_guidance_scale_one_is_the_conditional_model_in_one_forward():
    m = MockModel()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 5)
    y = torch.tensor([0, 3, 1, 7, 2])
    out = S.guided(m, y, NULL, 1.0)(x, t)
    assert m.calls == [5] and torch.equal(out, _cond(x, t, y))
    m2 = MockModel()
    S.guided(m2, None, NULL, 4.0)(x, t)
    assert m2.calls == [5]


def test_guidance_inside_and_outside_the_interval():
    m = MockModel()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.8, 1.0])
    y = torch.tensor([0, 3, 1, 7, 2, 5])
    scale = 4.0
    out = S.guided(m, y, NULL, scale, interval=(0.0, 0.7))(x, t)
    assert m.calls == [12]  # one forward of the doubled batch
    cond = _cond(x, t, y)
    uncond = _cond(x, t, torch.full_like(y, NULL))
    expect = uncond + scale * (cond - uncond)
    inside = t <= 0.7
    assert torch.allclose(out[inside], expect[inside], atol=1e-6)
    assert torch.allclose(out[~inside], cond[~inside], atol=1e-6)
    assert not torch.allclose(expect[~inside], cond[~inside])
    # a batch entirely outside the interval: no unconditional half
    m2 = MockModel()
    t_out = torch.full((6,), 0.9)
    out2 = S.guided(m2, y, NULL, scale, interval=(0.0, 0.7))(x, t_out)
    assert m2.calls == [6] and torch.allclose(out2, _cond(x, t_out, y))
    with pytest.raises(SpecmatchError, match="interval"):
        S.guided(m, y, NULL, scale, interval=(0.8, 0.2))


def test_guided_model_drives_a_sampler():
    """A guided velocity model with scale w on the linear path equals the exact model of the
    guided velocity field (affine in the prediction), counted as one NFE per step."""
    path = make_path("linear")
    cond_m = gauss_model("linear", M, SD)
    unc_m = gauss_model("linear", torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    calls = []

    def net(x, t, y):
        calls.append(x.shape[0])
        is_null = (y == NULL)[:, None]
        return torch.where(is_null, unc_m(x, t), cond_m(x, t))

    z = zs(8)
    y = torch.zeros(8, dtype=torch.long)
    x, nfe = S.euler_ode(S.guided(net, y, NULL, 2.0, interval=(0.0, 0.5)), z, path, 10)
    ref, _ = S.euler_ode(lambda xx, tt: torch.where(
        (tt <= 0.5)[:, None], unc_m(xx, tt) + 2.0 * (cond_m(xx, tt) - unc_m(xx, tt)), cond_m(xx, tt)),
        z, path, 10)
    assert nfe == 10 and torch.allclose(x, ref, atol=1e-12)
    assert calls == [8] * 5 + [16] * 5  # t = 1.0 .. 0.6 outside, 0.5 .. 0.1 inside
