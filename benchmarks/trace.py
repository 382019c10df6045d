r"""(a) Cost per sample of the OT-Flow velocity and its divergence, three ways.

* ``closed``: :class:`blocks.OTFlowBlock` (∇Φ and tr ∇²Φ in closed form).
* ``autograd``: v = −∇Φ by autograd (``create_graph``), then the exact
  divergence by :func:`blocks.divergence_exact` (d VJPs in one
  ``is_grads_batched`` call, no Python loop over dimensions).
* ``hutch``: the same v, one Rademacher probe of :func:`blocks.divergence_hutchinson`.

``fwd`` computes (v, div v); ``fwd+bwd`` also back-propagates the scalar
training-shaped loss mean(½‖v‖² − div v) to the block parameters.

FLOPs of the closed form: its dominant work is one (n·d × m)·(m × m) GEMM per
ResNet layer (the Jacobian update K_i J_{i−1}, ``_JacobianLayer``), i.e.
2·M·m²·d per sample forward; the backward of each is two GEMMs of the same size
(∂J and ∂K), so fwd+bwd counts 3× that. Every other product (pre-activations,
the gradient recursion, the first layer) is O(m² + m·d) per sample, smaller by
a factor ~d. The reference rate is ``torch.mm`` of the same (n·d × m)·(m × m)
shape, measured right before each row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import blocks
from blocks import divergence_exact, divergence_hutchinson

from .common import Column, Table, gemm, interleaved_medians

Method = Callable[[bool], tuple[torch.Tensor, torch.Tensor]]
"""(v, div) of a block on the benchmark's batch; the flag keeps the graph for a backward."""

__all__ = ["SIZES", "run"]

SIZES = {
    "full": {"dims": (2, 8, 43, 63), "widths": (64, 256), "batch": 2000, "repeats": 3},
    "quick": {"dims": (2, 43), "widths": (64, 256), "batch": 500, "repeats": 2},
    "smoke": {"dims": (2, 3), "widths": (8,), "batch": 16, "repeats": 1},
}

COLUMNS = [
    Column("d", "d"),
    Column("m", "m"),
    Column("pass", "pass"),
    Column("closed_us", "closed µs/sample", ".2f"),
    Column("closed_gflops", "closed GFLOP/s", ".1f"),
    Column("gemm_gflops", "GEMM GFLOP/s", ".1f"),
    Column("closed_of_gemm", "closed / GEMM", ".0%"),
    Column("autograd_us", "autograd exact µs/sample", ".2f"),
    Column("autograd_ratio", "autograd / closed", ".2f"),
    Column("hutch_us", "Hutchinson µs/sample", ".2f"),
    Column("hutch_ratio", "Hutchinson / closed", ".2f"),
    Column("hutch_rel_err", "Hutchinson rel. err", ".2f"),
    Column("closed_vs_autograd", "closed vs autograd", ".1e"),
]


def _block(dim: int, width: int, depth: int, dtype: torch.dtype, seed: int) -> blocks.OTFlowBlock:
    """An OT-Flow block with every parameter moved off its (near-trivial) initial value."""
    torch.manual_seed(seed)
    block = blocks.make("otflow", dim=dim, width=width, depth=depth).to(dtype)
    with torch.no_grad():
        block.w.normal_(0.0, 1.0)
        block.linear.normal_(0.0, 0.1)
    return block


