"""jkoflow.figures: the figures draw the flow's own numbers, and runs write them."""

import re

import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection

import blocks
from jkoflow import Flow, InputError, datasets, plots
from jkoflow.cli import main
from jkoflow.figures import FIGURE_FILES, PATH_STEPS, save_figure
from jkoflow.inspect import density_grid, principal_axes, trajectories


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _flow(random_otflow, dim, n_blocks, steps=4, scale=None):
    made = [random_otflow(dim=dim, seed=s) for s in range(n_blocks)]
    return Flow(dim, made, steps=steps, scale=scale).double()


def _offsets(ax):
    (points,) = ax.collections
    return np.asarray(points.get_offsets())


def test_pushforward_panels_are_the_flows_heads(random_otflow):
    flow = _flow(random_otflow, 2, 3, scale=torch.tensor([2.0, 0.5]).double())
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0)).double()
    fig = plots.plot_pushforward(flow, x)
    axes = np.array(fig.axes).reshape(2, 4)
    for k in range(4):
        z, _ = flow.head(k)(x)
        assert np.array_equal(_offsets(axes[0, k]), z.numpy())
        title = axes[0, k].get_title()
        assert f"NLL={-float(flow.head(k).log_prob(x).mean()):.3f}" in title
        if k:
            w = (z - flow.head(k - 1)(x)[0]).pow(2).sum(1).mean().sqrt()
            assert f"$W_{{{k}}}$={float(w):.3g}" in title
    # bottom row: N(0, I) draws (the last panel) pulled back; panel 0 is S(flow.inverse(z))
    z = torch.as_tensor(_offsets(axes[1, 3]))
    assert abs(float(z.mean())) < 0.15 and abs(float(z.std()) - 1) < 0.1
    assert np.allclose(_offsets(axes[1, 0]), flow.standardize(flow.inverse(z))[0].numpy(), atol=1e-12)


def test_pushforward_of_a_high_dimensional_flow_uses_the_principal_axes(random_otflow):
    flow = _flow(random_otflow, 4, 2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 4, generator=gen).double() * torch.tensor([3.0, 0.2, 1.0, 0.5]).double()
    fig = plots.plot_pushforward(flow, x, max_points=500, seed=3)
    axes = np.array(fig.axes).reshape(2, 3)
    shown = _offsets(axes[0, 0])
    assert shown.shape == (500, 2)
    # the panels are the subsampled data's pushes, projected on the full data's principal axes
    keep = torch.randperm(3000, generator=torch.Generator().manual_seed(3))[:500]
    axes_2d = principal_axes(x)
    for k in range(3):
        assert np.allclose(_offsets(axes[0, k]), (flow.head(k)(x[keep])[0] @ axes_2d).numpy(), atol=1e-12)
    assert "principal axes" in fig.texts[0].get_text()


def test_pushforward_stays_at_eight_panels_for_64_blocks():
    made = []
    for k in range(64):
        block = blocks.make("test-constant", dim=2).double()
        block.c.fill_(0.01 * (k + 1))
        made.append(block)
    flow = Flow(2, made, steps=1).double()
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(2)).double()
    fig = plots.plot_pushforward(flow, x)
    assert len(fig.axes) == 16
    ks = [int(re.match(r"(\d+) block", ax.get_title()).group(1)) for ax in fig.axes[:8]]
    assert ks[0] == 0 and ks[-1] == 64 and ks == sorted(ks)
    # panel k shows x shifted by Σ_{j≤k} c_j, and its title the movement of block k
    for ax, k in zip(fig.axes[:8], ks, strict=True):
        assert np.allclose(_offsets(ax), x.numpy() + 0.01 * k * (k + 1) / 2, atol=1e-12)
        if k:
            assert f"$W_{{{k}}}$={0.01 * k * 2**0.5:.3g}" in ax.get_title()


def test_trajectory_figure_draws_the_paths_and_their_straightness(random_otflow):
    const = blocks.make("test-constant", dim=2).double()
    const.c.copy_(torch.tensor([1.0, 0.5]))
    flow = Flow(2, [random_otflow(seed=4), const, random_otflow(seed=5)], steps=3).double()
    x = torch.randn(120, 2, generator=torch.Generator().manual_seed(6)).double()
    fig = plots.plot_trajectories(flow, x, n_paths=500)
    left, right = fig.axes[:2]
    lines = [c for c in left.collections if isinstance(c, LineCollection)]
    paths = trajectories(flow, x, steps=PATH_STEPS)  # at least PATH_STEPS grid points per block
    assert len(lines) == 3
    for k, collection in enumerate(lines):
        segments = collection.get_segments()
        assert len(segments) == 120
        assert np.allclose(np.stack(segments), paths.paths[k].numpy().transpose(1, 0, 2), atol=1e-12)
    assert len({tuple(c.get_colors()[0]) for c in lines}) == 3  # one colour per block
    heights = [bar.get_y() + bar.get_height() for bar in right.patches]
    assert np.allclose(heights, paths.straightness().numpy())
    assert heights[1] == pytest.approx(1.0, abs=1e-12) and min(heights[0], heights[2]) > 1.0 + 1e-6


