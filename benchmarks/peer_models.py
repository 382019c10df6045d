r"""The peer density estimators of the ``peers`` benchmark and their exact log-likelihoods.

Every peer is a :class:`Peer`: how to build its model, its training loss on a
mini-batch, its optimiser settings, and ``log p(x)`` of a batch, at the solver
setting it reports or at the tighter one of its check (a discrete flow's
log-density is exact and has none). The
peers fit *standardised* data u = (x − m)/s (training mean and standard
deviation, as zuko's NSF docstring recommends: its splines act on [−5, 5]);
the benchmark adds −Σ log s to report the NLL in data units.

Settings, each from the peer's own documentation or paper:

* ``nsf`` — zuko's neural spline flow, ``zuko.flows.NSF(d)`` at zuko's
  defaults: 3 rational-quadratic spline transforms, 8 bins, hidden layers
  64×64 (ReLU); in d = 2 each autoregressive transform (orders [0, 1] and
  [1, 0] in turn) is a coupling layer plus an element-wise spline of the
  conditioning coordinate. Adam lr 1e-3 as in zuko's README and examples; batch
  512 (the reference configuration of the issue). Durkan et al., "Neural
  Spline Flows", https://arxiv.org/abs/1906.04032; zuko 1.x docs.
* ``cnf`` — zuko's continuous normalizing flow, ``zuko.flows.CNF(d)`` at
  zuko's defaults: exact trace (``exact=True``, the Jacobian by batched
  autograd), 3 time-embedding frequencies, hidden 64×64 (ELU), adaptive
  Dormand–Prince with atol 1e-6, rtol 1e-5 and adaptive-checkpoint adjoint
  gradients; maximum likelihood training, Adam lr 1e-3, batch 512 (as NSF).
  Grathwohl et al., "FFJORD", https://arxiv.org/abs/1810.01367.
* ``icfm`` / ``otcfm`` — torchcfm's ``ConditionalFlowMatcher`` and
  ``ExactOptimalTransportConditionalFlowMatcher`` with σ = 0.1, the velocity
  field ``torchcfm.models.models.MLP(d, time_varying=True)`` (3 hidden layers
  of width 64, SELU), Adam lr 1e-3 (torch's default, as the examples
  use), batch 256, source N(0, I): the settings of torchcfm's 2-D examples
  (README, ``examples/2D_tutorials``). Tong et al., "Improving and
  generalizing flow-based generative models with minibatch optimal
  transport", https://arxiv.org/abs/2302.00482.

Exact likelihood of the ODE peers: the instantaneous change of variables
d log p(x_t)/dt = −∇·v(x_t, t), with the divergence computed exactly by
autograd (d is small), never estimated.

* zuko CNF: zuko's own ``log_prob`` (exact trace, adaptive Dormand–Prince at
  its training tolerances atol 1e-6, rtol 1e-5); check = the NLL change when
  both tolerances are made 10× tighter.
* I-CFM, OT-CFM (noise at t = 0, data at t = 1): the state (x, a) with
  da/dt = ∇·v is integrated backwards from t = 1, a(1) = 0, to t = 0, and
  log p(x) = log N(x(0); 0, I) + a(0), by torchdiffeq's fixed-grid ``rk4``
  (3/8 rule) with :data:`CFM_STEPS` steps; check = the NLL change when the
  steps are doubled. Not adaptive: torchcfm's SELU network has a kinked
  divergence, on which dopri5 at atol 1e-6, rtol 1e-5 takes ~1700
  evaluations per solve on a trained I-CFM (checkerboard) and ~7700 at 10×
  tighter tolerances, for NLLs that agree with 64 RK4 steps to 3e-5 nats.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "CFM_STEPS",
    "EVAL_TOL",
    "PEERS",
    "TIGHT_TOL",
    "Peer",
    "cfm_log_prob",
    "exact_divergence",
    "missing_packages",
]

EVAL_TOL = (1e-6, 1e-5)
"""(atol, rtol) of zuko's CNF, in training and for its reported NLL: zuko's defaults."""

TIGHT_TOL = (1e-7, 1e-6)
"""(atol, rtol) 10× tighter, for the tolerance check of the CNF's NLL."""

CFM_STEPS = 64
"""RK4 steps over [0, 1] of a flow-matching peer's reported NLL (the check doubles them)."""


@dataclass(frozen=True)
class Peer:
    """A peer method: ``build(d)`` makes its model, ``loss(model, u)`` is its
    training loss on a standardised mini-batch u (n, d), ``log_prob(model, u,
    check)`` is log p(u) (n,), at the reported solver setting or, with
    ``check``, the tighter one that ``check_kind`` names (an exact discrete
    flow has no solver: ``check_kind`` None); ``packages`` are the imports it needs."""

    name: str
    label: str
    packages: tuple[str, ...]
    batch_size: int
    lr: float
    check_kind: str | None
    build: Callable[[int], nn.Module]
    loss: Callable[[nn.Module, Tensor], Tensor]
    log_prob: Callable[[nn.Module, Tensor, bool], Tensor]


