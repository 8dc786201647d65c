"""The accuracy-vs-cost picture: points where their values put them, on a linear or a log axis."""

import numpy as np
import pytest

from flexvlm.plots import COLOURS, WIDTH, accuracy_flops_plot


def _centres(image, count):
    """The pixel centre of each of the first ``count`` legend colours, left of the legend."""
    pixels = np.asarray(image)[:, : WIDTH - 200]
    centres = []
    for colour in COLOURS[:count]:
        ys, xs = np.nonzero((pixels == colour).all(axis=-1))
        centres.append((xs.mean(), ys.mean()))
    return centres


@pytest.mark.parametrize("log_x", [False, True])
def test_points_sit_where_their_cost_and_accuracy_put_them(log_x):
    costs = [1.0, 10.0, 100.0]  # evenly spaced on a log axis, not on a linear one
    rows = [{"config": f"c{i}", "mode": f"m{i}", "selection": "-", "accuracy": acc, "mflops_per_sample": cost}
            for i, (cost, acc) in enumerate(zip(costs, [0.2, 0.5, 0.8]))]
    (x0, y0), (x1, y1), (x2, y2) = _centres(accuracy_flops_plot(rows, log_x=log_x), 3)
    middle = (x1 - x0) / (x2 - x0)
    assert middle == pytest.approx(0.5 if log_x else 9 / 99, abs=0.02)
    assert (y1 - y0) / (y2 - y0) == pytest.approx(0.5, abs=0.02)  # accuracy is linear either way
    assert y0 > y1 > y2  # higher accuracy, higher up
