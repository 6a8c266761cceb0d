"""What an adapter learned: per module kind, the parameter budget; per layer, the spectrum of
delta W = scale * B A with its effective rank, read from the adapter file alone (no base load).

The singular values of B A (B: d x r, A: r x k) come from an r x r matrix: with B = Qb Rb and
A^T = Qa Ra, B A = Qb (Rb Ra^T) Qa^T, so only Rb Ra^T is decomposed; that stays cheap for 70B
adapters. Effective rank at 90% / 99% energy = how many singular values hold that share of
sum(s^2): far below r means r could shrink; equal to r means r may be too small.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from qlora.adapters.loading import LORA_KEY
from qlora.adapters.manifest import ADAPTER_WEIGHTS, read_adapter_config, read_manifest
from qlora.errors import ConfigError
from qlora.sizes import format_bytes

ENERGY_LEVELS = (0.90, 0.99)


@dataclass
class LayerSpectrum:
    module: str
    kind: str
    rank: int
    scale: float
    norm: float
    """Frobenius norm of delta W."""
    effective_rank_90: int
    effective_rank_99: int
    singular_values: list[float]


@dataclass
class KindSummary:
    kind: str
    modules: int
    d: int
    k: int
    rank: int
    parameters: int
    """LoRA parameters over all modules of this kind: modules * r * (d + k)."""
    reduction: float
    """d*k / (r*(d+k)): how many times fewer trainable parameters than full fine-tuning of this kind."""


@dataclass
class AdapterReport:
    adapter: str
    base: Optional[str]
    parameters: int
    adapter_bytes: int
    base_parameters: Optional[int]
    base_bytes: Optional[int]
    kinds: list[KindSummary]
    layers: list[LayerSpectrum]


def inspect_adapter(directory: Path) -> AdapterReport:
    import torch
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    pairs: dict[str, dict[str, "torch.Tensor"]] = defaultdict(dict)
    for key, tensor in weights.items():
        match = LORA_KEY.match(key)
        if match:
            pairs[match["module"]][match["which"]] = tensor
    layers = []
    for module, pair in sorted(pairs.items(), key=lambda item: natural_key(item[0])):
        lora_a, lora_b = pair["A"].double(), pair["B"].double()
        rank = lora_a.shape[0]
        scale = module_scale(config, module, rank)
        singular = (scale * low_rank_singular_values(lora_b, lora_a)).tolist()
        energy = [value * value for value in singular]
        layers.append(
            LayerSpectrum(
                module=module,
                kind=module.rsplit(".", 1)[-1],
                rank=rank,
                scale=scale,
                norm=math.sqrt(sum(energy)),
                effective_rank_90=effective_rank(energy, ENERGY_LEVELS[0]),
                effective_rank_99=effective_rank(energy, ENERGY_LEVELS[1]),
                singular_values=singular,
            )
        )
    kinds = summarize_kinds(layers, pairs)
    base = config.get("base_model_name_or_path")
    base_parameters, base_bytes = base_size(base)
    return AdapterReport(
        adapter=str(directory),
        base=base,
        parameters=sum(kind.parameters for kind in kinds),
        adapter_bytes=(directory / ADAPTER_WEIGHTS).stat().st_size,
        base_parameters=base_parameters,
        base_bytes=base_bytes,
        kinds=kinds,
        layers=layers,
    )


def low_rank_singular_values(lora_b, lora_a):
    """Singular values of B @ A without forming the d x k product."""
    import torch

    _, r_b = torch.linalg.qr(lora_b)
    _, r_a = torch.linalg.qr(lora_a.T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def effective_rank(energy: list[float], level: float) -> int:
    """Fewest leading singular values whose squares hold `level` of the total (0 for a zero delta)."""
    total = sum(energy)
    if total == 0.0:
        return 0
    running = 0.0
    for count, value in enumerate(energy, start=1):
        running += value
        # a hair under the level so float noise in the tail does not add a phantom direction
        if running >= level * total * (1 - 1e-9):
            return count
    return len(energy)


def module_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r (alpha / sqrt(r) with rslora), honouring peft's per-module rank/alpha patterns."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def summarize_kinds(layers: list[LayerSpectrum], pairs: dict) -> list[KindSummary]:
    grouped: dict[str, list[LayerSpectrum]] = defaultdict(list)
    for layer in layers:
        grouped[layer.kind].append(layer)
    kinds = []
    for kind, members in grouped.items():
        first = pairs[members[0].module]
        d, k = first["B"].shape[0], first["A"].shape[1]
        rank = members[0].rank
        parameters = sum(pairs[layer.module]["A"].numel() + pairs[layer.module]["B"].numel() for layer in members)
        kinds.append(
            KindSummary(
                kind=kind,
                modules=len(members),
                d=d,
                k=k,
                rank=rank,
                parameters=parameters,
                reduction=d * k / (rank * (d + k)),
            )
        )
    return kinds


def base_size(base: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """(parameters, bytes) of a local base folder, from its safetensors headers only."""
    from safetensors import safe_open

    if not base or not Path(base).is_dir():
        return None, None
    files = sorted(Path(base).glob("*.safetensors"))
    if not files:
        return None, None
    parameters = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                parameters += math.prod(handle.get_slice(key).get_shape())
    return parameters, sum(path.stat().st_size for path in files)


def natural_key(text: str) -> list:
    """layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in text.split(".")]


