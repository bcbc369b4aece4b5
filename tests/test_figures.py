"""The comparison figures: what each draws, from which runs, and that thirty configurations still fit."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from cnnlab.analysis.figures import DPI, FIGURES, MAX_INCHES, drawing, layer_widths, make_figures, read_scalars
from cnnlab.analysis.folders import find_runs
from cnnlab.analysis.names import SEED_KEY, name_runs
from cnnlab.analysis.runs import Run
from cnnlab.analysis.stats import mean_curve
from cnnlab.analysis.summary import rows
from tests.fake_runs import configured, seeded_run, write_events, write_run
from tests.helpers import not_blank


def depth_scalars(rank_start: float, rank_end: float) -> dict[str, list[float]]:
    layers = ("act01_fc", "act02_fc", "act03_fc")
    return {**{f"act_mean/{a}": [0.5, 0.4] for a in layers}, **{f"act_std/{a}": [1.0, 0.9] for a in layers},
            **{f"effective_rank/{a}": [rank_start / (i + 1), rank_end] for i, a in enumerate(layers)}}


def legend_labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_activation_depth_names_the_layers_and_divides_the_effective_rank_by_the_layers_width(tmp_path):
    sweep = tmp_path / "sweep"
    write_events(sweep / "a", "0.1", depth_scalars(30.0, 20.0), None, "model.hidden=[60,30,20]")
    runs = find_runs([str(sweep)])
    scalars = {run.path: read_scalars(run, ("act_mean/", "act_std/", "effective_rank/")) for run in runs}
    figure = FIGURES["activation_depth.png"](drawing(runs, scalars))
    plt.close(figure)
    mean, _, rank = figure.axes
    assert [axis.get_title() for axis in figure.axes] == ["activation mean by layer", "activation std by layer",
                                                          "effective rank / layer width by layer (1 = full rank)"]
    assert [label.get_text() for label in mean.get_xticklabels()] == ["act01_fc", "act02_fc", "act03_fc"]
    start, end = rank.get_lines()  # the first probe faint with open dots, the last in full colour, layer by layer
    assert (start.get_alpha(), end.get_alpha()) == (0.35, 1.0) and start.get_markerfacecolor() == "none"
    assert start.get_linestyle() == end.get_linestyle() == "-"  # the line style is the configuration's (--tune)
    assert list(start.get_xdata()) == [0, 1, 2] and list(start.get_ydata()) == pytest.approx([0.5, 0.5, 0.5])
    assert list(end.get_ydata()) == pytest.approx([20 / 60, 20 / 30, 20 / 20])  # ranks 20 of widths 60, 30, 20
    assert "faint, open dots = first probe" in figure.get_suptitle() and legend_labels(figure) == ["a"]

    scalars = {path: {tag: s for tag, s in series.items() if "rank" not in tag} for path, series in scalars.items()}
    older = FIGURES["activation_depth.png"](drawing(runs, scalars))  # runs from before the rank probe
    plt.close(older)
    assert len(older.axes) == 2


def test_layer_widths_are_a_convnets_channels_then_its_fc_width_and_an_mlps_hidden_widths():
    convnet = Run(Path("/r/c"), {}, None, {"model": "convnet", "model.channels": "[16,32]", "model.fc_hidden": "64"})
    mlp = Run(Path("/r/m"), {}, None, {"model": "mlp", "model.hidden": "[256,128]"})
    assert layer_widths(convnet) == {"act01_conv": 16, "act02_conv": 32, "act03_fc": 64}
    assert layer_widths(mlp) == {"act01_fc": 256, "act02_fc": 128}
    assert layer_widths(Run(Path("/r/x"), {"activation": "relu"}, None)) == {}  # no config: no widths


def test_later_configurations_are_drawn_thinner_so_identical_lines_stay_visible(tmp_path):
    sweep = tmp_path / "sweep"
    for lr in ("0.001", "0.01", "0.1"):  # the same step-0 values in every run
        write_events(sweep / lr, lr, {"val/acc": [0.1, 0.5], "act_mean/act01_fc": [0.5, 0.4]})
    runs = find_runs([str(sweep)])
    figure = FIGURES["val_curves.png"](drawing(runs, {run.path: read_scalars(run, ("val/", "act_")) for run in runs}))
    plt.close(figure)
    widths = [line.get_linewidth() for line in figure.axes[0].get_lines()]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3


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


def test_val_curves_draw_a_line_per_seed_below_five_seeds_and_the_mean_with_a_band_from_five():
    from matplotlib.collections import PolyCollection

    runs = [seeded_run("relu", seed) for seed in range(5)] + [seeded_run("elu", 0), seeded_run("elu", 1)]
    name_runs(runs)
    train = {r.path: [2.0 + 0.1 * i, 1.0 + 0.1 * i, 0.5 + 0.1 * i] for i, r in enumerate(runs)}
    scalars = {r.path: {"train/loss": ([0, 5, 10], train[r.path]), "val/loss": ([10], [0.9]),
                        "val/acc": ([10], [0.6])} for r in runs}
    figure = FIGURES["val_curves.png"](drawing(runs, scalars))
    plt.close(figure)
    training, loss, _ = figure.axes
    assert "the mean over trainer.log_every" in training.get_title() and "one point per epoch" in loss.get_title()
    relu_mean, *elu_seeds = training.get_lines()
    assert list(relu_mean.get_xdata()) == [0, 5, 10] and list(relu_mean.get_ydata()) == pytest.approx([2.2, 1.2, 0.7])
    assert [list(line.get_ydata()) for line in elu_seeds] == [pytest.approx(train[r.path]) for r in runs[5:]]
    assert all(line.get_linewidth() < relu_mean.get_linewidth() for line in elu_seeds)  # seeds: thin lines
    assert sum(isinstance(c, PolyCollection) for c in training.collections) == 1  # a band for relu's five seeds only
    assert "one thin line per seed below 5 seeds" in figure.get_suptitle()
    band = next(c for c in training.collections if isinstance(c, PolyCollection))
    low, high = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    half = mean_curve([([0, 5, 10], train[r.path]) for r in runs[:5]]).ci95
    assert (low, high) == pytest.approx((0.7 - half[-1], 2.2 + half[0]))  # the band is the mean's interval


def test_training_loss_points_each_average_log_every_steps_across_epoch_ends():
    runs = [seeded_run("relu", 0)]
    runs[0].settings["trainer.log_every"] = "10"
    name_runs(runs)
    # 7 steps an epoch: logged at 7 (epoch end), 10, 14 (end), 20, 21 (end): the windows 7 and 3 steps long
    steps, losses = [7, 10, 14, 20, 21], [1.0, 2.0, 1.0, 1.0, 0.1]
    figure = FIGURES["val_curves.png"](drawing(runs, {runs[0].path: {"train/loss": (steps, losses)}}))
    plt.close(figure)
    (line,) = figure.axes[0].get_lines()
    assert list(line.get_xdata()) == [10, 20]  # the last window, one step long, is dropped: no fake dip
    assert list(line.get_ydata()) == pytest.approx([(7 * 1.0 + 3 * 2.0) / 10, (4 * 1.0 + 6 * 1.0) / 10])


def test_test_accuracy_zooms_to_the_results_with_the_mean_its_whisker_and_each_seed():
    runs = [seeded_run("relu", seed, test_acc=acc) for seed, acc in enumerate((0.9450, 0.9455, 0.9460))]
    runs += [seeded_run("elu", seed, test_acc=acc) for seed, acc in enumerate((0.9465, 0.9470, 0.9475))]
    name_runs(runs)
    figure = FIGURES["test_accuracy.png"](drawing(runs, {r.path: {"val/acc": ([1], [0.5])} for r in runs}))
    plt.close(figure)
    (axis,) = figure.axes
    low, high = axis.get_xlim()
    half = 4.302653 * 0.0005 / 3 ** 0.5  # t(0.975, 2) s / sqrt(3)
    assert low < 0.9455 - half and high > 0.9470 + half and high - low < 0.02  # zoomed, whiskers inside
    assert not axis.patches  # no bars from 0
    seeds = [collection.get_offsets()[:, 0].tolist() for collection in axis.collections if len(collection.get_offsets()) == 3]
    assert seeds == [pytest.approx([0.9450, 0.9455, 0.9460]), pytest.approx([0.9465, 0.9470, 0.9475])]
    means = [line.get_xdata()[0] for line in axis.get_lines() if line.get_marker() == "o"]
    assert means == pytest.approx([0.9455, 0.9470])


def test_test_accuracy_axis_stops_at_an_accuracy_of_one_where_two_seeds_give_a_wide_interval():
    runs = [seeded_run("relu", seed, test_acc=acc) for seed, acc in enumerate((0.995, 1.0))]  # t(0.975, 1) = 12.7
    name_runs(runs)
    figure = FIGURES["test_accuracy.png"](drawing(runs, {r.path: {"val/acc": ([1], [0.5])} for r in runs}))
    plt.close(figure)
    low, high = figure.axes[0].get_xlim()
    assert 1.0 < high <= 1.0 + 0.08 * (1.0 - low) + 1e-9 and low > 0.9  # not out to 1.03: no accuracy lies there


def test_dead_fraction_leaves_out_configurations_without_a_dead_unit_and_says_so():
    runs = [seeded_run("relu", 0), seeded_run("elu", 0), seeded_run("gelu", 0)]
    name_runs(runs)
    dead = {"relu": [0.0, 0.3], "elu": [0.0, 0.0], "gelu": [0.0, 0.0]}
    scalars = {r.path: {f"dead_fraction/act0{i}_fc": ([0, 10], dead[r.settings["activation"]]) for i in (1, 2)}
               for r in runs}
    figure = FIGURES["dead_fraction.png"](drawing(runs, scalars))
    plt.close(figure)
    assert [axis.get_title() for axis in figure.axes] == ["activation=relu"]
    assert "left out, no dead unit at any probe: activation=elu; activation=gelu" in figure.get_suptitle().replace("\n", " ")
    none_dead = {path: {tag: (steps, [0.0, 0.0]) for tag, (steps, _) in series.items()} for path, series in scalars.items()}
    figure = FIGURES["dead_fraction.png"](drawing(runs, none_dead))
    plt.close(figure)
    assert "no dead unit at any probe, in any of the 3 configurations" in [t.get_text() for t in figure.axes[0].texts]


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
        if filename == "tuning.png":  # only with --tune
            assert figure is None
            continue
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