def _autograd_field(
    block: blocks.OTFlowBlock, z: torch.Tensor, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(block.potential(z, t).sum(), z, create_graph=True)
    return z, -grad


def _methods(block: blocks.OTFlowBlock, z: torch.Tensor, noise: torch.Tensor, t: float) -> dict[str, Method]:
    """The three ways to get (v, div v); ``train`` keeps the graph for the parameter backward."""

    def closed(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(train):
            return block(z, t)

    def autograd(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        zz, v = _autograd_field(block, z, t)
        return v, divergence_exact(v, zz, create_graph=train)

    def hutch(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        zz, v = _autograd_field(block, z, t)
        return v, divergence_hutchinson(v, zz, noise, create_graph=train)

    return {"closed": closed, "autograd": autograd, "hutch": hutch}


def _step(method: Method, train: bool, block: blocks.OTFlowBlock) -> Callable[[], None]:
    def call() -> None:
        v, div = method(train)
        if train:
            block.zero_grad(set_to_none=True)
            (0.5 * v.pow(2).sum(1) - div).mean().backward()

    return call


def run(
    dims: tuple[int, ...] = (2, 8, 43, 63),
    widths: tuple[int, ...] = (64, 256),
    batch: int = 2000,
    depth: int = 2,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Table:
    """Times the three divergences for every (d, m); returns the table."""
    table = Table("trace", f"(a) velocity + divergence per sample, OT-Flow block, depth M = {depth}", COLUMNS)
    for d in dims:
        for m in widths:
            block = _block(d, m, depth, dtype, seed)
            gen = torch.Generator().manual_seed(seed + 1)
            z = torch.randn(batch, d, generator=gen).to(dtype)
            noise = torch.randint(0, 2, (batch, d), generator=gen).to(dtype).mul_(2).sub_(1)
            methods = _methods(block, z, noise, 0.37)
            with torch.no_grad():
                exact = methods["closed"](False)[1]
            reference = methods["autograd"](False)[1].detach()
            estimate = methods["hutch"](False)[1].detach()
            flops = 2.0 * depth * m * m * d * batch
            for train, label, factor in ((False, "fwd", 1.0), (True, "fwd+bwd", 3.0)):
                block.requires_grad_(train)
                calls = {name: _step(f, train, block) for name, f in methods.items()}
                calls["gemm"], gemm_flops = gemm(batch * d, m, m, dtype)
                seconds = interleaved_medians(calls, repeats)
                closed_gflops = factor * flops / seconds["closed"] / 1e9
                gemm_gflops = gemm_flops / seconds["gemm"] / 1e9
                table.rows.append(
                    {
                        "d": d,
                        "m": m,
                        "pass": label,
                        "batch": batch,
                        "closed_us": 1e6 * seconds["closed"] / batch,
                        "closed_gflops": closed_gflops,
                        "gemm_gflops": gemm_gflops,
                        "closed_of_gemm": closed_gflops / gemm_gflops,
                        "autograd_us": 1e6 * seconds["autograd"] / batch,
                        "autograd_ratio": seconds["autograd"] / seconds["closed"],
                        "hutch_us": 1e6 * seconds["hutch"] / batch,
                        "hutch_ratio": seconds["hutch"] / seconds["closed"],
                        "hutch_rel_err": float((estimate - reference).norm() / reference.norm()),
                        "closed_vs_autograd": float((exact - reference).abs().max() / reference.abs().max()),
                    }
                )
    table.notes = [
        f"Batch {batch}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} torch thread(s); "
        f"median of {repeats} calls after one warm-up, all methods and the GEMM timed round-robin.",
        "closed GFLOP/s counts 2·M·m²·d FLOPs per sample forward (the Jacobian-update GEMMs) and 3× that "
        "for fwd+bwd; GEMM GFLOP/s is torch.mm of the same (batch·d × m)·(m × m) shape, measured in the "
        "same run.",
        "autograd exact: v = −∇Φ by autograd with create_graph, divergence by blocks.divergence_exact "
        "(one is_grads_batched call; torch.func vmap(jacfwd(grad Φ)) was no faster: 12.3 s vs 11.1 s "
        "per batch at d = 43, m = 256, forward); Hutchinson: one Rademacher probe, relative error "
        "‖est − exact‖₂/‖exact‖₂ over the batch.",
        "fwd+bwd back-propagates mean(½‖v‖² − div v) to the parameters. The closed-form column "
        "'closed vs autograd' is max |closed − autograd| / max |autograd| of the divergence.",
    ]
    return table
