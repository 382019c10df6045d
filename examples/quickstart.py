"""Quickstart: train a block-wise JKO flow on a toy density, evaluate, sample,
save and load it again.

    python examples/quickstart.py            # about 3 minutes on 2 CPU cores
    JKOFLOW_EXAMPLE_TINY=1 python examples/quickstart.py   # seconds: tiny sizes, as the tests run it
"""

import os
import tempfile
from pathlib import Path

import torch

import jkoflow
from jkoflow import datasets
from jkoflow.metrics import inversion_error, nll

torch.set_num_threads(1)  # small ops on few cores run fastest single-threaded

TINY = os.environ.get("JKOFLOW_EXAMPLE_TINY") == "1"  # smoke-test sizes (the numbers mean nothing)
SIZE = {"n": 3_000, "width": 8, "iters": 20} if TINY else {"n": 60_000, "width": 32, "iters": 300}

# 1. Data: a seeded toy sample, split into train / validation / test.
x = datasets.load("8gaussians", n=SIZE["n"], seed=0)
x_train, x_val, x_test = datasets.split(x, seed=0)

# 2. Train blocks one at a time until the per-block movement Ter(k) < ter_eps.
config = jkoflow.JKOConfig(width=SIZE["width"], iters=SIZE["iters"], max_blocks=2 if TINY else 4)
flow, history = jkoflow.train_jko(x_train, x_val=x_val, x_test=x_test, config=config, progress=not TINY)
for block in history.blocks:
    print(
        f"block {block['index'] + 1}: h={block['h']:.2f}  W={block.movement:.3f}  "
        f"test NLL={block['test_nll']:.3f}"
    )

# 3. Density, samples, inversion.
print(f"test NLL: {nll(flow, x_test):.4f} nats ({flow.steps} RK4 steps per block)")
print(f"inversion error: {inversion_error(flow, x_test[:2000]):.2e}")
with torch.no_grad():
    samples = flow.sample(5, generator=torch.Generator().manual_seed(0))
    log_p = flow.log_prob(samples)
for point, value in zip(samples.tolist(), log_p.tolist(), strict=True):
    print(f"sample ({point[0]:+.3f}, {point[1]:+.3f})  log p = {value:.3f}")

# 4. Save and load: weights plus a JSON config, no pickled code.
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "flow.pt"
    flow.save(path)
    loaded = jkoflow.Flow.load(path)
    with torch.no_grad():
        same = torch.equal(loaded.log_prob(samples), log_p)
    print(f"reloaded flow with {len(loaded)} blocks; identical log_prob: {same}")
