"""loss.svg: the train and eval loss curves of a run, as a dependency-free SVG; for a preference
run (dpo, orpo) one panel more per curve people watch: reward accuracy and margin (ORPO also its
log odds ratio and NLL), train and eval, below the loss on the same step axis."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 360, 48
TRAIN, EVAL = "#1f77b4", "#d62728"


@dataclass(frozen=True)
class Panel:
    what: str
    """The y axis: the metric's name in metrics.jsonl (its eval twin is eval_<name>)."""
    log_allowed: bool
    """A loss may fall by decades (a log axis then); an accuracy or a margin stays linear."""

    @property
    def series(self) -> tuple[tuple[str, str, str], ...]:
        """(metrics key, legend, colour) of the train and the eval curve."""
        label = "loss" if self.what == "loss" else self.what
        return (self.what, f"train {label}", TRAIN), (f"eval_{self.what}", f"eval {label}", EVAL)


# The loss first; the preference panels only where a run wrote their metrics.
PANELS = (
    Panel("loss", True),
    Panel("rewards/accuracy", False),
    Panel("rewards/margin", False),
    Panel("log_odds_ratio", False),
    Panel("nll_loss", True),
)


def write_loss_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Plot `loss` and `eval_loss` of metrics.jsonl rows against `step`, and each preference
    panel whose metrics the rows hold."""
    points = {
        panel: {
            key: [(row["step"], row[key]) for row in rows if row.get(key) is not None] for key, _, _ in panel.series
        }
        for panel in PANELS
    }
    shown = [panel for panel in PANELS if any(points[panel].values())]
    if not shown:
        return
    last_step = max(max(step for series in points[panel].values() for step, _ in series) for panel in shown)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT * len(shown)}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT * len(shown)}" fill="white"/>',
    ]
    for index, panel in enumerate(shown):
        parts.append(f'<g transform="translate(0,{HEIGHT * index})">')
        heading = title if index == 0 else f"{panel.what}: train and eval"
        parts += panel_parts(panel, points[panel], max(last_step, 1), heading)
        parts.append("</g>")
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def panel_parts(panel: Panel, points: dict, last_step: int, heading: str) -> list[str]:
    """One panel's SVG elements, in a WIDTH x HEIGHT box."""
    values = [value for series in points.values() for _, value in series]
    # A loss that falls by orders of magnitude is flat at the bottom on a linear axis: use a
    # log axis once the curves span more than a decade, so the late steps stay readable.
    log_axis = panel.log_allowed and min(values) > 0 and max(values) / min(values) > 10
    scale = math.log10 if log_axis else float
    low, high = scale(min(values)), scale(max(values))
    high = high if high > low else low + 1.0

    def x(step: float) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * step / last_step

    def y(value: float) -> float:
        return HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (scale(value) - low) / (high - low)

    parts = [
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">{html.escape(heading)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">'
        f"optimizer step (0 .. {last_step}); {html.escape(panel.what)}{' (log scale)' if log_axis else ''}</text>",
    ]
    for tick in ticks(min(values), max(values), log_axis):
        parts.append(
            f'<line x1="{MARGIN}" y1="{y(tick):.1f}" x2="{WIDTH - MARGIN}" y2="{y(tick):.1f}" stroke="#dddddd"/>'
        )
        parts.append(f'<text x="{MARGIN - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    for index, (key, label, colour) in enumerate(panel.series):
        series = points[key]
        if not series:
            continue
        coordinates = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in series)
        parts.append(
            f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2" '
            f'data-key="{html.escape(key)}"/>'
        )
        if len(series) < 40:
            parts += [
                f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}"/>' for step, value in series
            ]
        # Above the plot area, train on the left and eval on the right: never over a curve at its top.
        anchor, left = ("start", MARGIN) if index == 0 else ("end", WIDTH - MARGIN)
        parts.append(
            f'<text x="{left}" y="{MARGIN - 8}" text-anchor="{anchor}" fill="{colour}">{html.escape(label)}</text>'
        )
    return parts


def ticks(low: float, high: float, log_axis: bool) -> list[float]:
    """Gridline values: each power of ten inside [low, high] on a log axis, else the two ends
    and the middle."""
    if not log_axis:
        return [low, (low + high) / 2, high] if high > low else [low]
    return [10.0**power for power in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
