"""The pushed samples a JKO run trains on (docs/design.md, "The scheduler and its stages").

Block k is trained on samples of p_{k−1}: the data pushed through blocks
0 … k−1, x ↦ T_{k−1}∘…∘T_0(x), with the accumulated log-determinant
ℓ = Σ_j ℓ_j(x). They are pushed once per block, ``chunk_size`` rows at a time
(sharded over the ranks and gathered), and kept where the placement says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from blocks import Block

from .flow import Flow, chunked
from .metrics import STEP_CHECK_ROWS, data_scale, stratified_mean
from .objectives import gaussian_log_prob
from .ode import integrate
from .placement import Placement

__all__ = ["TAIL_FRACTION", "Pushed", "Samples"]

TAIL_FRACTION = 0.01
"""The share of the training rows, those farthest from the training mean,
that the round-trip check measures besides the validation rows
(:meth:`Samples.round_trip_error`)."""


@dataclass
class Pushed:
    """Samples x of p_k, shape (n, d), and the flow's log-determinant so far, shape (n,).

    Example:
        >>> from jkoflow.samples import Pushed
        >>> pushed = Pushed(torch.zeros(4, 2), torch.full((4,), 0.5))
        >>> round(pushed.nll(), 6)  # log 2π − 0.5
        1.337877
        >>> pushed.head(2).x.shape
        torch.Size([2, 2])
    """

    x: Tensor
    logdet: Tensor

    def per_row(self) -> Tensor:
        """−(log N(x; 0, I) + ℓ), shape (n,): each row's NLL under the flow so far."""
        return -(gaussian_log_prob(self.x) + self.logdet)

    def nll(self) -> float:
        """The mean of :meth:`per_row`: the NLL of the data under the flow so far."""
        return float(self.per_row().mean())

    def nll_with_stderr(self) -> tuple[float, float]:
        """:meth:`nll` and its standard error, the per-row NLL's std over √rows."""
        per_row = self.per_row()
        stderr = float(per_row.std() / len(per_row) ** 0.5) if len(per_row) > 1 else float("inf")
        return float(per_row.mean()), stderr

    def head(self, rows: int) -> Pushed:
        return Pushed(self.x[:rows], self.logdet[:rows])


