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


def panel_of(svg: str, key: str) -> tuple[int, list[tuple[float, float]]]:
    """(the panel's index, the points) of the curve drawn for metrics key `key`."""
    panels = svg.split('<g transform="translate(0,')[1:]
    for index, panel in enumerate(panels):
        match = re.search(rf'<polyline points="([^"]+)"[^>]*data-key="{re.escape(key)}"', panel)
        if match:
            return index, [tuple(map(float, pair.split(","))) for pair in match.group(1).split()]
    raise AssertionError(f"no curve for {key}")


def preference_rows(objective: str) -> list[dict]:
    """metrics.jsonl rows of a preference run: what the loop writes for dpo (and orpo)."""
    orpo = objective == "orpo"
    rows = [{"step": 0, "eval_loss": 0.69, "eval_rewards/accuracy": 0.0, "eval_rewards/margin": 0.0}]
    for step in range(1, 5):
        row = {"step": step, "loss": 0.69 - 0.1 * step, "rewards/accuracy": 0.25 * step, "rewards/margin": 0.2 * step}
        if orpo:
            row.update({"log_odds_ratio": -0.7 + 0.1 * step, "nll_loss": 4.0 / step})
        if step % 2 == 0:
            row.update(
                {"eval_loss": 0.7 - 0.1 * step, "eval_rewards/accuracy": 0.2 * step, "eval_rewards/margin": step}
            )
            if orpo:
                row.update({"eval_log_odds_ratio": -0.6, "eval_nll_loss": 3.0 / step})
        rows.append(row)
    return rows


def test_a_dpo_run_gets_reward_accuracy_and_margin_panels_below_the_loss(tmp_path):
    write_loss_plot(preference_rows("dpo"), tmp_path / "loss.svg", title="dpo")
    svg = (tmp_path / "loss.svg").read_text()
    assert 'height="1080"' in svg and svg.count("<g transform=") == 3  # loss, accuracy, margin
    assert [panel_of(svg, key)[0] for key in ("loss", "eval_loss")] == [0, 0]
    assert [panel_of(svg, key)[0] for key in ("rewards/accuracy", "eval_rewards/accuracy")] == [1, 1]
    assert [panel_of(svg, key)[0] for key in ("rewards/margin", "eval_rewards/margin")] == [2, 2]
    _, accuracy = panel_of(svg, "rewards/accuracy")
    _, evals = panel_of(svg, "eval_rewards/accuracy")
    assert len(accuracy) == 4 and len(evals) == 3  # train steps 1-4; evals at 0, 2 and 4
    # One step axis for all panels: step 4 is at the same x in each; accuracy rises (y falls).
    assert accuracy[-1][0] == evals[-1][0] == panel_of(svg, "loss")[1][-1][0]
    assert accuracy[0][1] > accuracy[-1][1]
    assert "rewards/accuracy: train and eval" in svg and "log_odds_ratio" not in svg


def test_an_orpo_run_also_gets_its_log_odds_ratio_and_nll(tmp_path):
    write_loss_plot(preference_rows("orpo"), tmp_path / "loss.svg")
    svg = (tmp_path / "loss.svg").read_text()
    assert svg.count("<g transform=") == 5
    assert [panel_of(svg, key)[0] for key in ("log_odds_ratio", "eval_log_odds_ratio", "nll_loss")] == [3, 3, 4]
    nll_panel = svg.split('<g transform="translate(0,')[5]
    assert "(log scale)" not in nll_panel and len(panel_of(svg, "eval_nll_loss")[1]) == 2
