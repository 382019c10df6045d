"""Synthetic targets with an exact log-density, in any dimension.

A target is named by a spec string ``kind:key=value,...``:

* ``gmm:d=8,k=5,seed=0``: an equal-weight mixture of ``k`` Gaussians in R^d whose
  means (N(0, 2² I)) and covariances (Q diag(s²) Qᵀ, Q a random rotation,
  s ~ U(0.5, 1.5)) are drawn from ``np.random.default_rng(seed)``;
* ``banana:d=8,b=0.25``: x₁ ~ N(0, 2²) and x_i = y_i + b (x₁² − 4), y_i ~ N(0, 1)
  for i ≥ 2, a map of unit Jacobian, so
  log p(x) = log N(x₁; 0, 2²) + Σ_{i≥2} log N(x_i − b (x₁² − 4); 0, 1);
* ``powerlaw:d=7,k=4,seed=0``: real-looking tabular data (:class:`PowerLaw`): a
  long-tailed latent column, ``k − 1`` columns that are noisy power laws of it
  (strongly correlated, thin curved ridges) and ``d − k`` long-tailed noise columns;

and the 2-D toys whose density is closed-form: ``checkerboard`` (uniform, 1/32, on
the eight squares of side 2 of [-4, 4]² with ⌊x₁/2⌋ + ⌊x₂/2⌋ even) and
``8gaussians`` (equal-weight mixture of N(c_j/1.414, (0.5/1.414)² I)). Each target
draws exactly what :func:`jkoflow.datasets.load` gives for the same name, n and seed.

numpy only; every array is float64 of shape (n, d), log-densities of shape (n,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import InputError
from .toys import EIGHT_GAUSSIANS_CENTRES, EIGHT_GAUSSIANS_DIVISOR, EIGHT_GAUSSIANS_STD, toy

__all__ = [
    "TARGET_KINDS",
    "Banana",
    "Checkerboard",
    "EightGaussians",
    "GaussianMixture",
    "PowerLaw",
    "Target",
    "is_target",
    "parse_spec",
    "target",
]

LOG_2PI = math.log(2.0 * math.pi)


class Target(Protocol):
    """A density with exact samples and log-density.

    ``sample(n, seed)`` returns (n, dim) float64 rows; ``log_prob(x)`` takes
    (n, dim) and returns (n,) nats. :func:`target` builds one from a name.

    Example:
        >>> from jkoflow.datasets import target
        >>> t = target("banana:d=3")
        >>> t.dim, t.sample(5, seed=0).shape
        (3, (5, 3))
    """

    dim: int

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray: ...

    def log_prob(self, x: np.ndarray) -> np.ndarray: ...


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _rows(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise InputError(f"points have shape {tuple(x.shape)}; expected (n, {dim})")
    return x


def _student_t_log_prob(x: np.ndarray, nu: float) -> np.ndarray:
    """log of Student's t density with ``nu`` degrees of freedom (unit scale), elementwise."""
    const = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    return const - 0.5 * (nu + 1) * np.log1p(x**2 / nu)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = a.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(a - top).sum(axis=axis))


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture Σ_j w_j N(μ_j, Σ_j); ``means`` (k, d), ``chols`` (k, d, d) lower
    Cholesky factors of Σ_j, ``weights`` (k,) summing to 1.

    Example:
        >>> import numpy as np
        >>> from jkoflow.datasets.targets import GaussianMixture
        >>> one = GaussianMixture(np.zeros((1, 2)), np.eye(2)[None], np.ones(1))  # N(0, I)
        >>> bool(np.isclose(one.log_prob(np.zeros((1, 2)))[0], -np.log(2 * np.pi)))
        True
    """

    means: np.ndarray
    chols: np.ndarray
    weights: np.ndarray

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def random(cls, d: int, k: int, seed: int) -> GaussianMixture:
        """Seeded means N(0, 2² I) and covariances Q diag(s²) Qᵀ, s ~ U(0.5, 1.5)."""
        rng = np.random.default_rng(seed)
        means = 2.0 * rng.standard_normal((k, d))
        chols = np.empty((k, d, d))
        for j in range(k):
            q, r = np.linalg.qr(rng.standard_normal((d, d)))
            q = q * np.sign(np.diag(r))  # a uniformly random rotation
            s = rng.uniform(0.5, 1.5, size=d)
            chols[j] = np.linalg.cholesky((q * s**2) @ q.T)
        return cls(means, chols, np.full(k, 1.0 / k))

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        rng = _rng(seed)
        idx = rng.choice(len(self.weights), size=n, p=self.weights)
        eps = rng.standard_normal((n, self.dim))
        return self.means[idx] + np.einsum("nij,nj->ni", self.chols[idx], eps)

    def joint_log_probs(self, x: np.ndarray) -> np.ndarray:
        """log(w_j N(x; μ_j, Σ_j)) for x (n, d): (n, k); their logsumexp over j is
        :meth:`log_prob`, their softmax the components' posterior."""
        x = _rows(x, self.dim)
        d = self.dim
        parts = []
        for mean, chol, w in zip(self.means, self.chols, self.weights, strict=True):
            y = np.linalg.solve(chol, (x - mean).T)  # L⁻¹(x − μ), (d, n)
            log_det = np.log(np.diag(chol)).sum()
            parts.append(math.log(w) - 0.5 * (y**2).sum(axis=0) - log_det - 0.5 * d * LOG_2PI)
        return np.stack(parts, axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return _logsumexp(self.joint_log_probs(x), axis=1)


@dataclass(frozen=True)
class Banana:
    """x₁ ~ N(0, s²), x_i = y_i + b (x₁² − s²), y_i ~ N(0, 1) (i ≥ 2); unit Jacobian.

    The warp y ↦ x has unit Jacobian determinant, so log p(x) is the Gaussian
    log-density of (x₁, x_i − b(x₁² − s²)).

    Example:
        >>> import numpy as np
        >>> from jkoflow.datasets.targets import Banana
        >>> x = Banana(dim=2).sample(100_000, seed=0)
        >>> bool(abs(x[:, 0].std() - 2.0) < 0.02)
        True
    """

    dim: int
    b: float = 0.25
    s: float = 2.0

    def _warp(self, x1: np.ndarray) -> np.ndarray:
        return self.b * (x1**2 - self.s**2)

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        y = _rng(seed).standard_normal((n, self.dim))
        y[:, 0] *= self.s
        y[:, 1:] += self._warp(y[:, :1])
        return y

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x, self.dim)
        y = x[:, 1:] - self._warp(x[:, :1])
        first = -0.5 * (x[:, 0] / self.s) ** 2 - math.log(self.s)
        return first - 0.5 * (y**2).sum(axis=1) - 0.5 * self.dim * LOG_2PI


