"""The accuracy-vs-cost picture: points where their values put them, on a linear or a log axis."""

import numpy as np
import pytest

from flexvlm.plots import COLOURS, MARGIN, WIDTH, accuracy_cost_plot, accuracy_lines_plot


def _centres(image, count):
    """The pixel centre of each of the first ``count`` legend colours, left of the legend."""
    pixels = np.asarray(image)[:, : WIDTH - 200]
    centres = []
    for colour in COLOURS[:count]:
        ys, xs = np.nonzero((pixels == colour).all(axis=-1))
        centres.append((xs.mean(), ys.mean()))
    return centres


@pytest.mark.parametrize("log_x", [False, True])
@pytest.mark.parametrize("cost", ["mflops_per_sample", "prefill_ms"])
def test_points_sit_where_their_cost_and_accuracy_put_them(log_x, cost):
    costs = [1.0, 10.0, 100.0]  # evenly spaced on a log axis, not on a linear one
    rows = [{"config": f"c{i}", "mode": f"m{i}", "selection": "-", "accuracy": acc, cost: value, "other": 5.0}
            for i, (value, acc) in enumerate(zip(costs, [0.2, 0.5, 0.8]))]
    (x0, y0), (x1, y1), (x2, y2) = _centres(accuracy_cost_plot(rows, log_x=log_x, cost=cost), 3)
    middle = (x1 - x0) / (x2 - x0)
    assert middle == pytest.approx(0.5 if log_x else 9 / 99, abs=0.02)
    assert (y1 - y0) / (y2 - y0) == pytest.approx(0.5, abs=0.02)  # accuracy is linear either way
    assert y0 > y1 > y2  # higher accuracy, higher up


def test_budget_lines_join_each_methods_points_in_budget_order():
    """Two methods at three budgets, evenly spaced on the log axis (x4 each): at each budget's column
    a method's colour sits at its accuracy there (heights in the accuracies' proportions), and a line of
    it spans the budgets."""
    series = {"attention": [(0.4, 0.9, 0.0), (0.025, 0.5, 0.0), (0.1, 0.8, 0.05)],
              "fastv": [(0.025, 0.2, 0.0), (0.1, 0.3, 0.0), (0.4, 0.6, 0.0)]}
    pixels = np.asarray(accuracy_lines_plot(series))
    left, right = MARGIN, WIDTH - 200  # the frame
    # the axis spans the budgets' logs padded by 5 % at both ends: columns at 0.05, 0.55, 1.05 of 1.1
    columns = [round(left + (right - left) * f / 1.1) for f in (0.05, 0.55, 1.05)]
    for colour, accuracies in zip(COLOURS[:2], ([0.5, 0.8, 0.9], [0.2, 0.3, 0.6])):
        mine = (pixels == colour).all(axis=-1)
        heights = [np.nonzero(mine[:, c - 2 : c + 3].any(axis=1))[0].mean() for c in columns]
        assert (heights[1] - heights[0]) / (heights[2] - heights[0]) == pytest.approx(
            (accuracies[1] - accuracies[0]) / (accuracies[2] - accuracies[0]), abs=0.08)
        assert heights[0] > heights[2]  # higher accuracy, higher up
        xs = np.nonzero(mine[:, :right].any(axis=0))[0]
        assert xs.min() <= columns[0] and xs.max() >= columns[2]
