"""Samplers for the paths of :mod:`specmatch.diffusion.transport` (docs/method.md §6), and
classifier-free guidance.

Time runs from t = 1 (noise) down to t = 0 (data). A model is any callable
``model_fn(x[B, ...], t[B]) -> prediction`` in the path's parameterisation (``path.prediction``);
:func:`guided` turns a conditional network ``model(x, t, y)`` into one.

Every sampler runs under ``torch.no_grad``, computes in the dtype of ``x_T`` (time grids are
built in float64, then used as Python floats), has no per-sample Python loop, and returns
``(x, nfe)``: the sample and the number of calls to ``model_fn`` (one call = one NFE, whatever
the batch; a guided call doubles the batch inside one call).

- :func:`dpm_solver`: multistep DPM-Solver++ (Lu et al. 2022, data prediction, "2M" by default,
  orders 1-3) in the lambda = log(alpha/sigma) domain, for the VP path. Steps uniform in
  lambda ("logsnr") by default, from t_max = 1 to t_min = 1e-3; warm-up with lower orders;
  with ``lower_order_final`` the last steps drop to lower order when steps < 10 (as the
  reference implementation). ``final_denoise`` returns the x0 prediction at t_min (one more NFE:
  steps + 1 in all) instead of x at t_min (steps NFE). Orders 1 and 2 are the reference's
  updates; order 3 doubles the reference's second-difference term, which is only half the
  Taylor coefficient there (see :func:`dpm_solver`).
- :func:`euler_ode`, :func:`heun_ode`: the probability-flow ODE dx/dt = path.velocity(pred, x, t)
  on a uniform grid from t_max = 1 to t_min = 0. Heun never evaluates the model at t = 0: a step
  that ends at t = 0 is a plain Euler step (as REPA's sampler, and EDM's), so
  NFE = 2 steps - 1 when t_min = 0, else 2 steps. The error is still second order.
- :func:`euler_maruyama`: the reverse-time SDE with the marginals of the path,
  dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW (dt < 0), whose marginals match p_t for any
  w >= 0. Default w(t) = 2 sigma(t) (SiT's default ``diffusion_form="sigma"``, norm 1; for the
  linear path this is REPA's ``2 t``); ``diffusion="sbdm"`` uses g(t)^2 of the forward SDE,
  2 (sigma d_sigma - sigma^2 d_alpha / alpha) (beta(t) for VP; 2t/(1-t) for the linear path,
  infinite at t = 1, so refused there). As SiT/REPA: ``steps`` NFE in all, steps - 1
  stochastic steps on linspace(t_max, t_min, steps), then one deterministic last step from
  t_min to 0: ``last_step="mean"`` (default, SiT's "Mean" / REPA) is the Euler step of the SDE
  drift without noise; ``"tweedie"`` returns x0_hat at t_min instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from specmatch.diffusion.transport import Path, VPLinear
from specmatch.errors import SpecmatchError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "guided", "timesteps", "dpm_solver", "euler_ode", "heun_ode", "euler_maruyama", "sample",
    "SAMPLERS", "diffusion_coefficient",
]


# ---------------------------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------------------------
def guided(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
           y: torch.Tensor | None, null_label: int, scale: float,
           interval: tuple[float, float] = (0.0, 1.0)) -> ModelFn:
    """``model_fn(x, t)`` of a class-conditional ``model(x, t, y)`` with classifier-free guidance.

    pred = uncond + scale * (cond - uncond) for the samples whose t lies in
    [interval[0], interval[1]] (inclusive), the conditional prediction alone elsewhere.
    With ``scale == 1`` or ``y is None`` it is the plain ``model(x, t, y)``, one forward of the
    batch. Otherwise the conditional and unconditional halves (labels ``y`` and ``null_label``)
    run in one forward of a doubled batch; a batch with no sample in the interval runs only the
    conditional half.
    """
    lo, hi = (float(v) for v in interval)
    if not lo <= hi:
        raise SpecmatchError(f"guidance interval must satisfy low <= high, got {interval}")
    scale = float(scale)
    if y is None or scale == 1.0:
        def plain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, y)
        return plain

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= lo) & (t <= hi)
        if not bool(inside.any()):
            return model(x, t, y)
        y_null = torch.full_like(y, null_label)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out.chunk(2)
        guided_pred = uncond + scale * (cond - uncond)
        if bool(inside.all()):
            return guided_pred
        mask = inside.reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(mask, guided_pred, cond)

    return fn


# ---------------------------------------------------------------------------------------------
# time grids
# ---------------------------------------------------------------------------------------------
def _check_steps(steps: int, minimum: int = 1) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise SpecmatchError(f"sampler steps must be an integer >= {minimum}, got {steps!r}")
    return steps


def timesteps(n_steps: int, t_max: float = 1.0, t_min: float = 1e-3, spacing: str = "uniform",
              path: Path | None = None) -> torch.Tensor:
    """``n_steps + 1`` times, float64, descending from ``t_max`` to ``t_min`` (both exact).

    ``spacing``: "uniform" in t, or "logsnr": uniform in lambda = log(alpha/sigma) of ``path``
    (needs a path, and finite lambda at both ends: t_min > 0, and t_max < 1 for the linear
    path).
    """
    _check_steps(n_steps)
    t_max, t_min = float(t_max), float(t_min)
    if not 0.0 <= t_min < t_max <= 1.0:
        raise SpecmatchError(f"sampler times must satisfy 0 <= t_min < t_max <= 1, got "
                             f"t_min={t_min}, t_max={t_max}")
    if spacing == "uniform":
        ts = torch.linspace(t_max, t_min, n_steps + 1, dtype=torch.float64)
    elif spacing == "logsnr":
        if path is None:
            raise SpecmatchError("timesteps: spacing 'logsnr' needs the path")
        ends = path.lambda_(torch.tensor([t_max, t_min], dtype=torch.float64))
        if not bool(torch.isfinite(ends).all()):
            raise SpecmatchError(f"timesteps: lambda is not finite on [{t_min}, {t_max}] for "
                                 f"{path!r}; pick t_min > 0 (and t_max < 1 for the linear path)")
        lam = torch.linspace(float(ends[0]), float(ends[1]), n_steps + 1, dtype=torch.float64)
        ts = path.t_of_lambda(lam).to(torch.float64)
    else:
        raise SpecmatchError(
            f"unknown timestep spacing {spacing!r}; expected 'uniform' or 'logsnr'")
    ts[0], ts[-1] = t_max, t_min
    return ts


def _tvec(t: float, x: torch.Tensor) -> torch.Tensor:
    """The model's time input: t for every sample, [B] in x's dtype and device. (The path's
    conversions get the Python float: one float64 coefficient for the whole batch.)"""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def _coef(fn: Callable[[torch.Tensor], torch.Tensor], t: float) -> float:
    """A schedule coefficient at a scalar time, evaluated in float64."""
    return float(fn(torch.tensor(t, dtype=torch.float64)))


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def dpm_solver(model_fn: ModelFn, x_T: torch.Tensor, path: VPLinear, steps: int = 50,
               order: int = 2, t_min: float = 1e-3, t_max: float = 1.0, spacing: str = "logsnr",
               final_denoise: bool = True,
               lower_order_final: bool = True) -> tuple[torch.Tensor, int]:
    """Multistep DPM-Solver++ of ``order`` 1, 2 or 3 from ``x_T`` at ``t_max`` to ``t_min``.

    With x0_i the data prediction at t_i, h = lambda_i - lambda_{i-1} and
    phi1 = expm1(-h), the update from t_{i-1} to t_i is
      order 1 (DDIM):  x = sigma_i/sigma_{i-1} x - alpha_i phi1 x0_{i-1}
      order 2:         ... - 0.5 alpha_i phi1 D1,  D1 = (x0_{i-1} - x0_{i-2}) h / h_{i-1}
      order 3:         ... + alpha_i phi2 D1' - alpha_i phi3 D2, phi2 = phi1/h + 1,
                       phi3 = phi2/h - 1/2, with D1' ~ h x0' and D2 ~ h^2 x0'' the divided
                       differences over the last three data predictions (lambda derivatives).
    The exact step is alpha_i (-phi1 x0 + phi2 h x0' - phi3 h^2 x0'' + ...). The reference
    code's 3M sets D2 = (D1_0 - D1_1)/(r0 + r1) ~ h^2 x0'' / 2, half of that term, which makes
    its 3M only second order (measured: error ratio -> 4 per halving of h even with exact
    warm-up); here D2 carries the factor 2 (error ratio ~ 8-16 with exact warm-up). Orders 1 and
    2 are the reference's 1M (DDIM) and 2M ("dpmsolver" solver type) updates unchanged.
    Step i uses order min(order, i) (warm-up) and, with ``lower_order_final`` and steps < 10,
    min(order, steps + 1 - i). Returns (x0 prediction at t_min if ``final_denoise`` else x at
    t_min, NFE).
    """
    if not isinstance(path, VPLinear):
        raise SpecmatchError(f"sampler 'dpm-solver' needs the vp-linear path (an eps-prediction VP "
                             f"process), got {path!r}; use 'euler', 'heun' or 'euler-maruyama'")
    if order not in (1, 2, 3):
        raise SpecmatchError(f"dpm-solver order must be 1, 2 or 3, got {order!r}")
    _check_steps(steps)
    if t_min <= 0.0:
        raise SpecmatchError(f"dpm-solver needs t_min > 0 (sigma(0) = 0), got {t_min}")
    ts = timesteps(steps, t_max=t_max, t_min=t_min, spacing=spacing, path=path)
    tl = ts.tolist()
    lam = path.lambda_(ts).tolist()
    alpha = path.alpha(ts).tolist()
    sigma = path.sigma(ts).tolist()

    nfe = 0

    def data_pred(x: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return path.to_x0(model_fn(x, _tvec(tl[i], x)), x, tl[i])

    x = x_T
    x0s = [data_pred(x, 0)]  # the last (up to 3) data predictions, oldest first
    for i in range(1, steps + 1):
        step_order = min(order, i)
        if lower_order_final and steps < 10:
            step_order = min(step_order, steps + 1 - i)
        h = lam[i] - lam[i - 1]
        phi1 = math.expm1(-h)
        x = (sigma[i] / sigma[i - 1]) * x - (alpha[i] * phi1) * x0s[-1]
        if step_order >= 2:
            r0 = (lam[i - 1] - lam[i - 2]) / h
            d1_0 = (x0s[-1] - x0s[-2]) / r0
            if step_order == 2:
                x = x - (0.5 * alpha[i] * phi1) * d1_0
            else:
                r1 = (lam[i - 2] - lam[i - 3]) / h
                d1_1 = (x0s[-2] - x0s[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0'' (see the docstring)
                phi2 = phi1 / h + 1.0
                phi3 = phi2 / h - 0.5
                x = x + (alpha[i] * phi2) * d1 - (alpha[i] * phi3) * d2
        if i < steps or final_denoise:
            x0s = (x0s + [data_pred(x, i)])[-3:]
    return (x0s[-1] if final_denoise else x), nfe


# ---------------------------------------------------------------------------------------------
# probability-flow ODE
# ---------------------------------------------------------------------------------------------
def _velocity_fn(model_fn: ModelFn, path: Path):
    def vel(x: torch.Tensor, t: float) -> torch.Tensor:
        return path.velocity(model_fn(x, _tvec(t, x)), x, t)
    return vel


@torch.no_grad()
def euler_ode(model_fn: ModelFn, x_T: torch.Tensor, path: Path, steps: int = 50,
              t_min: float = 0.0, t_max: float = 1.0,
              spacing: str = "uniform") -> tuple[torch.Tensor, int]:
    """Euler on the probability-flow ODE from t_max to t_min: ``steps`` NFE."""
    ts = timesteps(steps, t_max=t_max, t_min=t_min, spacing=spacing, path=path).tolist()
    vel = _velocity_fn(model_fn, path)
    x = x_T
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * vel(x, t_cur)
    return x, steps


@torch.no_grad()
def heun_ode(model_fn: ModelFn, x_T: torch.Tensor, path: Path, steps: int = 50,
             t_min: float = 0.0, t_max: float = 1.0,
             spacing: str = "uniform") -> tuple[torch.Tensor, int]:
    """Heun (explicit trapezoid) on the probability-flow ODE from t_max to t_min. A step ending
    at t = 0 is an Euler step (the model is never evaluated at t = 0)."""
    ts = timesteps(steps, t_max=t_max, t_min=t_min, spacing=spacing, path=path).tolist()
    vel = _velocity_fn(model_fn, path)
    x, nfe = x_T, 0
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        d_cur = vel(x, t_cur)
        nfe += 1
        x_pred = x + dt * d_cur
        if t_next == 0.0:
            x = x_pred
        else:
            d_next = vel(x_pred, t_next)
            nfe += 1
            x = x + (0.5 * dt) * (d_cur + d_next)
    return x, nfe


# ---------------------------------------------------------------------------------------------
# reverse-time SDE
# ---------------------------------------------------------------------------------------------
DIFFUSIONS = ("sigma", "sbdm")


def diffusion_coefficient(path: Path, t: float, diffusion: str = "sigma",
                          norm: float = 1.0) -> float:
    """w(t) of the reverse SDE dx = [v - w/2 score] dt + sqrt(w) dW, at a scalar t.

    "sigma": w = 2 norm sigma(t) (SiT's default form; REPA's 2t on the linear path).
    "sbdm": w = norm g(t)^2 = 2 norm (sigma d_sigma - sigma^2 d_alpha/alpha), the diffusion of the
    path's own forward SDE (beta(t) for VP).
    """
    if diffusion == "sigma":
        return 2.0 * norm * _coef(path.sigma, t)
    if diffusion == "sbdm":
        a, s = _coef(path.alpha, t), _coef(path.sigma, t)
        da, ds = _coef(path.d_alpha, t), _coef(path.d_sigma, t)
        if a == 0.0:
            return math.inf
        return 2.0 * norm * (s * ds - s * s * da / a)
    raise SpecmatchError(f"unknown SDE diffusion {diffusion!r}; expected one of {list(DIFFUSIONS)}")


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from ``generator`` on its own device."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return z.to(x.device)


@torch.no_grad()
def euler_maruyama(model_fn: ModelFn, x_T: torch.Tensor, path: Path, steps: int = 250,
                   generator: torch.Generator | None = None, t_min: float | None = None,
                   t_max: float = 1.0, diffusion: str = "sigma", diffusion_norm: float = 1.0,
                   last_step: str = "mean") -> tuple[torch.Tensor, int]:
    """Euler-Maruyama on the reverse SDE dx = [v - w/2 score] dt + sqrt(w) dW from t_max.

    ``steps`` NFE: steps - 1 stochastic steps on linspace(t_max, t_min, steps) (t_min defaults to
    ``path.sde_t_min``: 0.04 for the linear path as SiT/REPA, t_eps = 1e-3 for VP), then one
    deterministic step from t_min to 0: "mean" = x + (0 - t_min) (v - w/2 score) (SiT's "Mean" last
    step, REPA), or "tweedie" = x0_hat(x, t_min).
    """
    _check_steps(steps, minimum=2)
    if diffusion not in DIFFUSIONS:
        raise SpecmatchError(
            f"unknown SDE diffusion {diffusion!r}; expected one of {list(DIFFUSIONS)}")
    if last_step not in ("mean", "tweedie"):
        raise SpecmatchError(f"unknown SDE last_step {last_step!r}; expected 'mean' or 'tweedie'")
    t_min = path.sde_t_min if t_min is None else float(t_min)
    if t_min <= 0.0:
        raise SpecmatchError(
            f"euler-maruyama needs t_min > 0 (the score is -eps/sigma), got {t_min}")
    ts = timesteps(steps - 1, t_max=t_max, t_min=t_min, spacing="uniform").tolist()
    ws = [diffusion_coefficient(path, t, diffusion, diffusion_norm) for t in ts]
    if not all(math.isfinite(w) and w >= 0.0 for w in ws):
        raise SpecmatchError(f"SDE diffusion {diffusion!r} is not finite on [{t_min}, {t_max}] for "
                             f"{path!r} (the linear path's 'sbdm' diverges at t = 1); pick "
                             f"t_max < 1 or diffusion 'sigma'")

    def drift(x: torch.Tensor, t: float, w: float) -> tuple[torch.Tensor, torch.Tensor]:
        pred = model_fn(x, _tvec(t, x))
        d = path.velocity(pred, x, t) - (0.5 * w) * path.score(pred, x, t)
        return d, pred

    x = x_T
    for t_cur, t_next, w in zip(ts[:-1], ts[1:], ws[:-1]):
        dt = t_next - t_cur
        d, _ = drift(x, t_cur, w)
        x = x + dt * d + math.sqrt(w * abs(dt)) * _randn(x, generator)
    # final deterministic step t_min -> 0
    d, pred = drift(x, t_min, ws[-1])
    if last_step == "mean":
        x = x - t_min * d
    else:
        x = path.to_x0(pred, x, t_min)
    return x, steps


# ---------------------------------------------------------------------------------------------
# dispatcher
# ---------------------------------------------------------------------------------------------
SAMPLERS: dict[str, Callable[..., tuple[torch.Tensor, int]]] = {
    "dpm-solver": dpm_solver,
    "euler": euler_ode,
    "heun": heun_ode,
    "euler-maruyama": euler_maruyama,
}


def check(method: str, path: Path) -> None:
    """A SpecmatchError unless sampler `method` exists and fits `path`."""
    if method not in SAMPLERS:
        raise SpecmatchError(f"unknown sampler {method!r}; expected one of {sorted(SAMPLERS)}")
    if method == "dpm-solver" and not isinstance(path, VPLinear):
        raise SpecmatchError(f"sampler 'dpm-solver' needs the vp-linear path, got {path!r}; use "
                             f"'euler', 'heun' or 'euler-maruyama'")


def sample(method: str, model_fn: ModelFn, x_T: torch.Tensor, path: Path, steps: int,
           generator: torch.Generator | None = None, **kw) -> tuple[torch.Tensor, int]:
    """Run sampler ``method`` ("dpm-solver" | "euler" | "heun" | "euler-maruyama"); returns
    (x0, nfe). ``generator`` feeds the SDE noise (ignored by the deterministic samplers);
    ``kw`` are the sampler's own options."""
    check(method, path)
    fn = SAMPLERS[method]
    allowed = set(inspect.signature(fn).parameters) - {"model_fn", "x_T", "path", "steps",
                                                       "generator"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise SpecmatchError(f"sampler {method!r}: unknown option(s) {unknown}; expected a "
                             f"subset of {sorted(allowed)}")
    if method == "euler-maruyama":
        kw["generator"] = generator
    return fn(model_fn, x_T, path, steps=steps, **kw)