def report_json(report: AdapterReport, directory: Path) -> str:
    record = asdict(report)
    record["manifest"] = read_manifest(directory)
    return json.dumps(record, indent=2)


def describe_report(report: AdapterReport, top: int = 4) -> str:
    lines = [f"adapter {report.adapter}: {report.parameters:,} LoRA parameters, {format_bytes(report.adapter_bytes)}"]
    if report.base_parameters:
        lines.append(
            f"base {report.base}: {report.base_parameters:,} parameters, {format_bytes(report.base_bytes)}; "
            f"the adapter is {100 * report.parameters / report.base_parameters:.3f}% of its parameters and "
            f"{100 * report.adapter_bytes / report.base_bytes:.3f}% of its size"
        )
    else:
        lines.append(f"base {report.base}: not found here, so no size comparison")
    lines.append("")
    lines.append(f"{'kind':<16} {'modules':>7} {'d x k':>13} {'r':>4} {'parameters':>12} {'vs full (dk/r(d+k))':>20}")
    for kind in report.kinds:
        lines.append(
            f"{kind.kind:<16} {kind.modules:>7} {f'{kind.d}x{kind.k}':>13} {kind.rank:>4} "
            f"{kind.parameters:>12,} {kind.reduction:>19.1f}x"
        )
    lines.append("")
    lines.append(f"{'module':<44} {'norm':>9} {'rank90':>6} {'rank99':>6}  top singular values of delta W")
    for layer in report.layers:
        values = " ".join(f"{value:.3g}" for value in layer.singular_values[:top])
        lines.append(
            f"{layer.module:<44} {layer.norm:>9.4g} {layer.effective_rank_90:>6} {layer.effective_rank_99:>6}  {values}"
        )
    lines.append(
        "(effective rank = singular values holding 90% / 99% of the energy, out of r; "
        "rank99 well below r: r could be smaller)"
    )
    return "\n".join(lines)


def plot_spectra(report: AdapterReport, path: Path) -> Path:
    """One panel per module kind, one line per layer: singular values (log scale) vs index."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = [kind.kind for kind in report.kinds]
    columns = min(4, len(kinds)) or 1
    rows = math.ceil(len(kinds) / columns) or 1
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis, kind in zip(axes.flat, kinds):
        members = [layer for layer in report.layers if layer.kind == kind]
        colors = plt.cm.viridis([index / max(1, len(members) - 1) for index in range(len(members))])
        for layer, color in zip(members, colors):
            values = [value for value in layer.singular_values if value > 0]
            if values:
                axis.plot(range(1, len(values) + 1), values, marker=".", color=color, linewidth=1)
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(f"{kind} (r={members[0].rank}, {len(members)} layers)", fontsize=9)
        axis.set_xlabel("singular value index")
        axis.grid(True, which="both", alpha=0.3)
    for axis in list(axes.flat)[len(kinds) :]:
        axis.axis("off")
    figure.suptitle(f"delta W spectra: {Path(report.adapter).name} (light = deeper layers)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def require_matplotlib() -> None:
    """Checked before any work, so a missing optional extra costs nothing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'qlora[plot]'")
