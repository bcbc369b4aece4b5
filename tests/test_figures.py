"""The comparison figures: what each draws, from which runs, and that thirty configurations still fit."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from cnnlab.analysis.figures import DPI, FIGURES, MAX_INCHES, drawing, make_figures, read_scalars
from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.stats import mean_curve
from cnnlab.analysis.names import SEED_KEY, name_runs
from cnnlab.analysis.runs import Run
from cnnlab.analysis.summary import rows
from tests.fake_runs import configured, seeded_run, write_events, write_run
from tests.helpers import not_blank


def depth_scalars(rank_start: float, rank_end: float) -> dict[str, list[float]]:
    layers = ("act01_fc", "act02_fc", "act03_fc")
    return {**{f"act_mean/{a}": [0.5, 0.4] for a in layers}, **{f"act_std/{a}": [1.0, 0.9] for a in layers},
            **{f"effective_rank/{a}": [rank_start / (i + 1), rank_end] for i, a in enumerate(layers)}}


def legend_labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_activation_depth_gains_an_effective_rank_panel_when_runs_log_it(tmp_path):
    runs = find_runs([str(write_events(tmp_path / "sweep" / "a", "0.1", depth_scalars(30.0, 20.0)).parent)])
    scalars = {run.path: read_scalars(run, ("act_mean/", "act_std/", "effective_rank/")) for run in runs}
    figure = FIGURES["activation_depth.png"](drawing(runs, scalars))
    plt.close(figure)
    assert [axis.get_title() for axis in figure.axes] == ["activation mean by depth", "activation std by depth",
                                                          "effective rank of the activations by depth"]
    start, end = figure.axes[2].get_lines()  # the first probe dashed, the last solid, layer by layer
    assert (start.get_linestyle(), end.get_linestyle()) == ("--", "-")
    assert list(start.get_xdata()) == [1, 2, 3] and list(start.get_ydata()) == pytest.approx([30, 15, 10])
    assert list(end.get_ydata()) == pytest.approx([20, 20, 20])
    assert "dashed = first probe" in figure.get_suptitle() and legend_labels(figure) == ["a"]

    scalars = {path: {tag: s for tag, s in series.items() if "rank" not in tag} for path, series in scalars.items()}
    older = FIGURES["activation_depth.png"](drawing(runs, scalars))  # runs from before the rank probe
    plt.close(older)
    assert len(older.axes) == 2


def test_sharpness_figure_is_drawn_only_when_some_run_estimated_sharpness(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "lr=0.01", "0.01", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                             "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "lr=0.04", "0.04", {"val/acc": [0.5], "sharpness/top_eigenvalue": [5.0, 45.0, 52.0]})
    written = make_figures(find_runs([str(sweep)]), tmp_path / "with")
    assert [path.name for path in written] == ["val_curves.png", "test_accuracy.png", "sharpness.png"]
    assert not_blank(tmp_path / "with" / "sharpness.png")

    write_events(tmp_path / "plain" / "a", "0.1", {"val/acc": [0.5, 0.6]})
    written = make_figures(find_runs([str(tmp_path / "plain")]), tmp_path / "without")
    assert [path.name for path in written] == ["val_curves.png", "test_accuracy.png"]  # no probes: nothing else
    assert not (tmp_path / "without" / "sharpness.png").exists()


def test_sharpness_figure_draws_the_eigenvalue_solid_and_the_stability_limit_dashed_in_one_colour(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "sgd", "0.01", {"sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                         "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "adam", "0.001", {"sharpness/top_eigenvalue": [3.0, 4.0, 5.0]})  # no limit: not SGD
    runs = find_runs([str(sweep)])
    scalars = {run.path: read_scalars(run, ("sharpness/",)) for run in runs}
    figure = FIGURES["sharpness.png"](drawing(runs, scalars))
    plt.close(figure)
    (axis,) = figure.axes
    assert legend_labels(figure) == ["lr=0.001", "lr=0.01"]  # one entry per configuration
    adam, eigenvalue, limit = axis.get_lines()
    assert (eigenvalue.get_linestyle(), limit.get_linestyle()) == ("-", "--")
    assert eigenvalue.get_color() == limit.get_color() != adam.get_color()
    assert list(eigenvalue.get_xdata()) == [0, 10, 20] and list(limit.get_ydata()) == [200, 200, 200]
    assert axis.get_yscale() == "log" and "SGD's stability limit" in axis.get_title()


def test_sharpness_figure_gives_adams_preconditioned_sharpness_a_panel_with_its_own_limit(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "sgd", "0.01", {"sharpness/top_eigenvalue": [5.0, 50.0, 190.0],
                                         "sharpness/stability_limit": [200.0, 200.0, 200.0]})
    write_events(sweep / "adam", "0.001", {"sharpness/top_eigenvalue": [3.0, 4.0, 5.0],
                                           "sharpness/preconditioned_eigenvalue": [900.0, 3000.0, 3700.0],
                                           "sharpness/preconditioned_limit": [3800.0, 3800.0, 3800.0]})
    runs = find_runs([str(sweep)])
    scalars = {run.path: read_scalars(run, ("sharpness/",)) for run in runs}
    figure = FIGURES["sharpness.png"](drawing(runs, scalars))
    plt.close(figure)
    hessian, preconditioned = figure.axes
    assert "P^-1 H" in preconditioned.get_title() and "SGD" in hessian.get_title()
    assert len(hessian.get_lines()) == 3  # Adam's raw sharpness (no limit), SGD's and its limit
    eigenvalue, limit = preconditioned.get_lines()  # Adam's run alone
    assert list(eigenvalue.get_ydata()) == [900, 3000, 3700] and list(limit.get_ydata()) == [3800] * 3
    assert (eigenvalue.get_linestyle(), limit.get_linestyle()) == ("-", "--")
    assert eigenvalue.get_color() == limit.get_color() == hessian.get_lines()[0].get_color()
    assert legend_labels(figure) == ["lr=0.001", "lr=0.01"]


def test_runs_that_never_trained_are_left_out_of_the_figures_and_listed_in_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "a", "0.01", {"val/acc": [0.5, 0.6], "dead_fraction/act01_fc": [0.1, 0.2]})
    write_events(sweep / "b", "0.1", {"val/acc": [0.4, 0.5], "dead_fraction/act01_fc": [0.3, 0.4]})
    write_run(sweep / "c", "- optimizer.lr=-1\n", '{"status": "invalid", "error": "optimizer.lr must be > 0"}')
    write_run(sweep / "d", "- optimizer.lr=10\n", '{"status": "failed", "error": "no data"}')  # before any probe
    runs = find_runs([str(sweep)])
    written = make_figures(runs, tmp_path / "out")
    scalars = {run.path: read_scalars(run, ("val/", "dead_fraction/")) for run in runs}
    d = drawing(runs, scalars)
    assert list(d.groups) == ["lr=0.01", "lr=0.1"]
    figure = FIGURES["val_curves.png"](d)
    plt.close(figure)
    assert legend_labels(figure) == ["lr=0.01", "lr=0.1"]
    assert [row["status"] for row in rows(runs)] == ["completed", "completed", "invalid", "failed"]
    assert "dead_fraction.png" in [path.name for path in written]


def test_val_curves_draw_the_training_loss_per_log_step_and_a_confidence_band_over_seeds():
    from matplotlib.collections import PolyCollection

    runs = [seeded_run("relu", 0), seeded_run("relu", 1), seeded_run("elu", 0)]
    name_runs(runs)
    train = {"relu-0": [2.0, 1.0, 0.5], "relu-1": [2.2, 1.2, 0.7], "elu-0": [2.0, 1.5, 1.0]}
    scalars = {r.path: {"train/loss": ([0, 5, 10], train[r.path.name]), "val/loss": ([10], [0.9]),
                        "val/acc": ([10], [0.6])} for r in runs}
    figure = FIGURES["val_curves.png"](drawing(runs, scalars))
    plt.close(figure)
    training, loss, accuracy = figure.axes
    assert "every trainer.log_every steps" in training.get_title() and "one point per epoch" in loss.get_title()
    relu_line, elu_line = training.get_lines()
    assert list(relu_line.get_xdata()) == [0, 5, 10] and list(relu_line.get_ydata()) == pytest.approx([2.1, 1.1, 0.6])
    assert sum(isinstance(c, PolyCollection) for c in training.collections) == 1  # a band for relu's two seeds only
    assert "band = 95% confidence interval" in figure.get_suptitle()
    band = next(c for c in training.collections if isinstance(c, PolyCollection))
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    half = mean_curve([([0, 5, 10], train["relu-0"]), ([0, 5, 10], train["relu-1"])]).ci95
    assert (low, high) == pytest.approx((0.6 - half[-1], 2.1 + half[0]))  # the band is the mean's interval


def many_runs(count: int) -> tuple[list[Run], dict]:
    """`count` configurations, two seeds each, with long names and every series the figures read."""
    runs, scalars = [], {}
    layers = [f"act{i:02d}_fc" for i in range(1, 4)]
    for i in range(count):
        for seed in (0, 1):
            settings = {"activation": ["relu", "leaky_relu", "elu"][i % 3], "optimizer.lr": f"{0.001 * (i + 1):g}",
                        "model.hidden": "[256,256,256,256]", "model.init": ["kaiming", "orthogonal"][i % 2],
                        "dataset.noise": str(i // 6 / 10), SEED_KEY: str(seed)}
            r = Run(Path(f"/runs/{i}-{seed}"), settings, {"status": "completed", "test_acc": 0.5 + 0.01 * i + 0.005 * seed})
            runs.append(r)
            steps = list(range(0, 100, 20))
            scalars[r.path] = {"train/loss": (steps, [2.0 / (1 + s + i) for s in steps]),
                               "val/loss": ([50, 100], [1.0, 0.8]), "val/acc": ([50, 100], [0.5, 0.6 + 0.01 * seed]),
                               "sharpness/top_eigenvalue": (steps, [10.0 + s for s in steps]),
                               **{f"{kind}/{layer}": (steps, [0.1 * seed + 0.01 * s for s in steps])
                                  for kind in ("dead_fraction", "act_mean", "act_std", "effective_rank")
                                  for layer in layers}}
    name_runs(runs)
    return runs, scalars


def assert_fits(figure) -> None:
    """Every panel (its title, tick labels and axis labels as drawn), legend and the title lie inside the figure."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    for part in [*figure.axes, *figure.legends, figure._suptitle]:
        extent = part.get_tightbbox(renderer)
        assert (extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1
                and extent.y1 <= box.y1 + 1), (part, extent, box)


