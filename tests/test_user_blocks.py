"""Block types from user code (registration, training by name, checkpoints) and mixed flows."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import blocks
import jkoflow
from jkoflow import Flow, InputError
from jkoflow.cli import main
from jkoflow.config import config_from_dict
from jkoflow.trainer import run_pipeline


@blocks.register("user-ridge")
class RidgeBlock(blocks.Block):
    """v = U tanh(W x + a t + b): div = Σ_j (1 − tanh²)_j (W U)_jj in closed form."""

    def __init__(self, dim: int, width: int = 4, depth: int = 1):
        super().__init__()
        self.dim, self.width = dim, width
        self.W = nn.Parameter(torch.randn(width, dim) / dim**0.5)
        self.a = nn.Parameter(torch.zeros(width))
        self.b = nn.Parameter(torch.zeros(width))
        self.U = nn.Parameter(torch.zeros(dim, width))

    def forward(self, z, t):
        s = torch.tanh(z @ self.W.T + blocks.time_column(t, z) * self.a + self.b)
        return s @ self.U.T, (1 - s**2) @ (self.W * self.U.T).sum(1)

    def config(self):
        return {"dim": self.dim, "width": self.width}


class _Scaled(RidgeBlock):
    """Registered with the function form below."""


blocks.register("user-ridge-fn", _Scaled)


def _data():
    return jkoflow.datasets.load("8gaussians", n=1500, seed=0)


TINY = {"width": 4, "iters": 8, "batch_size": 128, "train_steps": 2, "eval_steps": 4}


def test_user_block_divergence_is_exact():
    block = RidgeBlock(3).double()
    with torch.no_grad():
        block.U.normal_()
    z = torch.randn(4, 3, dtype=torch.float64)
    div = block(z, 0.5)[1].detach()
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda x: block(x[None], 0.5)[0][0], z[i])
        assert float(div[i]) == pytest.approx(float(jac.trace()), rel=1e-12)


@pytest.mark.parametrize("name", ["user-ridge", "user-ridge-fn"])
def test_train_save_and_load_by_name(name, tmp_path, monkeypatch):
    flow, history = jkoflow.train_jko(_data(), config=jkoflow.JKOConfig(block=name, max_blocks=2, **TINY))
    assert [type(b).name for b in flow.blocks] == [name, name] and len(history.iterations) == 16
    flow.blocks.append(blocks.time_slices(flow.blocks[0], 2)[1])  # a slice of a user block too
    flow.save(tmp_path / "flow.pt")
    x = torch.as_tensor(_data()[:50], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(Flow.load(tmp_path / "flow.pt").log_prob(x), flow.log_prob(x))
    monkeypatch.delitem(blocks.registry._REGISTRY, name)  # a fresh process that did not register it
    with pytest.raises(InputError, match=f"cannot rebuild .*unknown block type '{name}': register it"):
        Flow.load(tmp_path / "flow.pt")
    with pytest.raises(InputError, match=f"unknown block type '{name}'"):
        jkoflow.JKOConfig(block=name)


def test_registration_rules():
    class RidgeBlock(blocks.Block):  # a redefinition elsewhere under the same name: refused
        pass

    with pytest.raises(ValueError, match="'user-ridge' is already registered"):
        blocks.register("user-ridge", RidgeBlock)
    redefined = type("RidgeBlock", (RidgeBlock,), {"__module__": __name__, "__qualname__": "RidgeBlock"})
    assert blocks.register("user-ridge", redefined) is redefined  # a re-run of the same definition
    blocks.register("user-ridge", globals()["RidgeBlock"])
    assert blocks.get("user-ridge") is globals()["RidgeBlock"]
    with pytest.raises(TypeError, match="only Block subclasses"):
        blocks.register("user-not-a-block", dict)


def test_subclass_of_a_registered_block_is_not_saved_under_its_parents_name(tmp_path):
    class Unregistered(RidgeBlock):
        pass

    flow = Flow(2, blocks.time_slices(Unregistered(2), 2))
    with pytest.raises(InputError, match="Unregistered is not registered"):
        flow.save(tmp_path / "flow.pt")


def test_mixed_flow_types_per_block(tmp_path):
    config = jkoflow.JKOConfig(
        block_types=("otflow", "mlp", "user-ridge"),
        max_blocks=4,
        ter_eps=1e-9,
        refine=(2,),
        stage_iters=2,
        block_options={"otflow": {"rank": 2}, "mlp": {"activation": "softplus", "width": 6}},
        **TINY,
    )
    assert [config.block_type(k) for k in range(5)] == [
        "otflow",
        "mlp",
        "user-ridge",
        "user-ridge",
        "user-ridge",
    ]
    trainer = jkoflow.JKOTrainer(_data(), config=config)
    run_pipeline(trainer)  # the refined flow (train_jko returns the best candidate, maybe an earlier one)
    flow, history = trainer.flow.eval(), trainer.history
    assert len(flow) == 8 and all(type(b).name == "timeslice" for b in flow.blocks)
    parents = [b.parent for b in flow.blocks[::2]]
    assert parents[0].rank == 2 and parents[1].activation == "softplus" and parents[1].width == 6
    assert parents[2].width == 4
    initial = history.stages[0]["blocks"]
    assert initial[-1]["val_nll"] < initial[0]["val_nll"] + 0.1
    assert [s["name"] for s in history.stages] == ["initial", "refine 1"]  # refinement of every type
    assert [b.parent.name for b in flow.blocks[::2]] == ["otflow", "mlp", "user-ridge", "user-ridge"]
    flow.save(tmp_path / "flow.pt")
    x = torch.as_tensor(_data()[:50], dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(Flow.load(tmp_path / "flow.pt").log_prob(x), flow.log_prob(x))
    again = config_from_dict(jkoflow.JKOConfig, json.loads(json.dumps(config.to_dict())))
    assert again == config  # JSON lists come back as tuples


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_types": ("otflow", "nope")}, "unknown block type 'nope'"),
        ({"block_types": "mlp"}, "block_types must be a list of block type names"),
        ({"block_types": ("mlp",), "block_options": {"mlp": 3}}, r"block_options\['mlp'\] must be a dict"),
    ],
)
def test_mixed_flow_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        jkoflow.JKOConfig(**kwargs)


def test_cli_block_types(tmp_path, capsys):
    out = tmp_path / "mixed"
    tiny = ["--n-samples", "1500", "--width", "4", "--iters", "4", "--batch-size", "128", "--quiet"]
    args = ["train", "--data", "moons", "--out", str(out), *tiny, "--block-types", "otflow", "mlp"]
    assert main([*args, "--max-blocks", "3", "--ter-eps", "1e-9", "--eval-steps", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["block_types"] == ["otflow", "mlp"]
    assert [b["type"] for b in Flow.load(out / "flow-initial.pt").config()["blocks"]] == [
        "otflow",
        "mlp",
        "mlp",
    ]
    assert main(["train", "--data", "moons", "--out", str(tmp_path / "bad"), "--block-types", "nope"]) == 2
    assert "unknown block type 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dim", "expected"), [(1, "mlp"), (2, "mlp"), (4, "mlp"), (5, "otflow"), (8, "otflow")]
)
def test_auto_block_type_follows_the_data_dimension(dim, expected):
    config = jkoflow.JKOConfig(
        block_options={"otflow": {"rank": 2}, "mlp": {"activation": "softplus"}}, **TINY
    )
    assert config.block == "auto" and config.block_types_used() == ("mlp", "otflow")
    block = config.make_block(dim=dim)
    assert type(block).name == expected and block.dim == dim and block.width == TINY["width"]
    assert (block.activation if expected == "mlp" else block.rank) == ("softplus" if expected == "mlp" else 2)
    assert config.block_type(3, dim) == expected
    with pytest.raises(ValueError, match="depends on the data dimension"):
        config.block_type(0)
    mixed = jkoflow.JKOConfig(block_types=("otflow", "auto"), **TINY)
    assert [mixed.block_type(k, dim) for k in range(3)] == ["otflow", expected, expected]


def test_auto_is_a_jko_default_only():
    assert jkoflow.JKOConfig().block == "auto"
    assert jkoflow.OTFlowConfig().block == "otflow"
    with pytest.raises(InputError, match="unknown block type 'auto'"):
        jkoflow.OTFlowConfig(block="auto")


@pytest.mark.parametrize(("dim", "expected"), [(2, ("mlp", 2)), (8, ("otflow", 1))])
def test_depth_zero_takes_each_block_types_default_depth(dim, expected):
    config = jkoflow.JKOConfig(width=8)
    assert config.depth == 0
    block = config.make_block(dim=dim)
    assert (type(block).name, block.depth) == expected
    assert jkoflow.JKOConfig(width=8, depth=3).make_block(dim=dim).depth == 3  # an explicit depth wins
    pinned = jkoflow.JKOConfig(width=8, block_options={expected[0]: {"depth": 4}})
    assert pinned.make_block(dim=dim).depth == 4  # and so does a per-type option
    assert jkoflow.OTFlowConfig().depth == 1  # the baseline keeps OT-Flow's own depth
    with pytest.raises(InputError, match="depth must be a non-negative integer"):
        jkoflow.JKOConfig(depth=-1)
