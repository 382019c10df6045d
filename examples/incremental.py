"""Incremental training: train a few blocks, look at their movement W_k, then
add more blocks on top of the saved flow from the same script.

    python examples/incremental.py           # about 4 minutes on 2 CPU cores
"""

import tempfile
from pathlib import Path

import torch

import jkoflow
from jkoflow import datasets

torch.set_num_threads(1)

x = datasets.load("moons", n=60_000, seed=0)
x_train, x_val, x_test = datasets.split(x, seed=0)

# Stage 1: two blocks.
config = jkoflow.JKOConfig(width=32, iters=300, max_blocks=2)
flow, history = jkoflow.train_jko(x_train, x_val=x_val, x_test=x_test, config=config)
print("after stage 1:")
for block in history.blocks:
    print(f"  block {block['index'] + 1}: h={block['h']:.2f}  W_k={block['w2']:.4f}  Ter={block['ter']:.4f}")
print(f"  test NLL {history.blocks[-1]['test_nll']:.4f}")

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "flow.pt"
    flow.save(path)

    # Stage 2: load the saved flow and append blocks on the data pushed through it.
    # max_blocks counts all blocks, so this adds up to two more, with h_k
    # continuing the schedule where stage 1 stopped.
    loaded = jkoflow.Flow.load(path)
    more = jkoflow.JKOConfig(width=32, iters=300, max_blocks=4)
    flow, history = jkoflow.train_jko(x_train, x_val=x_val, x_test=x_test, config=more, flow=loaded)
    print("after stage 2:")
    for block in history.blocks:
        print(
            f"  block {block['index'] + 1}: h={block['h']:.2f}  W_k={block['w2']:.4f}  Ter={block['ter']:.4f}"
        )
    print(
        f"  {len(flow)} blocks, test NLL {history.blocks[-1]['test_nll']:.4f} "
        f"(stopped by {history.stopped_by})"
    )