def test_figures_of_thirty_configurations_are_bounded_fit_their_labels_and_list_each_configuration_once():
    from PIL import Image

    runs, scalars = many_runs(30)
    d = drawing(runs, scalars)
    assert len(d.groups) == 30 and len(set(map(str, d.colours.values()))) == 30  # 30 distinct colours
    for filename, draw in FIGURES.items():
        figure = draw(d)
        width, height = figure.get_size_inches()
        assert width <= MAX_INCHES and height <= MAX_INCHES, filename
        assert_fits(figure)
        if filename in ("val_curves.png", "activation_depth.png", "sharpness.png"):
            assert legend_labels(figure) == [d.labels[name] for name in d.groups], filename
        if filename == "test_accuracy.png":
            assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == list(d.labels.values())
        if filename == "dead_fraction.png":
            assert len(figure.axes) == 30 and legend_labels(figure) == ["act01_fc", "act02_fc", "act03_fc"]
        if filename == "dead_fraction.png":  # the largest: its PNG as make_figures writes it
            png = io.BytesIO()
            figure.savefig(png, dpi=DPI)
            with Image.open(png) as image:
                assert image.size == (1600, round(height * DPI)) and image.size[1] <= MAX_INCHES * DPI
        plt.close(figure)


def test_figures_name_the_settings_every_run_shares_in_their_subtitle(tmp_path):
    configured(tmp_path / "a", "activation=elu", "trainer.epochs=3")
    configured(tmp_path / "b", "activation=relu", "trainer.epochs=3")
    runs = find_runs([str(tmp_path)])
    d = drawing(runs, {run.path: {"val/acc": ([10], [0.5])} for run in runs})
    assert d.fixed == "dataset=fake, model=mlp, hidden=[32], optimizer=adam, lr=0.001, epochs=3, batch_size=32"
    figure = FIGURES["test_accuracy.png"](d)
    plt.close(figure)
    assert "fixed: dataset=fake, model=mlp" in figure.get_suptitle()
    assert "activation" not in figure.get_suptitle()  # it differs: it is in the names
