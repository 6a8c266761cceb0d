// Loss charts drawn by hand in SVG: x = optimizer step, y = loss on a linear or a log scale.
// One function draws both the job's curve and the comparison of several jobs.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const BOX = { width: 640, height: 300, left: 56, right: 16, top: 16, bottom: 32 };

// A loss falling from 8.6 to 0.003 is a flat line on a linear axis after the first steps: past a
// decade of range, the log scale is what shows the run's progress.
function defaultScale(values) {
  const positive = values.filter((value) => value > 0);
  if (positive.length < 2) return "linear";
  return Math.max(...positive) / Math.min(...positive) > 10 ? "log" : "linear";
}

// The scale a chart uses: the user's choice once they ticked its box, else the default for its values.
function chosenScale(checkbox, values) {
  const scale = checkbox.dataset.chosen || defaultScale(values);
  checkbox.checked = scale === "log";
  return scale;
}

function logTicks(low, high) {
  const ticks = [];
  for (let power = Math.floor(Math.log10(low)); power <= Math.ceil(Math.log10(high)); power++) {
    // Under two decades the powers of ten alone are too few lines to read a value from.
    const steps = Math.log10(high / low) < 2 ? [1, 2, 5] : [1];
    for (const step of steps) {
      const value = step * 10 ** power;
      if (value >= low * 0.999 && value <= high * 1.001) ticks.push(value);
    }
  }
  if (ticks.length >= 3) return ticks;
  // A narrow range holds no round values: five evenly spaced (on the log axis) instead.
  return [0, 1, 2, 3, 4].map((index) => low * (high / low) ** (index / 4));
}

const tickLabel = (value, scale) => (scale === "log" ? String(Number(value.toPrecision(3))) : value.toFixed(3));

// series: [{ id, className, color, dashed, dots, points: [[step, value], ...] }]; lastStep: the x range.
function drawChart(svg, series, scale, lastStep) {
  const values = series.flatMap((line) => line.points.map(([, value]) => value)).filter((value) => scale !== "log" || value > 0);
  const maxStep = Math.max(1, lastStep || 0, ...series.flatMap((line) => line.points.map(([step]) => step)));
  let low = values.length ? Math.min(...values) : scale === "log" ? 0.1 : 0;
  let high = values.length ? Math.max(...values) : 1;
  if (high === low) [low, high] = scale === "log" ? [low / 1.05, high * 1.05] : [low - 0.5, high + 0.5];
  const span = high - low || 1;
  const plotWidth = BOX.width - BOX.left - BOX.right;
  const plotHeight = BOX.height - BOX.top - BOX.bottom;
  const x = (step) => BOX.left + (step / maxStep) * plotWidth;
  const fraction = scale === "log"
    ? (value) => Math.log10(Math.max(value, low) / low) / Math.log10(high / low)
    : (value) => (value - low) / span;
  const y = (value) => BOX.top + (1 - fraction(value)) * plotHeight;

  const children = [svgElement("line", { class: "axis", x1: BOX.left, y1: BOX.height - BOX.bottom, x2: BOX.width - BOX.right, y2: BOX.height - BOX.bottom }),
                    svgElement("line", { class: "axis", x1: BOX.left, y1: BOX.top, x2: BOX.left, y2: BOX.height - BOX.bottom })];
  const ticks = scale === "log" ? logTicks(low, high) : [low, low + span / 2, high];
  for (const value of values.length ? ticks : []) {
    children.push(svgElement("line", { class: "tick", x1: BOX.left, y1: y(value), x2: BOX.width - BOX.right, y2: y(value) }));
    children.push(svgElement("text", { class: "y-tick", x: BOX.left - 6, y: y(value) + 4, "text-anchor": "end" }, tickLabel(value, scale)));
  }
  for (const step of [0, Math.round(maxStep / 2), maxStep]) {
    children.push(svgElement("text", { x: x(step), y: BOX.height - BOX.bottom + 16, "text-anchor": "middle" }, String(step)));
  }
  children.push(svgElement("text", { x: BOX.width - BOX.right, y: BOX.height - 4, "text-anchor": "end" }, scale === "log" ? "step (loss on a log scale)" : "step"));

  for (const line of series) {
    const points = line.points.filter(([, value]) => scale !== "log" || value > 0);
    const d = points.map(([step, value], index) => `${index ? "L" : "M"}${x(step).toFixed(1)},${y(value).toFixed(1)}`).join(" ");
    const attributes = { ...(line.id ? { id: line.id } : {}), class: line.className || "", d, "data-points": points.length };
    if (line.job) attributes["data-job"] = line.job;
    if (line.color) attributes.stroke = line.color;
    if (line.dashed) attributes["stroke-dasharray"] = "5 3";
    children.push(svgElement("path", attributes));
    if (line.dots) {
      const dots = points.map(([step, value]) => svgElement("circle", { cx: x(step), cy: y(value), r: 3, ...(line.color ? { fill: line.color } : {}) }));
      children.push(svgElement("g", { class: line.className || "" }, undefined, dots));
    }
  }
  svg.replaceChildren(...children);
  svg.dataset.scale = scale;
}

function svgElement(name, attributes, text, children) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  if (children) element.append(...children);
  return element;
}