@dataclass(frozen=True)
class PowerLaw:
    """Tabular-like data with an exact density: one latent variable drives ``k`` columns.

    Column 1 is the latent a ~ t_ν₀ (Student's t, ν₀ = 4: long tails). Columns
    i = 2..k are noisy power laws of it, x_i = c_i·sign(a)|a|^{p_i} + σ_i ε_i with
    ε_i ~ N(0, 1), so they are strongly correlated and lie near thin curved
    ridges (the structure of sensor columns in real tabular sets). Columns
    k+1..d are independent long-tailed noise, x_j = s_j·t_{ν_j}. The parameters
    (``exponents`` p, ``scales`` c, ``noise`` σ for the ridge columns;
    ``tail_scales`` s and ``tail_dofs`` ν for the noise columns) are drawn from
    the spec's seed by :meth:`random`. The density factorises along the
    construction:

        log p(x) = log t_ν₀(x₁) + Σ_{i=2..k} log N(x_i; c_i·sign(x₁)|x₁|^{p_i}, σ_i²)
                   + Σ_{j>k} [log t_{ν_j}(x_j / s_j) − log s_j].

    Example:
        >>> import numpy as np
        >>> from jkoflow.datasets.targets import PowerLaw
        >>> target = PowerLaw.random(d=7, k=4, seed=0)  # the ``powerlaw:d=7,k=4,seed=0`` data
        >>> target.dim, target.sample(5, seed=1).shape
        (7, (5, 7))
        >>> p, c, sigma, s, nu = ([v] for v in (1.0, 2.0, 0.5, 1.0, 5.0))
        >>> one = PowerLaw(np.array(p), np.array(c), np.array(sigma), np.array(s), np.array(nu))
        >>> # log t_4(1) + log N(2; 2·1, 0.5²) + log t_5(0)
        >>> one.log_prob(np.array([[1.0, 2.0, 0.0]])).round(6)
        array([-2.733099])
    """

    exponents: np.ndarray
    scales: np.ndarray
    noise: np.ndarray
    tail_scales: np.ndarray
    tail_dofs: np.ndarray
    latent_dof: float = 4.0

    @property
    def dim(self) -> int:
        return 1 + len(self.exponents) + len(self.tail_scales)

    @classmethod
    def random(cls, d: int, k: int, seed: int) -> PowerLaw:
        """p_i ~ U(0.6, 1.6), c_i ~ U(0.5, 2), σ_i = c_i·U(0.05, 0.2); s_j ~ U(0.5, 2), ν_j ~ U(4, 10)."""
        rng = np.random.default_rng(seed)
        ridges = k - 1
        scales = rng.uniform(0.5, 2.0, ridges)
        return cls(
            exponents=rng.uniform(0.6, 1.6, ridges),
            scales=scales,
            noise=scales * rng.uniform(0.05, 0.2, ridges),
            tail_scales=rng.uniform(0.5, 2.0, d - k),
            tail_dofs=rng.uniform(4.0, 10.0, d - k),
        )

    def _ridges(self, a: np.ndarray) -> np.ndarray:
        """c_i·sign(a)|a|^{p_i} for a (n,): (n, k − 1)."""
        return self.scales * np.sign(a)[:, None] * np.abs(a)[:, None] ** self.exponents

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        rng = _rng(seed)
        a = rng.standard_t(self.latent_dof, n)
        ridges = self._ridges(a) + self.noise * rng.standard_normal((n, len(self.noise)))
        tails = self.tail_scales * rng.standard_t(self.tail_dofs, (n, len(self.tail_dofs)))
        return np.concatenate([a[:, None], ridges, tails], axis=1)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x, self.dim)
        k = 1 + len(self.exponents)
        a = x[:, 0]
        out = _student_t_log_prob(a, self.latent_dof)
        resid = (x[:, 1:k] - self._ridges(a)) / self.noise
        out = out - 0.5 * (resid**2).sum(1) - np.log(self.noise).sum() - 0.5 * (k - 1) * LOG_2PI
        for j, (s, nu) in enumerate(zip(self.tail_scales, self.tail_dofs, strict=True)):
            out = out + _student_t_log_prob(x[:, k + j] / s, float(nu)) - math.log(s)
        return out