def missing_packages(peers: list[Peer]) -> list[str]:
    """The packages that ``peers`` need and this environment lacks."""
    needed = dict.fromkeys(p for peer in peers for p in peer.packages)
    return [p for p in needed if importlib.util.find_spec(p) is None]


def _gaussian_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.pow(2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """∇·v = Σ_i ∂v_i/∂x_i (n,) of v (n, d) computed from x (n, d), one
    autograd pass per dimension (exact; d passes)."""
    div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(x.shape[1]):
        div = div + torch.autograd.grad(v[:, i].sum(), x, retain_graph=i + 1 < x.shape[1])[0][:, i]
    return div


def cfm_log_prob(velocity: nn.Module, u: Tensor, steps: int = CFM_STEPS) -> Tensor:
    """log p(u) (n,) of the flow-matching ODE du/dt = velocity([u, t]) from
    N(0, I) at t = 0 to the data at t = 1, by integrating (u, a) backwards
    with da/dt = ∇·v exact (:func:`exact_divergence`), ``steps`` RK4 steps."""
    from torchdiffeq import odeint

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            v = velocity(torch.cat([x, t.expand(len(x), 1)], -1))
            div = exact_divergence(v, x)
        return v.detach(), div.detach()

    times = torch.linspace(1.0, 0.0, steps + 1, dtype=u.dtype, device=u.device)
    start = (u, torch.zeros(len(u), dtype=u.dtype, device=u.device))
    x0, a0 = odeint(rhs, start, times, method="rk4")
    return _gaussian_log_prob(x0[-1]) + a0[-1]


def _cfm_peer_log_prob(velocity: nn.Module, u: Tensor, check: bool) -> Tensor:
    return cfm_log_prob(velocity, u, 2 * CFM_STEPS if check else CFM_STEPS)


def _zuko_log_prob(flow: nn.Module, u: Tensor, check: bool) -> Tensor:
    """zuko's log p(u); with ``check`` a CNF's tolerances are :data:`TIGHT_TOL` for the call."""
    transform = flow.transform
    if not check or not hasattr(transform, "atol"):
        return flow().log_prob(u)
    saved = transform.atol, transform.rtol
    transform.atol, transform.rtol = TIGHT_TOL
    try:
        return flow().log_prob(u)
    finally:
        transform.atol, transform.rtol = saved


def _zuko_loss(flow: nn.Module, u: Tensor) -> Tensor:
    return -flow().log_prob(u).mean()


def _nsf(dim: int) -> nn.Module:
    import zuko

    return zuko.flows.NSF(dim, transforms=3, bins=8, hidden_features=(64, 64))


def _cnf(dim: int) -> nn.Module:
    import zuko

    return zuko.flows.CNF(
        dim, freqs=3, atol=EVAL_TOL[0], rtol=EVAL_TOL[1], exact=True, hidden_features=(64, 64)
    )


def _velocity(dim: int) -> nn.Module:
    from torchcfm.models.models import MLP

    return MLP(dim=dim, w=64, time_varying=True)


CFM_SIGMA = 0.1
"""σ of torchcfm's 2-D examples for I-CFM and OT-CFM."""


def _cfm_loss(matcher_name: str) -> Callable[[nn.Module, Tensor], Tensor]:
    """The conditional flow-matching regression loss E‖v(x_t, t) − u_t‖² with
    torchcfm's matcher ``matcher_name`` (σ = :data:`CFM_SIGMA`), noise x0 ~ N(0, I)."""

    def loss(velocity: nn.Module, u: Tensor) -> Tensor:
        import torchcfm

        matcher = getattr(torchcfm, matcher_name)(sigma=CFM_SIGMA)
        t, xt, ut = matcher.sample_location_and_conditional_flow(torch.randn_like(u), u)
        vt = velocity(torch.cat([xt, t[:, None].to(u)], -1))
        return (vt - ut).pow(2).mean()

    return loss


PEERS: dict[str, Peer] = {
    "nsf": Peer("nsf", "zuko NSF", ("zuko",), 512, 1e-3, None, _nsf, _zuko_loss, _zuko_log_prob),
    "cnf": Peer(
        "cnf",
        "zuko CNF",
        ("zuko",),
        512,
        1e-3,
        f"dopri5 tol {EVAL_TOL[0]:g}/{EVAL_TOL[1]:g}→{TIGHT_TOL[0]:g}/{TIGHT_TOL[1]:g}",
        _cnf,
        _zuko_loss,
        _zuko_log_prob,
    ),
    "icfm": Peer(
        "icfm",
        "torchcfm I-CFM",
        ("torchcfm",),
        256,
        1e-3,
        f"RK4 {CFM_STEPS}→{2 * CFM_STEPS} steps",
        _velocity,
        _cfm_loss("ConditionalFlowMatcher"),
        _cfm_peer_log_prob,
    ),
    "otcfm": Peer(
        "otcfm",
        "torchcfm OT-CFM",
        ("torchcfm",),
        256,
        1e-3,
        f"RK4 {CFM_STEPS}→{2 * CFM_STEPS} steps",
        _velocity,
        _cfm_loss("ExactOptimalTransportConditionalFlowMatcher"),
        _cfm_peer_log_prob,
    ),
}
"""The peers by name."""
