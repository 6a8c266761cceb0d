"""loss.svg: the train and eval loss curves of a run, as a dependency-free SVG."""

from __future__ import annotations

import html
import math
from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 360, 48
SERIES = (("loss", "train loss", "#1f77b4"), ("eval_loss", "eval loss", "#d62728"))


def write_loss_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """Plot `loss` and `eval_loss` of metrics.jsonl rows against `step`."""
    points = {key: [(row["step"], row[key]) for row in rows if row.get(key) is not None] for key, _, _ in SERIES}
    values = [value for series in points.values() for _, value in series]
    steps = [step for series in points.values() for step, _ in series]
    if not values:
        return
    # A loss that falls by orders of magnitude is flat at the bottom on a linear axis: use a
    # log axis once the curves span more than a decade, so the late steps stay readable.
    log_axis = min(values) > 0 and max(values) / min(values) > 10
    scale = math.log10 if log_axis else float
    low, high = scale(min(values)), scale(max(values))
    high = high if high > low else low + 1.0
    last_step = max(max(steps), 1)

    def x(step: float) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * step / last_step

    def y(value: float) -> float:
        return HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (scale(value) - low) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">{html.escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">'
        f"optimizer step (0 .. {last_step}); loss{' (log scale)' if log_axis else ''}</text>",
    ]
    for tick in ticks(min(values), max(values), log_axis):
        parts.append(
            f'<line x1="{MARGIN}" y1="{y(tick):.1f}" x2="{WIDTH - MARGIN}" y2="{y(tick):.1f}" stroke="#dddddd"/>'
        )
        parts.append(f'<text x="{MARGIN - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    for index, (key, label, colour) in enumerate(SERIES):
        series = points[key]
        if not series:
            continue
        coordinates = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in series)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(series) < 40:
            parts += [
                f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}"/>' for step, value in series
            ]
        parts.append(
            f'<text x="{WIDTH - MARGIN}" y="{MARGIN + 16 * index}" text-anchor="end" fill="{colour}">{label}</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def ticks(low: float, high: float, log_axis: bool) -> list[float]:
    """Gridline values: each power of ten inside [low, high] on a log axis, else the two ends
    and the middle."""
    if not log_axis:
        return [low, (low + high) / 2, high] if high > low else [low]
    return [10.0**power for power in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
