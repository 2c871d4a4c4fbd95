"""Generative processes of the latent diffusion models (docs/method.md §6), kept apart from the
networks and from the samplers.

Both processes are Gaussian paths on t in [0, 1] with **t = 0 the data and t = 1 the noise**:

    x_t = alpha(t) * x0 + sigma(t) * eps,        eps ~ N(0, I)

- :class:`VPLinear`: the continuous variance-preserving process with a linear
  beta(t) = beta_min + t (beta_max - beta_min); log alpha(t) = -t^2 (beta_max - beta_min)/4 -
  t beta_min/2, sigma = sqrt(1 - alpha^2). The network predicts eps (U-ViT on CelebA-HQ).
- :class:`Linear`: the linear interpolant x_t = (1 - t) x0 + t eps of SiT; the network
  predicts the velocity v = dx_t/dt = eps - x0 (SiT on ImageNet).

A model, for the samplers, is any callable ``model_fn(x[B, ...], t[B]) -> prediction[B, ...]``
returning the path's prediction (``path.prediction``: ``"eps"`` or ``"velocity"``).

Conversions (``to_x0``, ``to_eps``, ``velocity``, ``score``) turn a prediction at (x_t, t) into the
posterior means x0_hat = E[x0 | x_t] and eps_hat = E[eps | x_t]; they are affine in the
prediction, so classifier-free guidance may be applied to any of them with the same result.
They satisfy x_t = alpha x0_hat + sigma eps_hat exactly.

Probability-flow ODE. For any Gaussian path, the velocity field

    v(x, t) = d_alpha(t) * x0_hat(x, t) + d_sigma(t) * eps_hat(x, t)   (= E[dx_t/dt | x_t = x])

transports the marginals p_t exactly (it is the marginal velocity of the conditional flow
x0, eps -> alpha x0 + sigma eps), so ``dx/dt = path.velocity(pred, x, t)`` is *the*
probability-flow ODE of either path. For VP it equals the familiar f(t) x - g(t)^2/2 * score
(f = d log alpha/dt = -beta/2, g^2 = d sigma^2/dt - 2 f sigma^2 = beta), only written with the
posterior means, which needs no special case per path. The score is -eps_hat / sigma(t).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import torch

from specmatch.errors import SpecmatchError

Prediction = Literal["eps", "velocity"]

__all__ = ["Path", "VPLinear", "Linear", "make_path", "PATH_KINDS"]


def _bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient ([B] or 0-dim) in ``like``'s dtype, broadcastable against it."""
    c = c.to(device=like.device, dtype=like.dtype)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (like.ndim - 1)))


