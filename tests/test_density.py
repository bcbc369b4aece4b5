import matplotlib
import numpy as np
import pytest
import torch

from cnnlab.instruments.density import density_column, density_image, write_density_png

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


def test_density_image_puts_high_values_at_the_top_later_probes_right_and_log_counts_in_colour():
    first = density_column(torch.tensor([0.9] * 100), low=-1.0, high=1.0, bins=4)  # 100 in the top bucket
    second = density_column(torch.tensor([-0.9, -0.9, -0.9, 0.1]), low=-1.0, high=1.0, bins=4)
    image = density_image([first, second])
    assert image.shape == (4, 2, 3) and image.dtype == np.uint8
    assert (image[0, 0] == colour(1.0)).all()  # the fullest bucket: top row, first probe
    assert (image[3, 1] == colour(np.log1p(3) / np.log1p(100))).all()  # 3 low values, second probe
    assert (image[1, 1] == colour(np.log1p(1) / np.log1p(100))).all()  # the one at 0.1
    for row, column in ((1, 0), (2, 0), (3, 0), (0, 1), (2, 1)):  # empty buckets: the lowest colour
        assert (image[row, column] == colour(0.0)).all()
    assert (density_image(torch.stack([first, second])) == image).all()  # a [steps, bins] tensor too


def test_density_image_of_nothing_counted_is_the_lowest_colour():
    image = density_image(torch.zeros(3, 5))
    assert image.shape == (5, 3, 3) and (image == colour(0.0)).all()


def test_write_density_png_writes_a_png_figure_with_the_real_steps(tmp_path):
    from PIL import Image

    columns = [density_column(torch.randn(500) * (1 + step / 100), -3.0, 3.0, 32) for step in (0, 100, 200, 237)]
    path = write_density_png(tmp_path / "act01_fc.png", columns, [0, 100, 200, 237], -3.0, 3.0, "act01_fc")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (800, 450)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    with pytest.raises(ValueError, match="3 steps for 4 columns"):
        write_density_png(tmp_path / "bad.png", columns, [0, 100, 200], -3.0, 3.0, "bad")
