import matplotlib
import numpy as np
import pytest
import torch

from cnnlab.instruments.density import cell_edges, density_column, render_density, write_png

VIRIDIS = matplotlib.colormaps["viridis"]


def colour(value: float) -> np.ndarray:
    return (np.asarray(VIRIDIS(value)[:3]) * 255).round().astype(np.uint8)


def test_density_column_counts_values_in_even_buckets_over_the_fixed_range():
    # Buckets over [-1, 1]: [-1, -0.5), [-0.5, 0), [0, 0.5), [0.5, 1]; 2.0 is past the top.
    counts = density_column(torch.tensor([-0.9, -0.1, 0.1, 0.6, 2.0]), low=-1.0, high=1.0, bins=4)
    assert counts.dtype == torch.float64
    assert counts.tolist() == [1, 1, 1, 2]


def test_density_column_clamps_values_beyond_the_range_into_the_edge_buckets_and_skips_nan():
    values = torch.tensor([[-5.0, -float("inf"), float("nan")], [3.0, float("inf"), 0.25]])
    assert density_column(values, low=-1.0, high=1.0, bins=4).tolist() == [2, 0, 1, 2]


def test_density_column_counts_every_element_past_the_float32_limit():
    # Chunks of 3 stand in for 2**24: a tiny tensor takes several, and they must add up.
    counts = density_column(torch.linspace(0, 1, 11), low=0.0, high=1.0, bins=2, chunk=3)
    assert counts.tolist() == [5, 6]
    with pytest.raises(ValueError, match="empty"):
        density_column(torch.zeros(3), low=1.0, high=1.0, bins=2)


def test_the_density_figure_puts_high_values_at_the_top_and_later_probes_to_the_right():
    top = density_column(torch.tensor([0.9] * 100), low=-1.0, high=1.0, bins=4)  # 100 in the top bucket
    bottom = density_column(torch.tensor([-0.9] * 100), low=-1.0, high=1.0, bins=4)  # 100 in the bottom one
    image = render_density([top, bottom], [0, 400], -1.0, 1.0, "act01_fc")
    assert image.shape == (450, 800, 3) and image.dtype == np.uint8
    fullest = np.all(np.abs(image.astype(int) - colour(1.0)) <= 2, axis=-1)  # the colour of the fullest bucket
    rows, columns = np.nonzero(fullest[:, :660])  # the plot, left of the colour bar (which starts at about 675)
    middle = (columns.min() + columns.max()) / 2  # probe steps 0 and 400: cells meet at 200, the plot's middle
    first, second = columns < middle, columns > middle
    assert first.sum() > 1000 and second.sum() > 1000
    assert rows[first].max() < rows[second].min()  # the first probe's values above the second's


def test_the_density_figure_runs_over_the_probed_steps_only():
    assert cell_edges(np.array([0.0, 85.0])).tolist() == [0.0, 42.5, 85.0]  # not from -42.5: no "probe step -40"
    assert cell_edges(np.array([0.0, 100.0, 200.0, 237.0])).tolist() == [0.0, 50.0, 150.0, 218.5, 237.0]
    assert cell_edges(np.array([300.0])).tolist() == [299.5, 300.5]


def test_write_png_writes_the_rendered_figure_as_a_png(tmp_path):
    from PIL import Image

    columns = [density_column(torch.randn(500) * (1 + step / 100), -3.0, 3.0, 32) for step in (0, 100, 200, 237)]
    image = render_density(columns, [0, 100, 200, 237], -3.0, 3.0, "act01_fc")
    path = write_png(tmp_path / "act01_fc.png", image)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == (800, 450)
        assert (np.asarray(written.convert("RGB")) == image).all()
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    with pytest.raises(ValueError, match="3 steps for 4 columns"):
        render_density(columns, [0, 100, 200], -3.0, 3.0, "bad")