@dataclass(frozen=True)
class Checkerboard:
    """The ``checkerboard`` toy: density 1/32 where ⌊x₁/2⌋ + ⌊x₂/2⌋ is even in [-4, 4)², else 0.

    Example:
        >>> import numpy as np
        >>> from jkoflow.datasets.targets import Checkerboard
        >>> np.exp(Checkerboard().log_prob(np.array([[0.5, 0.5], [2.5, 0.5]])))
        array([0.03125, 0.     ])
    """

    dim: int = 2

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        return toy("checkerboard", n, seed)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        x = _rows(x, 2)
        cell = np.floor(x / 2.0)
        inside = ((x >= -4.0) & (x < 4.0)).all(axis=1) & (cell.sum(axis=1) % 2 == 0)
        return np.where(inside, -math.log(32.0), -np.inf)


def _eight_gaussians_mixture() -> GaussianMixture:
    std = EIGHT_GAUSSIANS_STD / EIGHT_GAUSSIANS_DIVISOR
    chols = np.broadcast_to(std * np.eye(2), (8, 2, 2)).copy()
    return GaussianMixture(EIGHT_GAUSSIANS_CENTRES / EIGHT_GAUSSIANS_DIVISOR, chols, np.full(8, 1.0 / 8))


@dataclass(frozen=True)
class EightGaussians:
    """The ``8gaussians`` toy: its generator's mixture Σ_j ⅛ N(c_j/1.414, (0.5/1.414)² I).

    Example:
        >>> from jkoflow.datasets.targets import EightGaussians
        >>> t = EightGaussians()
        >>> t.sample(3, seed=0).shape, t.log_prob(t.sample(3, seed=0)).shape
        ((3, 2), (3,))
    """

    dim: int = 2
    mixture: GaussianMixture = field(default_factory=_eight_gaussians_mixture)

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        return toy("8gaussians", n, seed)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        return self.mixture.log_prob(x)


