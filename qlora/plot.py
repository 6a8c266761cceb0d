"""loss.svg: the train and eval loss curves of a run, as a dependency-free SVG."""

from __future__ import annotations

import html
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
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    last_step = max(max(steps), 1)

    def x(step: float) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * step / last_step

    def y(value: float) -> float:
        return HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (value - low) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="20" text-anchor="middle">{html.escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">optimizer step (0 .. {last_step})</text>',
        f'<text x="{MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{high:.3g}</text>',
        f'<text x="{MARGIN - 4}" y="{HEIGHT - MARGIN}" text-anchor="end">{low:.3g}</text>',
    ]
    for index, (key, label, colour) in enumerate(SERIES):
        series = points[key]
        if not series:
            continue
        coordinates = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in series)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(series) < 40:
            parts += [f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}"/>' for step, value in series]
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{MARGIN + 16 * index}" text-anchor="end" fill="{colour}">{label}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))
