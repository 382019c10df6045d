"""The eight standard 2-D toy densities.

Each generator has the signature ``(n, rng) -> ndarray`` and returns exactly ``n``
rows of shape ``(n, 2)``, dtype float64, drawing only from the
:class:`numpy.random.Generator` it is given (never the global ``np.random`` state).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np

from ..errors import InputError

__all__ = ["TOYS", "toy"]

ToyFn = Callable[[int, np.random.Generator], np.ndarray]


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 "black" squares of a 4x4 board of side 2 on [-4, 4]^2 (area 32)."""
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2_ = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n)
    x2 = x2_ + np.mod(np.floor(x1), 2.0)
    return 2.0 * np.stack([x1, x2], axis=1)


_S = 1.0 / math.sqrt(2.0)
EIGHT_GAUSSIANS_CENTRES = 4.0 * np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1), (_S, _S), (_S, -_S), (-_S, _S), (-_S, -_S)], dtype=np.float64
)
EIGHT_GAUSSIANS_STD = 0.5
EIGHT_GAUSSIANS_DIVISOR = 1.414


def _8gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    """Mixture of 8 Gaussians (std 0.5/1.414) on a circle of radius 4/1.414:
    (0.5 ε + c_j)/1.414 with j uniform over ``EIGHT_GAUSSIANS_CENTRES``."""
    centers = EIGHT_GAUSSIANS_CENTRES
    idx = rng.integers(0, len(centers), size=n)
    points = EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2)) + centers[idx]
    return points / EIGHT_GAUSSIANS_DIVISOR


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaving half circles (as sklearn ``make_moons``, noise 0.1), scaled by 2, shifted."""
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0.0, math.pi, n_out)
    t_in = np.linspace(0.0, math.pi, n_in)
    outer = np.stack([np.cos(t_out), np.sin(t_out)], axis=1)
    inner = np.stack([1.0 - np.cos(t_in), 1.0 - np.sin(t_in) - 0.5], axis=1)
    x = np.concatenate([outer, inner], axis=0)
    x = x[rng.permutation(n)]
    x = x + 0.1 * rng.standard_normal((n, 2))
    return x * 2.0 + np.array([-1.0, -0.2])


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    """Four concentric circles of radii 3, 2.4, 1.65, 0.75 with N(0, 0.08^2) noise."""
    radii = (1.0, 0.8, 0.55, 0.25)
    sizes = [n // 4] * 4
    sizes[0] = n - 3 * (n // 4)
    parts = []
    for r, m in zip(radii, sizes, strict=True):
        theta = np.linspace(0.0, 2.0 * math.pi, m, endpoint=False)
        parts.append(r * np.stack([np.cos(theta), np.sin(theta)], axis=1))
    x = 3.0 * np.concatenate(parts, axis=0)
    x = x[rng.permutation(n)]
    return x + 0.08 * rng.standard_normal((n, 2))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    """Five curved arms (radial std 0.3, tangential std 0.1, rate 0.25), scaled by 2."""
    radial_std, tangential_std, num_arms, rate = 0.3, 0.1, 5, 0.25
    base_angles = np.linspace(0.0, 2.0 * math.pi, num_arms, endpoint=False)
    features = rng.standard_normal((n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = rng.permutation(np.arange(n) % num_arms)
    angles = base_angles[labels] + rate * np.exp(features[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    x = np.stack([c * features[:, 0] - s * features[:, 1], s * features[:, 0] + c * features[:, 1]], axis=1)
    return 2.0 * x


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Swiss roll: t = 1.5*pi*(1 + 2U), (t cos t, t sin t) + N(0, I), divided by 5."""
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.uniform(size=n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    x = x + rng.standard_normal((n, 2))
    return x / 5.0


def _2spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two interleaved spirals (the second is the negation of the first), plus 0.1*N(0, I)."""
    m = n - n // 2
    r = np.sqrt(rng.uniform(size=m)) * 540.0 * (2.0 * math.pi) / 360.0
    d1x = -np.cos(r) * r + 0.5 * rng.uniform(size=m)
    d1y = np.sin(r) * r + 0.5 * rng.uniform(size=m)
    first = np.stack([d1x, d1y], axis=1)
    x = np.concatenate([first, -first[: n // 2]], axis=0) / 3.0
    x = x[rng.permutation(n)]
    return x + 0.1 * rng.standard_normal((n, 2))


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Two concentric circles (as sklearn ``make_circles``, factor 0.5, noise 0.08), times 3."""
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0.0, 2.0 * math.pi, n_out, endpoint=False)
    t_in = np.linspace(0.0, 2.0 * math.pi, n_in, endpoint=False)
    outer = np.stack([np.cos(t_out), np.sin(t_out)], axis=1)
    inner = 0.5 * np.stack([np.cos(t_in), np.sin(t_in)], axis=1)
    x = np.concatenate([outer, inner], axis=0)
    x = x[rng.permutation(n)]
    x = x + 0.08 * rng.standard_normal((n, 2))
    return 3.0 * x


TOYS: dict[str, ToyFn] = {
    "checkerboard": _checkerboard,
    "8gaussians": _8gaussians,
    "moons": _moons,
    "rings": _rings,
    "pinwheel": _pinwheel,
    "swissroll": _swissroll,
    "2spirals": _2spirals,
    "circles": _circles,
}


def toy(name: str, n: int, seed_or_rng: int | np.random.Generator = 0) -> np.ndarray:
    """Draw ``n`` samples of the toy density ``name``; returns float64 of shape (n, 2).

    ``seed_or_rng`` is a non-negative int seed (for ``np.random.default_rng``) or a Generator.
    """
    if not isinstance(name, str) or name not in TOYS:
        raise InputError(f"unknown toy {name!r}: expected one of {', '.join(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"invalid n={n!r}: expected a positive integer (number of samples)")
    if isinstance(seed_or_rng, np.random.Generator):
        rng = seed_or_rng
    elif isinstance(seed_or_rng, numbers.Integral) and not isinstance(seed_or_rng, bool) and seed_or_rng >= 0:
        rng = np.random.default_rng(int(seed_or_rng))
    else:
        raise InputError(
            f"invalid seed={seed_or_rng!r}: expected a non-negative integer or a numpy.random.Generator"
        )
    x = TOYS[name](int(n), rng)
    return np.ascontiguousarray(x, dtype=np.float64)
