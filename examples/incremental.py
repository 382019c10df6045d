"""Training a flow step by step with :class:`jkoflow.JKOTrainer`: two blocks,
look at their movements W_k (and a figure), decide, add blocks with another
step size h, reparametrise, refine, save.

    python examples/incremental.py                        # about 10 minutes on 2 CPU cores
    JKOFLOW_EXAMPLE_TINY=1 python examples/incremental.py  # seconds (tiny sizes)

The scheme (JKO-iFlow, https://arxiv.org/abs/2212.14424): block k minimises
KL((T_k)#p_{k−1} ‖ N(0, I)) + W2²(p_{k−1}, p_k)/(2h_k); its movement is
W_k = sqrt(E‖T_k(x) − x‖²) on the validation set.
"""

import os
import tempfile
from pathlib import Path

import torch

import jkoflow
from jkoflow import datasets
from jkoflow.plots import plot_w2_per_block

torch.set_num_threads(1)
tiny = os.environ.get("JKOFLOW_EXAMPLE_TINY") == "1"
n, iters, width, batch = (3_000, 10, 8, 256) if tiny else (60_000, 300, 32, 1024)

x = datasets.load("moons", n=n, seed=0)
x_train, x_val, x_test = datasets.split(x, seed=0)
config = jkoflow.JKOConfig(width=width, iters=iters, batch_size=batch, stage_iters=iters // 2)
trainer = jkoflow.JKOTrainer(x_train, x_val, x_test, config=config)


def show(title: str) -> None:
    print(title)
    for block in trainer.history.blocks:
        print(f"  block {block.index + 1}: h={block.h:.3g}  W_k={block.movement:.4f}  Ter={block.ter:.4f}")
    print(f"  {len(trainer.flow)} blocks, test NLL {trainer.history.blocks[-1].test_nll:.4f}")


# 1. Two blocks at the scheduled h_k = min(h0·ρ^k, h_max).
trainer.add_block()
trainer.add_block()
show("two blocks:")

with tempfile.TemporaryDirectory() as tmp:
    figure = Path(tmp) / "movement.png"
    plot_w2_per_block(trainer.history.to_dict(), figure)
    print(f"  wrote {figure.name} ({figure.stat().st_size} bytes)")

    # 2. Decide: if the last block still moved a lot, add two blocks with a smaller h.
    movements = [b.movement for b in trainer.history.blocks]
    h = 1.0 if movements[-1] > 0.1 * movements[0] else 0.5
    for _ in range(2):
        trainer.add_block(h=h)
    show(f"two more blocks at h={h}:")

    # 3. One reparametrisation iteration toward equal movements, then a refinement
    #    that cuts every block into two time slices.
    trainer.reparametrize(iters=1, rule="ratio")
    show("reparametrised:")
    trainer.refine(2)
    show("refined:")

    # 4. The trainer can be saved and resumed at any point.
    path = Path(tmp) / "trainer.pt"
    trainer.save(path)
    again = jkoflow.JKOTrainer.resume(path, x_train, x_val, x_test)
    print(f"stages: {[s.name for s in again.history.stages]}, {len(again.flow)} blocks after resume")