class Samples:
    """The named data sets (``train``, ``val``, optional ``test``) of one run
    and their pushes through ``flow``.

    Example:
        >>> from jkoflow.placement import resolve_placement
        >>> from jkoflow.samples import Samples
        >>> flow = jkoflow.Flow(2, [blocks.make("otflow", dim=2, width=4) for _ in range(2)], steps=2)
        >>> x = torch.randn(40, 2)
        >>> samples = Samples(flow, {"train": x, "val": x[:10]}, resolve_placement(jkoflow.JKOConfig()), 16)
        >>> pushed = samples.through(0, 2)  # through both blocks, 16 rows at a time
        >>> bool(torch.allclose(pushed["train"].x, flow(x)[0]))
        True
        >>> abs(pushed["train"].nll() + float(flow.log_prob(x).mean().detach())) < 1e-5
        True
    """

    def __init__(self, flow: Flow, sets: dict[str, Tensor], placement: Placement, chunk_size: int) -> None:
        self.flow, self.sets, self.placement, self.chunk_size = flow, sets, placement, chunk_size
        self._base: tuple[int, dict[str, Pushed]] | None = None
        self._tail: tuple[Tensor, float] | None = None

    def base(self, first: int) -> dict[str, Pushed]:
        """The data pushed through the flow's first ``first`` blocks (kept)."""
        if self._base is None or self._base[0] != first:
            frozen = self.flow.head(first)
            with torch.no_grad():
                pushed = {
                    name: Pushed(*self._map(lambda part: frozen(part, self.chunk_size), x))
                    for name, x in self.sets.items()
                }
            self._base = (first, pushed)
        return self._base[1]

    def through(self, first: int, trained: int) -> dict[str, Pushed]:
        """Samples for block ``first + trained``: the base samples pushed through
        the ``trained`` blocks after ``first`` (the same pushes, so the same
        numbers, as when those blocks were trained)."""
        cached = self.base(first)
        with torch.no_grad():
            for k in range(first, first + trained):
                cached = self.push_all(k, cached)
        return cached

    def push_all(self, k: int, cached: dict[str, Pushed]) -> dict[str, Pushed]:
        """Every set pushed through block ``k`` (:meth:`push`)."""
        return {name: self.push(k, c) for name, c in cached.items()}

    def push(self, k: int, cached: Pushed, steps: int | None = None) -> Pushed:
        """Samples of p_k from those of p_{k−1}: x ↦ T_k(x), ℓ += ℓ_k(x), for the
        flow's block ``k`` with ``steps`` RK4 steps (default: the block's own,
        ``flow.block_steps(k)``)."""
        return self.push_block(self.flow.blocks[k], cached, steps or self.flow.block_steps(k))

    def push_block(self, block: Block, cached: Pushed, steps: int) -> Pushed:
        """``cached`` pushed through any ``block`` with ``steps`` RK4 steps."""
        z, logdet = self._map(lambda part: integrate(block, part, steps), cached.x)
        return Pushed(z, cached.logdet + logdet)

    def step_doubling_change(self, k: int, before: Pushed, after: Pushed) -> float:
        """The RK4 error block ``k`` adds to the validation NLL: on the first
        :data:`~jkoflow.metrics.STEP_CHECK_ROWS` rows, the NLL with the block
        at 2·n_k RK4 steps minus that at its own n_k (``after``, pushed at n_k)."""
        rows = min(len(before.x), STEP_CHECK_ROWS)
        doubled = self.push(k, before.head(rows), 2 * self.flow.block_steps(k))
        return doubled.nll() - after.head(rows).nll()

    def inversion_error(self, k: int, before: Pushed, after: Pushed) -> float:
        """Block ``k``'s round-trip error at its own n_k steps on the same rows:
        E‖x − T_k⁻¹(T_k(x))‖ over sqrt(E‖x‖²/d), the per-coordinate scale of its input x."""
        rows = min(len(before.x), STEP_CHECK_ROWS)
        x = before.head(rows).x
        back = self._back(range(k, k + 1), after.head(rows).x)
        scale = x.pow(2).sum(1).mean().div(x.shape[1]).sqrt()
        return float((back - x).norm(dim=1).mean() / scale)

    def tail(self) -> tuple[Tensor, float]:
        """The indices of the :data:`TAIL_FRACTION` of training rows farthest
        from the training mean (at least one), by ‖u‖ in the flow's
        standardised coordinates u = S(x), and the smallest of those
        distances (computed once)."""
        if self._tail is None:
            distance = chunked(self._distance, self.sets["train"], self.chunk_size)
            radii, index = distance.topk(max(1, round(TAIL_FRACTION * len(distance))))
            self._tail = (index.to(self.sets["train"].device), float(radii[-1]))
        return self._tail

    def tail_of(self, pushed: Pushed) -> Pushed:
        """The :meth:`tail` rows of the pushed training set ``pushed``."""
        index = self.tail()[0].to(pushed.x.device)
        return Pushed(pushed.x[index], pushed.logdet[index])

    def round_trip_error(self, k: int, val: Pushed, tail: Pushed) -> float:
        """E‖x − T⁻¹(T(x))‖ / sqrt(E‖x − μ‖²/d) for T the flow's first k + 1
        blocks (each integrated back at its own steps, last first), x the
        data in data units and μ the training mean, from ``val`` and ``tail``:
        the first :data:`~jkoflow.metrics.STEP_CHECK_ROWS` validation rows and
        the :meth:`tail` training rows pushed through those blocks. The mean
        is estimated in two strata of the distance from μ
        (:func:`~jkoflow.metrics.stratified_mean`): the rows as far out as
        the tail's from all training rows there, the rest from the
        validation rows nearer in. On long-tailed data it is made by a few
        rows far out, where RK4 at a block's steps is least accurate, and a
        validation set holds too few of them: one flow measured 3.1e-5 on its
        validation rows and 3.7e-4 on its test rows. The scale is the
        validation rows'. Each block's own :meth:`inversion_error` can be
        small while the composition's is not: an earlier block's inverse
        carries a later block's error on, scaled by its Lipschitz constant."""
        rows, (index, radius) = min(len(val.x), STEP_CHECK_ROWS), self.tail()
        x_val, x_tail = self.sets["val"][:rows], self.sets["train"][index]
        bulk, far = self._round_trip(k, x_val, val.head(rows).x), self._distance(x_val) >= radius
        share = len(x_tail) / len(self.sets["train"])
        mean = stratified_mean(bulk, far, self._round_trip(k, x_tail, tail.x), share)
        return mean / data_scale(self.flow, x_val.to(self.flow.shift))

    def _back(self, blocks: range, z: Tensor) -> Tensor:
        """``z`` integrated back through the flow's ``blocks``, last first, each at its own steps."""
        for j in reversed(blocks):
            block, steps = self.flow.blocks[j], self.flow.block_steps(j)
            z, _ = self._map(lambda part, b=block, n=steps: integrate(b, part, n, t0=1.0, t1=0.0), z)
        return z

    def _round_trip(self, k: int, x: Tensor, z: Tensor) -> Tensor:
        """‖x − T⁻¹(z)‖ per row, in data units, for z = T(x) through the flow's first k + 1 blocks."""
        like = self.flow.shift
        return (self.flow.unstandardize(self._back(range(k + 1), z).to(like)) - x.to(like)).norm(dim=1)

    def _distance(self, x: Tensor) -> Tensor:
        """‖S(x)‖ per row of data rows ``x``, S the flow's fixed map (x − μ,
        scaled and decorrelated where the flow standardises), on the rows' device."""
        with torch.no_grad():
            return self.flow.standardize(x.to(self.flow.shift))[0].norm(dim=1).to(x.device)

    def _map(self, fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, ℓ) = ``fn(rows)[:2]`` for the rows of ``x``, chunk by chunk on the
        compute device, kept on the cache device; each rank pushes its shard."""
        place, size = self.placement, self.chunk_size
        start, stop = place.group.shard(len(x))

        def run(part: Tensor) -> tuple[Tensor, Tensor]:
            z, logdet = fn(place.compute(part))[:2]
            return z.to(place.store), logdet.to(place.store)

        out = chunked(run, x[start:stop], size)
        return tuple(place.keep(place.group.gather_rows(t, len(x), size)) for t in out)  # type: ignore[return-value]
