"""The compiled RK4 step of training: when it is used, that it computes what the
eager step does (values and gradients), and the eager fallback."""

import warnings

import pytest
import torch

import blocks
import jkoflow
from jkoflow.compiling import COMPILE_MIN_ITERS, COMPILE_MIN_SECONDS, CompiledStep, training_stepper
from jkoflow.errors import InputError
from jkoflow.objectives import jko_loss
from jkoflow.ode import rk4_step


@pytest.mark.parametrize(
    ("kind", "options", "mode", "iters", "compiled"),
    [
        ("mlp", {}, "auto", COMPILE_MIN_ITERS, True),
        ("mlp", {}, "auto", COMPILE_MIN_ITERS - 1, False),
        ("mlp", {"max_seconds": COMPILE_MIN_SECONDS - 1}, "auto", 10_000, False),
        ("mlp", {"max_seconds": COMPILE_MIN_SECONDS}, "auto", 10_000, True),
        ("mlp", {}, "on", 1, True),
        ("mlp", {}, "off", 10_000, False),
        ("mlp", {"hutchinson": True}, "auto", 10_000, False),
        ("otflow", {}, "auto", COMPILE_MIN_ITERS, True),
        ("otflow", {}, "off", 10_000, False),
    ],
)
def test_which_blocks_are_compiled(kind, options, mode, iters, compiled):
    options = dict(options)
    seconds = options.pop("max_seconds", 0.0)
    block = blocks.make(kind, dim=2, width=8, **options)
    stepper = training_stepper(block, mode, iters, seconds)
    assert isinstance(stepper, CompiledStep) if compiled else stepper is rk4_step


def test_compile_on_refuses_a_block_it_cannot_compile():
    with pytest.raises(InputError, match="compilable"):
        training_stepper(blocks.make("mlp", dim=2, width=8, hutchinson=True), "on", 10)
    with pytest.raises(InputError, match="compile must be one of"):
        jkoflow.JKOConfig(compile="yes")


def test_time_slices_are_compilable_where_their_parent_is():
    for kind in ("mlp", "otflow"):
        assert all(piece.compilable for piece in blocks.time_slices(blocks.make(kind, dim=2), 2))
    hutchinson = blocks.make("mlp", dim=2, hutchinson=True)
    assert not any(piece.compilable for piece in blocks.time_slices(hutchinson, 2))


def _trained_block(kind: str = "mlp") -> blocks.Block:
    torch.manual_seed(0)
    block = blocks.make(kind, dim=2, width=8, depth=1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("kind", ["mlp", "otflow"])
def test_the_compiled_step_computes_the_eager_loss_and_gradients(kind):
    block, x = _trained_block(kind), torch.randn(64, 2)
    results = []
    for stepper in (rk4_step, CompiledStep()):
        block.zero_grad()
        terms = jko_loss(block, x, 5.0, 3, stepper=stepper)
        terms.loss.backward()
        results.append((terms, [p.grad for p in block.parameters() if p.grad is not None]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    for a, b in zip(eager, compiled, strict=True):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5, abs=1e-6)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * (1 + float(a.abs().max()))
    assert float(eager.kl.detach()) != 0 and float(eager.transport.detach()) > 0


def test_the_compiled_otflow_step_matches_eager_in_float64_with_the_hjb_term():
    """The OT-Flow baseline's step (HJB residual included) through the hand-written
    autograd Functions of the trace: compiled = eager to float64 rounding."""
    block, x = _trained_block("otflow").double(), torch.randn(32, 2, dtype=torch.float64)
    results = []
    for stepper in (rk4_step, CompiledStep()):
        block.zero_grad()
        out = jkoflow.integrate(block, x, 3, hjb=True, stepper=stepper)
        (out.z.square().sum(1) - out.logdet + out.kinetic + out.hjb).mean().backward()
        results.append((out, [p.grad for p in block.parameters() if p.grad is not None]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert stepper.fallback is None
    for a, b in zip(eager, compiled, strict=True):
        a, b = a.detach(), b.detach()
        assert float((a - b).abs().max()) <= 1e-12 * (1 + float(a.abs().max()))
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert float((a - b).abs().max()) <= 1e-12 * (1 + float(a.abs().max()))
    assert float(eager.hjb.abs().max()) > 0.01 and len(eager_grads) == 7


def test_more_block_architectures_than_torch_s_recompile_default_stay_compiled():
    """torch recompiles a function for at most 8 guard sets by default; a
    session that trains more block architectures must not fall back to eager."""
    x = torch.randn(8, 2)
    for width in range(2, 14):  # 12 architectures, whatever this process compiled before
        stepper = CompiledStep(backend="eager")  # dynamo's graphs, no code generation
        stepper(blocks.make("otflow", dim=2, width=width, depth=1), x, torch.tensor(0.0), torch.tensor(0.5))
        assert stepper.fallback is None, (width, stepper.fallback)


def test_a_failed_compilation_warns_once_and_trains_eagerly():
    block, x = _trained_block(), torch.randn(16, 2)
    stepper = CompiledStep()

    def cannot_compile(*args):
        raise RuntimeError("no C++ compiler found\nsecond line")

    stepper.compiled = cannot_compile
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        first = jko_loss(block, x, 5.0, 2, stepper=stepper).loss
    assert stepper.fallback == "RuntimeError: no C++ compiler found"
    assert float(first.detach()) == float(jko_loss(block, x, 5.0, 2).loss.detach())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jko_loss(block, x, 5.0, 2, stepper=stepper)
    assert not caught  # one warning per stepper, not one per step


def test_a_run_takes_its_first_mini_batches_eagerly():
    from jkoflow.compiling import EAGER_BATCHES
    from jkoflow.placement import resolve_placement
    from jkoflow.scheduler import JKOObjective
    from jkoflow.stages import BlockPlan

    config = jkoflow.JKOConfig(block="mlp", width=8, batch_size=16, compile="on")
    taken = [0]
    objective = JKOObjective(
        blocks.make("mlp", dim=2, width=8),
        BlockPlan(0, 5.0, 50, "new"),
        torch.randn(64, 2),
        config,
        torch.Generator().manual_seed(0),
        resolve_placement(config),
        lambda: taken[0],
    )
    assert isinstance(objective.stepper, CompiledStep)
    assert objective.current_stepper() is rk4_step
    taken[0] = EAGER_BATCHES
    assert objective.current_stepper() is objective.stepper


def test_the_otflow_baseline_takes_its_first_mini_batches_eagerly(monkeypatch):
    """Like a JKO run, the baseline compiles only after EAGER_BATCHES steps, so
    the first point of its validation curve is not delayed by the compilation."""
    from jkoflow import otflow
    from jkoflow.compiling import EAGER_BATCHES

    used = []
    real = otflow.otflow_loss

    def recording(block, x, steps, alpha_c, alpha_r, stepper):
        used.append(stepper)
        return real(block, x, steps, alpha_c, alpha_r)

    monkeypatch.setattr(otflow, "otflow_loss", recording)
    torch.manual_seed(0)
    data = torch.randn(256, 2)
    config = jkoflow.OTFlowConfig(width=4, iters=EAGER_BATCHES + 3, batch_size=32, val_every=50, compile="on")
    jkoflow.train_otflow(data, data[:64], config=config)
    assert used[:EAGER_BATCHES] == [rk4_step] * EAGER_BATCHES
    assert len(used) == EAGER_BATCHES + 3 and all(isinstance(s, CompiledStep) for s in used[EAGER_BATCHES:])