def test_trajectory_figure_of_a_refined_flow_shows_each_parents_straightness(random_otflow):
    parents = [random_otflow(seed=s) for s in (7, 8, 9)]
    plain = Flow(2, parents, steps=8).double()
    refined = Flow(2, [s for p in parents for s in blocks.time_slices(p, 16)], steps=1).double()
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(10)).double()
    right = plots.plot_trajectories(refined, x).axes[1]
    heights = [bar.get_y() + bar.get_height() for bar in right.patches]
    assert len(heights) == 3 and "parent" in right.get_xlabel()
    # 16 one-step slices drawn with PATH_STEPS steps each: the parent's path on a 128-step grid
    assert np.allclose(
        heights, trajectories(plain, x, steps=16 * PATH_STEPS).straightness().numpy(), atol=1e-9
    )


def test_density_figure_shows_model_truth_and_histogram():
    x = datasets.load("8gaussians", n=3000, seed=0)
    made = [blocks.make("otflow", dim=2, width=8).double()]
    flow = Flow(2, made, steps=2, scale=torch.tensor([2.0, 2.0]).double()).double()  # N(0, 4 I)
    fig = plots.plot_density(flow, x, target="8gaussians", cells=50)
    model_ax, truth_ax, hist_ax = fig.axes[:3]
    model, truth, hist = (ax.get_images()[0].get_array() for ax in (model_ax, truth_ax, hist_ax))
    grid = density_grid(flow, _box_of(model_ax), 50)
    top = grid.log_prob.max()
    assert np.allclose(model, np.clip(grid.log_prob, top - 12, None), atol=1e-9)
    exact = datasets.target("8gaussians").log_prob(grid.centres()).reshape(50, 50)
    assert np.allclose(truth, np.clip(exact, top - 12, None))
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[grid.x_edges, grid.y_edges], density=True)
    assert np.allclose(hist, counts.T)
    mass = float(re.search(r"mass on the box ([0-9.]+)", model_ax.get_title()).group(1))
    assert mass == pytest.approx(grid.mass(), abs=1e-3) and 0.5 < mass < 1.0
    no_truth = plots.plot_density(flow, x, cells=20)
    assert sum(bool(ax.get_images()) for ax in no_truth.axes) == 2


def _box_of(ax):
    x0, x1, y0, y1 = ax.get_images()[0].get_extent()
    return ((x0, x1), (y0, y1))


def test_corner_plot_of_data_and_model_samples(random_otflow):
    flow = _flow(random_otflow, 7, 1)
    x = torch.randn(800, 7, generator=torch.Generator().manual_seed(7)).double() + 2.0
    fig = plots.plot_corner(flow, x)
    assert len(fig.axes) == 36  # the first six of seven coordinates
    grid = np.array(fig.axes).reshape(6, 6)
    for i in range(6):
        for j in range(i):
            assert np.array_equal(_offsets(grid[i, j]), x[:, [j, i]].numpy())
    model = np.column_stack([_offsets(grid[0, j])[:, 0] for j in range(1, 6)])
    assert np.array_equal(_offsets(grid[1, 2])[:, 1], _offsets(grid[1, 3])[:, 1])  # one sample set
    assert abs(model.mean()) < 0.5  # model samples, not the data (mean 2)
    assert len(grid[2, 2].patches) == 2  # data and model marginals


def test_save_figure_writes_atomically(tmp_path, random_otflow):
    fig = plots.plot_trajectories(_flow(random_otflow, 2, 1), torch.randn(20, 2).double())
    save_figure(fig, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]


def test_write_flow_figures_picks_by_dimension(tmp_path, random_otflow):
    two = plots.write_flow_figures(_flow(random_otflow, 2, 2), torch.randn(300, 2).double(), tmp_path)
    assert [p.name for p in two] == [FIGURE_FILES[k] for k in ("pushforward", "trajectories", "density")]
    with pytest.raises(InputError, match="not a directory"):
        plots.write_flow_figures(_flow(random_otflow, 3, 1), torch.randn(300, 3).double(), tmp_path / "3")
    (tmp_path / "3").mkdir()
    three = plots.write_flow_figures(_flow(random_otflow, 3, 1), torch.randn(300, 3).double(), tmp_path / "3")
    assert [p.name for p in three] == [FIGURE_FILES[k] for k in ("pushforward", "trajectories", "corner")]
    assert all(p.is_file() for p in two + three)


TINY = [
    "--n-samples", "2000", "--width", "8", "--depth", "1", "--iters", "10", "--batch-size", "128",
    "--train-steps", "2", "--eval-steps", "2", "--max-blocks", "2", "--ter-eps", "1e-9", "--quiet",
]  # fmt: skip


def test_train_writes_and_plot_redraws_the_figures(tmp_path, capsys):
    out = tmp_path / "run"
    with torch.enable_grad():  # training differentiates (the other tests run without grad)
        assert main(["train", "--data", "checkerboard", "--out", str(out), *TINY]) == 0
    names = [FIGURE_FILES[k] for k in ("pushforward", "trajectories", "density")]
    assert all((out / name).is_file() for name in names)
    assert not (out / FIGURE_FILES["corner"]).exists()
    for name in names:
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in names)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
