"""Block types compared: OT-Flow potential block vs the free-form MLP block.

    # (a) test NLL on checkerboard, default JKOConfig, equal parameter counts
    OMP_NUM_THREADS=1 python benchmarks/block_types.py nll [--blocks otflow mlp] [--max-seconds S]
        [--iters N] [--batch-size B]
    # (b) per-sample cost of the velocity + exact divergence, forward and forward+backward
    OMP_NUM_THREADS=1 python benchmarks/block_types.py cost [--dims 2 8 43] [--batch 1024]

Both print a markdown table. (a) trains one flow per block type with the
default :class:`jkoflow.JKOConfig` (width 32, depth 1: 1229 parameters per
OT-Flow block, 1250 per MLP block at d = 2) on the default checkerboard split
and reports the test NLL at the eval steps and at twice as many. (b) times one
block call ``block(z, t)`` on a float32 batch: "forward" under
``torch.no_grad`` (pushing, NLL), "fwd+bwd" in training mode with the
backward of a loss using v and div (as in training); median of repeats,
microseconds per sample. The MLP's one-probe Hutchinson estimate is timed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import blocks
import jkoflow
from jkoflow.config import FIRST_PASS, DataConfig
from jkoflow.metrics import nll, parameter_count
from jkoflow.run import load_data


def nll_table(names: list[str], max_seconds: float, iters: int = 0, batch_size: int = 0) -> None:
    """Trains one flow per block type (``iters``/``batch_size``: 0 keeps the default)."""
    overrides = {k: v for k, v in (("iters", iters), ("batch_size", batch_size)) if v}
    x_train, x_val, x_test = load_data(DataConfig())
    rows = []
    for name in names:
        config = jkoflow.JKOConfig(block=name, max_seconds=max_seconds, **{**FIRST_PASS, **overrides})
        start = time.perf_counter()
        flow, history = jkoflow.train_jko(x_train, x_val=x_val, config=config)
        wall = time.perf_counter() - start
        per_block = parameter_count(flow) // len(flow)
        test = nll(flow, x_test)
        flow.steps *= 2
        test_fine = nll(flow, x_test)
        rows.append(
            f"| {name} | {per_block} | {len(flow)} ({history.stopped_by}) | {test:.4f} | {test_fine:.4f} "
            f"| {history.n_batches} | {history.train_seconds:.0f} | {wall:.0f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\ncheckerboard, JKOConfig(max_seconds={max_seconds}, {overrides}), "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        "| block | params/block | blocks | test NLL (8 steps) | test NLL (16 steps) "
        "| batches | train s | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _costs(block: blocks.Block, z: torch.Tensor, repeats: int) -> tuple[float, float]:
    def forward() -> None:
        block.eval()
        with torch.no_grad():
            block(z, 0.5)

    def train_step() -> None:
        block.train()
        v, div = block(z, 0.5)
        (0.5 * v.pow(2).sum() - div.sum()).backward()
        block.zero_grad(set_to_none=True)

    n = len(z)
    return _median_seconds(forward, repeats) / n * 1e6, _median_seconds(train_step, repeats) / n * 1e6


def cost_table(dims: list[int], width: int, batch: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    print(
        f"\nper-sample cost (µs), width {width}, depth 1, batch {batch}, float32, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print(
        "| d | otflow fwd | mlp exact fwd | ratio | otflow fwd+bwd | mlp exact fwd+bwd | ratio "
        "| mlp Hutchinson fwd+bwd | params otflow / mlp |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in dims:
        z = torch.randn(batch, d, generator=gen)
        made = {
            "otflow": blocks.make("otflow", dim=d, width=width, depth=1),
            "mlp": blocks.make("mlp", dim=d, width=width, depth=1),
            "hutch": blocks.make("mlp", dim=d, width=width, depth=1, hutchinson=True),
        }
        for block in made.values():  # off the special initial values
            with torch.no_grad():
                for p in block.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ot_f, ot_t = _costs(made["otflow"], z, repeats)
        mlp_f, mlp_t = _costs(made["mlp"], z, repeats)
        _, hu_t = _costs(made["hutch"], z, repeats)
        counts = [sum(p.numel() for p in made[k].parameters()) for k in ("otflow", "mlp")]
        print(
            f"| {d} | {ot_f:.2f} | {mlp_f:.2f} | {mlp_f / ot_f:.1f}× | {ot_t:.2f} | {mlp_t:.2f} | "
            f"{mlp_t / ot_t:.1f}× | {hu_t:.2f} | {counts[0]} / {counts[1]} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("nll", help="(a) test NLL on checkerboard per block type")
    a.add_argument("--blocks", nargs="+", default=["otflow", "mlp"])
    a.add_argument("--max-seconds", type=float, default=0.0, help="training budget per flow (0: none)")
    a.add_argument("--iters", type=int, default=0, help="Adam steps per block (0: the JKOConfig default)")
    a.add_argument("--batch-size", type=int, default=0, help="mini-batch size (0: the JKOConfig default)")
    b = sub.add_parser("cost", help="(b) per-sample cost of the divergence")
    b.add_argument("--dims", type=int, nargs="+", default=[2, 8, 43])
    b.add_argument("--width", type=int, default=32)
    b.add_argument("--batch", type=int, default=1024)
    b.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "nll":
        nll_table(args.blocks, args.max_seconds, args.iters, args.batch_size)
    else:
        cost_table(args.dims, args.width, args.batch, args.repeats)


if __name__ == "__main__":
    main()
