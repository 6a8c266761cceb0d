"""loss.svg: a log axis when the loss falls by orders of magnitude, a linear one otherwise."""

import re

from qlora.training.plot import write_loss_plot


def labels(svg: str) -> list[str]:
    return re.findall(r'text-anchor="end">([^<]+)</text>', svg)


def test_a_loss_falling_by_decades_gets_a_log_axis(tmp_path):
    rows = (
        [{"step": 0, "eval_loss": 8.0}]
        + [{"step": step, "loss": 8.0 / 2**step} for step in range(1, 11)]
        + [{"step": 10, "eval_loss": 0.02}]
    )
    write_loss_plot(rows, tmp_path / "loss.svg", title="a <b> & c")
    svg = (tmp_path / "loss.svg").read_text()
    assert "(log scale)" in svg and "a &lt;b&gt; &amp; c" in svg
    assert [label for label in labels(svg) if label[0].isdigit()] == ["0.01", "0.1", "1"]  # losses span 0.0078 .. 8
    # Equal ratios are equal heights: 8 -> 4 and 0.5 -> 0.25 rise by the same amount.
    points = [
        tuple(map(float, pair.split(",")))
        for pair in re.search(r'<polyline points="([^"]+)" fill="none" stroke="#1f77b4"', svg).group(1).split()
    ]
    assert abs((points[1][1] - points[0][1]) - (points[5][1] - points[4][1])) < 0.2


def test_a_narrow_loss_range_stays_linear(tmp_path):
    write_loss_plot([{"step": step, "loss": 2.0 - 0.1 * step} for step in range(5)], tmp_path / "loss.svg")
    svg = (tmp_path / "loss.svg").read_text()
    assert "log scale" not in svg and svg.count("<polyline") == 1