def _float(t: torch.Tensor | float) -> torch.Tensor:
    """``t`` as a floating tensor; a Python number becomes float64 (no rounding of the time)."""
    if not torch.is_tensor(t):
        return torch.tensor(float(t), dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class Path:
    """A Gaussian path x_t = alpha(t) x0 + sigma(t) eps, t = 0 data, t = 1 noise.

    Subclasses define ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma`` (time derivatives) on tensors
    of t, the ``prediction`` the network is trained on, the training range [t_min, t_max] of
    ``sample_t`` and ``sde_t_min``, the default time at which the SDE sampler stops before its
    final deterministic step to t = 0.
    """

    name: str = "path"
    prediction: Prediction = "eps"
    t_min: float = 0.0
    t_max: float = 1.0
    sde_t_min: float = 0.04

    # --- schedule --------------------------------------------------------------------------
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR lambda(t) = log(alpha / sigma), decreasing in t."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`lambda_`."""
        raise NotImplementedError

    # --- training --------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Training times t ~ U[t_min, t_max], shape [n], float32 on ``device``.

        Drawn on the generator's own device (so a CPU generator serves a CUDA run), then moved.
        """
        gen_device = generator.device if generator is not None else device
        u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
        t = self.t_min + (self.t_max - self.t_min) * u
        return t.to(device) if device is not None else t

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target): the noisy sample and the prediction target (eps, or the velocity
        d_alpha x0 + d_sigma eps)."""
        a, s, da, ds = self._coeffs(x0, t)
        x_t = a * x0 + s * eps
        target = eps if self.prediction == "eps" else da * x0 + ds * eps
        return x_t, target

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE, averaged over all non-batch dimensions: shape [B]."""
        return (pred - target).square().flatten(1).mean(dim=1)

    # --- conversions -----------------------------------------------------------------------
    def _coeffs(self, x_t: torch.Tensor, t: torch.Tensor | float) -> tuple:
        """alpha, sigma, d_alpha, d_sigma at t, ready to multiply x_t.

        ``t`` is [B] (one time per sample: coefficients computed in at least float32, shaped
        [B, 1, ...], in x_t's dtype) or a scalar (one time for the whole batch: a Python float
        or a 0-dim CPU tensor; coefficients computed in float64 and returned as Python floats,
        which is cheaper and keeps the samplers' time grid exact).
        """
        fns = (self.alpha, self.sigma, self.d_alpha, self.d_sigma)
        t = _float(t)
        if t.ndim == 0 and t.device.type == "cpu":
            t = t.to(torch.float64)
            return tuple(float(c(t)) for c in fns)
        t = t.to(x_t.device)
        t = t.to(torch.promote_types(torch.promote_types(t.dtype, x_t.dtype), torch.float32))
        return tuple(_bcast(c(t), x_t) for c in fns)

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0_hat from the prediction at (x_t, t)."""
        a, s, da, ds = self._coeffs(x_t, t)
        if self.prediction == "eps":
            return (x_t - s * pred) / a
        # v = da x0 + ds eps and x_t = a x0 + s eps, solved for x0.
        return (ds * x_t - s * pred) / (a * ds - s * da)

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat from the prediction at (x_t, t)."""
        if self.prediction == "eps":
            return pred
        a, s, da, ds = self._coeffs(x_t, t)
        return (a * pred - da * x_t) / (a * ds - s * da)

    def velocity(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Drift of the probability-flow ODE dx/dt = d_alpha x0_hat + d_sigma eps_hat."""
        if self.prediction == "velocity":
            return pred
        _, _, da, ds = self._coeffs(x_t, t)
        return da * self.to_x0(pred, x_t, t) + ds * pred

    def score(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x_t) = -eps_hat / sigma(t)."""
        return -self.to_eps(pred, x_t, t) / self._coeffs(x_t, t)[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class VPLinear(Path):
    """Continuous VP path with linear beta(t) = beta_min + t (beta_max - beta_min), eps prediction.

    alpha(t) = exp(-0.5 * int_0^t beta) = exp(-t^2 (beta_max - beta_min)/4 - t beta_min/2),
    sigma = sqrt(1 - alpha^2) (computed with expm1, accurate at small t). Training times are
    U[t_eps, 1]; sigma(0) = 0 so conversions are undefined at t = 0 and the samplers stop at
    t_eps or later.
    """

    name = "vp-linear"
    prediction: Prediction = "eps"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_eps: float = 1e-3):
        for key, val in (("beta_min", beta_min), ("beta_max", beta_max), ("t_eps", t_eps)):
            if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
                raise SpecmatchError(f"path vp-linear: {key} must be a finite number, got {val!r}")
        if beta_min < 0 or beta_max <= beta_min:
            raise SpecmatchError(
                f"path vp-linear: need 0 <= beta_min < beta_max, got beta_min={beta_min}, "
                f"beta_max={beta_max}")
        if not 0.0 < t_eps < 1.0:
            raise SpecmatchError(f"path vp-linear: t_eps must lie in (0, 1), got {t_eps}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self.t_eps = float(t_eps)
        self.t_min = self.t_eps
        self.t_max = 1.0
        self.sde_t_min = self.t_eps

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + _float(t) * (self.beta_max - self.beta_min)

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        t = _float(t)
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        # d/dt sqrt(1 - alpha^2) = -alpha d_alpha / sigma = beta alpha^2 / (2 sigma)
        t = _float(t)
        return 0.5 * self.beta(t) * torch.exp(2.0 * self.log_alpha(t)) / self.sigma(t)

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """Closed-form inverse of lambda: with L = -2 log alpha = softplus(-2 lambda), solve
        (beta_max - beta_min)/2 t^2 + beta_min t - L = 0 for its positive root, written as
        2L / (sqrt(beta_min^2 + 2 (beta_max - beta_min) L) + beta_min) (no cancellation)."""
        lam = _float(lam)
        big_l = torch.nn.functional.softplus(-2.0 * lam)
        db = self.beta_max - self.beta_min
        return 2.0 * big_l / (torch.sqrt(self.beta_min ** 2 + 2.0 * db * big_l) + self.beta_min)

    def __repr__(self) -> str:
        return f"VPLinear(beta_min={self.beta_min}, beta_max={self.beta_max}, t_eps={self.t_eps})"


class Linear(Path):
    """Linear interpolant x_t = (1 - t) x0 + t eps (SiT), velocity prediction v = eps - x0.

    Training times are U[t_eps_train, 1 - t_eps_train] (SiT trains on U[0, 1]: t_eps_train = 0).
    The SDE sampler stops at ``sde_t_min`` = 0.04 (SiT's / REPA's last-step size) before its final
    deterministic step.
    """

    name = "linear"
    prediction: Prediction = "velocity"

    def __init__(self, t_eps_train: float = 0.0):
        if (not isinstance(t_eps_train, (int, float)) or isinstance(t_eps_train, bool)
                or not 0.0 <= t_eps_train < 0.5):
            raise SpecmatchError(
                f"path linear: t_eps_train must be a number in [0, 0.5), got {t_eps_train!r}")
        self.t_eps_train = float(t_eps_train)
        self.t_min = self.t_eps_train
        self.t_max = 1.0 - self.t_eps_train
        self.sde_t_min = 0.04

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - _float(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return _float(t).clone()

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(_float(t), -1.0)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(_float(t), 1.0)

    def t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """lambda = log((1 - t)/t)  <=>  t = sigmoid(-lambda)."""
        return torch.sigmoid(-_float(lam))

    # Closed forms of the general 2x2 solve (its determinant is 1 here).
    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - self._coeffs(x_t, t)[1] * pred

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t + self._coeffs(x_t, t)[0] * pred

    def __repr__(self) -> str:
        return f"Linear(t_eps_train={self.t_eps_train})"


PATH_KINDS = {"vp-linear": VPLinear, "linear": Linear}


def make_path(kind: str, **params) -> Path:
    """The path named ``kind`` ("vp-linear" | "linear") built with ``params``; a SpecmatchError
    names an unknown kind, an unknown parameter or a bad value."""
    if kind not in PATH_KINDS:
        raise SpecmatchError(
            f"unknown diffusion path kind {kind!r}; expected one of {sorted(PATH_KINDS)}")
    cls = PATH_KINDS[kind]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SpecmatchError(
            f"path {kind}: unknown parameter(s) {unknown}; expected a subset of {allowed}")
    return cls(**params)


def from_params(process: dict[str, Any]) -> Path:
    """The path of a run's validated `process` parameters (as recorded in its diffusion.json)."""
    kind = process["kind"]
    if kind == "vp-linear":
        return make_path(kind, beta_min=process["beta_min"], beta_max=process["beta_max"], t_eps=process["t_eps"])
    return make_path(kind)
