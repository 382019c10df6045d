r"""Divergence of a vector field by automatic differentiation, for block types
without a closed-form trace.

Both functions take the output ``v = f(z)`` (n, d) of a field evaluated on
``z`` (n, d) with ``z.requires_grad`` set, and assume row i of ``v`` depends
only on row i of ``z`` (no batch coupling such as batch norm).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["divergence_exact", "divergence_hutchinson"]


def divergence_exact(v: Tensor, z: Tensor, create_graph: bool = False) -> Tensor:
    r"""The exact divergence :math:`\nabla_z \cdot v = \sum_i \partial v_i / \partial z_i`.

    One vector–Jacobian product per dimension, batched into a single call
    (``is_grads_batched``): the cost is about d backward passes.

    Arguments:
        v: Field values, shape (n, d), computed from ``z`` in the current graph.
        z: Inputs, shape (n, d), with ``requires_grad``.
        create_graph: Keep the graph of the result (needed to train on it).

    Returns:
        The divergence, shape (n,).

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> v = z * torch.tensor([1.0, 2.0, 3.0])
        >>> divergence_exact(v, z)
        tensor([6., 6., 6., 6.])

    References:
        | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        | (Grathwohl et al., 2019)
        | https://arxiv.org/abs/1810.01367
    """
    _check(v, z)
    n, d = z.shape
    basis = torch.eye(d, dtype=v.dtype, device=v.device).unsqueeze(1).expand(d, n, d)
    (rows,) = torch.autograd.grad(v, z, basis, create_graph=create_graph, is_grads_batched=True)
    return rows.diagonal(dim1=0, dim2=2).sum(-1)  # rows[i, :, i] = ∂v_i/∂z_i


def divergence_hutchinson(
    v: Tensor, z: Tensor, noise: Tensor | None = None, create_graph: bool = False
) -> Tensor:
    r"""Hutchinson's unbiased estimate :math:`\varepsilon^\top (\partial v/\partial z)\, \varepsilon`
    of the divergence, averaged over the probes ε (Rademacher by default).

    One vector–Jacobian product per probe. The estimate is for training only;
    reported likelihoods always use an exact divergence.

    Arguments:
        v: Field values, shape (n, d), computed from ``z``.
        z: Inputs, shape (n, d), with ``requires_grad``.
        noise: Probes, shape (n, d) or (p, n, d) for p probes with
            E[εεᵀ] = I; by default one Rademacher probe.
        create_graph: Keep the graph of the result.

    Returns:
        The estimate, shape (n,).

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> divergence_hutchinson(2.0 * z, z)  # exact for a multiple of the identity
        tensor([6., 6., 6., 6.])

    References:
        | A Stochastic Estimator of the Trace of the Influence Matrix for Laplacian
        | Smoothing Splines (Hutchinson, 1989)
        | https://doi.org/10.1080/03610918908812806

        | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        | (Grathwohl et al., 2019)
        | https://arxiv.org/abs/1810.01367
    """
    _check(v, z)
    if noise is None:
        noise = torch.randint(0, 2, v.shape, device=v.device).to(v.dtype).mul_(2).sub_(1)
    if noise.shape[-2:] != v.shape or noise.dim() not in (2, 3):
        raise ValueError(f"noise must have shape (n, d) or (p, n, d) with (n, d) = {tuple(v.shape)}")
    probes = noise if noise.dim() == 3 else noise.unsqueeze(0)
    (vjp,) = torch.autograd.grad(v, z, probes, create_graph=create_graph, is_grads_batched=True)
    return (vjp * probes).sum(-1).mean(0)


def _check(v: Tensor, z: Tensor) -> None:
    if z.dim() != 2 or v.shape != z.shape:
        raise ValueError(f"v and z must both have shape (n, d); got {tuple(v.shape)} and {tuple(z.shape)}")
    if not z.requires_grad:
        raise ValueError("z must require grad: compute v from z.requires_grad_(True)")