# spec kind -> its keys and their defaults
TARGET_KINDS: dict[str, dict[str, float]] = {
    "gmm": {"d": 2, "k": 5, "seed": 0},
    "banana": {"d": 2, "b": 0.25},
    "powerlaw": {"d": 7, "k": 4, "seed": 0},
}
_TOY_TARGETS = ("checkerboard", "8gaussians")


def is_target(name: object) -> bool:
    """Whether ``name`` names a target with a known density (a spec or a closed-form toy)."""
    return isinstance(name, str) and (name in _TOY_TARGETS or name.split(":", 1)[0] in TARGET_KINDS)


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"gmm:d=8,k=5"`` -> ``("gmm", {"d": 8, "k": 5, "seed": 0})`` (defaults filled in, validated)."""
    kind, _, rest = spec.partition(":")
    if kind not in TARGET_KINDS:
        raise InputError(f"unknown target {spec!r}: expected one of {', '.join(TARGET_KINDS)}")
    values = dict(TARGET_KINDS[kind])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        if not eq or key.strip() not in values:
            raise InputError(
                f"bad item {item!r} in {spec!r}: expected key=value with key in {', '.join(values)}"
            )
        key = key.strip()
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"bad value {text!r} for {key} in {spec!r}: expected a number") from None
        if key in ("d", "k", "seed"):
            minimum = 0 if key == "seed" else 1
            if not value.is_integer() or value < minimum:
                raise InputError(f"{key}={text} in {spec!r}: expected an integer ≥ {minimum}")
            value = int(value)
        elif not math.isfinite(value):
            raise InputError(f"{key}={text} in {spec!r}: expected a finite number")
        values[key] = value
    if kind == "banana" and values["d"] < 2:
        raise InputError(f"{spec!r}: a banana needs d ≥ 2")
    if kind == "powerlaw" and not 2 <= values["k"] <= values["d"]:
        raise InputError(f"{spec!r}: a powerlaw target needs 2 ≤ k ≤ d")
    return kind, values


def target(name: str) -> Target:
    """The target named ``name``: a spec (``gmm:...``, ``banana:...``) or a closed-form toy.

    Example:
        >>> t = target("gmm:d=3,k=2,seed=1")
        >>> x = t.sample(4, seed=0)
        >>> x.shape, t.log_prob(x).shape
        ((4, 3), (4,))
    """
    if name == "checkerboard":
        return Checkerboard()
    if name == "8gaussians":
        return EightGaussians()
    kind, values = parse_spec(name)
    if kind == "gmm":
        return GaussianMixture.random(int(values["d"]), int(values["k"]), int(values["seed"]))
    if kind == "powerlaw":
        return PowerLaw.random(int(values["d"]), int(values["k"]), int(values["seed"]))
    return Banana(int(values["d"]), float(values["b"]))
