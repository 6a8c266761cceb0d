"""Load a base for inference, put adapters on it, and choose which one answers.

    model, tokenizer = load(base, bits=4)
    model = with_adapter(model, "runs/a", name="a")
    model = with_adapter(model, "runs/b", name="b")     # several adapters on one base
    select_adapter(model, "b")                           # per call; None = the bare base

Every adapter is checked against the base before peft touches it: the manifest's shape
fingerprint when there is one, and always the shapes of the adapter's own weights, so a
mismatch is one line naming both sides instead of peft's size-mismatch traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional, Union

from qlora.adapters.manifest import (
    ADAPTER_WEIGHTS,
    check_adapter_file,
    check_base,
    check_quantization,
    read_adapter_config,
    read_manifest,
    recorded_base,
    recorded_quantization,
    stderr_warning,
)
from qlora.config import ModelSection, QuantizationSection, validate
from qlora.errors import ConfigError, ModelError
from qlora.model.base import first_line, load_base, load_tokenizer, with_pad_token

BITS_CHOICES = (4, 8, 16)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# peft names a LoRA tensor `base_model.model.<module path>.lora_A.weight` (adapter name removed).
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def load(
    base: str,
    bits: Optional[int] = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    tokenizer_from: Optional[str] = None,
    on_cpu: bool = False,
):
    """(model, tokenizer) for inference: the base frozen, in eval mode, with the KV cache on.

    bits: 4 (NF4, as QLoRA trains), 8, or 16/None (unquantized, in compute_dtype).
    on_cpu: in host memory even with a GPU (the merge's check compares models too big for one card).
    """
    if bits not in (*BITS_CHOICES, None):
        raise ConfigError(f"bits: {bits!r} is not one of 4, 8, 16")
    bits = None if bits == 16 else bits
    quantization = validate(
        {
            "bits": bits,
            "quant_type": quant_type,
            "double_quant": double_quant,
            "compute_dtype": compute_dtype if bits is None else usable_dtype(compute_dtype, on_cpu),
        },
        source="load",
        schema=QuantizationSection,
    )
    tokenizer = inference_tokenizer(base, tokenizer_from, revision, trust_remote_code)
    source = ModelSection(name_or_path=base, revision=revision, trust_remote_code=trust_remote_code)
    model = load_base(source, quantization, gradient_checkpointing=False, on_cpu=on_cpu)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


def with_adapter(
    model, directory: Union[str, Path], name: Optional[str] = None, *, warn: Callable[[str], None] = stderr_warning
):
    """Put the adapter in `directory` on `model` (a base, or a model that already has adapters)
    and make it the active one. Returns the peft model; the base's weights are shared, not copied."""
    from peft import PeftModel

    directory = Path(directory)
    name = name or adapter_name(directory)
    read_adapter_config(directory)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base_name = getattr(base.config, "_name_or_path", "the base")
    check_base(directory, base.config.to_dict(), base_name)
    check_shapes(base, directory)
    check_quantization(directory, loaded_quantization(base), warn)
    check_adapter_file(directory, warn)
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ConfigError(f"adapter name {name!r} is already loaded; give this one another name (NAME=DIR)")
        model.load_adapter(str(directory), adapter_name=name)
    else:
        model = PeftModel.from_pretrained(model, str(directory), adapter_name=name)
    select_adapter(model, name)
    model.eval()
    return model


def select_adapter(model, name: Optional[str]) -> None:
    """Make adapter `name` the one every following call uses; None runs the bare base."""
    if name is None:
        model.base_model.disable_adapter_layers()
        return
    if name not in model.peft_config:
        raise ConfigError(f"no adapter named {name!r}; loaded: {', '.join(model.peft_config)}")
    model.base_model.enable_adapter_layers()
    model.set_adapter(name)


def load_with_adapters(
    adapters: list[tuple[str, Path]],
    *,
    base: Optional[str] = None,
    bits: Optional[int] = None,
    compute_dtype: Optional[str] = None,
    warn: Callable[[str], None] = stderr_warning,
    on_cpu: bool = False,
):
    """(model, tokenizer) for the command line: the base each adapter records (or `base`),
    loaded as the first adapter was trained unless `bits` / `compute_dtype` say otherwise,
    every adapter on it, the first one active."""
    first = adapters[0][1]
    record = (read_manifest(first) or {}).get("base", {})
    base = resolve_base(adapters, base)
    trained = trained_quantization(first)
    model, tokenizer = load(
        base,
        bits=trained.bits if bits is None else bits,
        quant_type=trained.quant_type,
        double_quant=trained.double_quant,
        compute_dtype=compute_dtype or trained.compute_dtype,
        revision=record.get("revision") if base == record.get("name_or_path") else None,
        tokenizer_from=tokenizer_source(first, base),
        on_cpu=on_cpu,
    )
    for name, directory in adapters:
        model = with_adapter(model, directory, name, warn=warn)
    select_adapter(model, adapters[0][0])
    return model, tokenizer


def resolve_base(adapters: list[tuple[str, Path]], base: Optional[str] = None) -> str:
    """`base` if given, else the base the first adapter records; every adapter folder checked."""
    for _, directory in adapters:
        read_adapter_config(directory)
    first = adapters[0][1]
    base = base or recorded_base(first)
    if not base:
        raise ModelError(f"adapter {first} does not name its base model; pass --base")
    if not Path(base).is_dir() and Path(base).is_absolute():
        raise ModelError(f"adapter {first} was trained on {base}, which is not found here; pass --base PATH")
    return base


def tokenizer_source(adapter_dir: Path, base: str) -> str:
    """Training saves its tokenizer (pad token, chat template) next to the adapter: prefer it."""
    return str(adapter_dir) if any((Path(adapter_dir) / name).is_file() for name in TOKENIZER_FILES) else base


def inference_tokenizer(
    base: str, tokenizer_from: Optional[str] = None, revision: Optional[str] = None, trust_remote_code: bool = False
):
    """The base's tokenizer, or the one saved in `tokenizer_from` (see tokenizer_source)."""
    if tokenizer_from in (None, base):
        return load_tokenizer(base, revision, trust_remote_code)
    return saved_tokenizer(tokenizer_from)


def saved_tokenizer(directory: str):
    """The tokenizer a training job saved next to its adapter (an adapter folder has no config.json)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"{directory}: cannot load the tokenizer saved with the adapter: {first_line(error)}"
        ) from None
    return with_pad_token(tokenizer)


def trained_quantization(directory: Path) -> QuantizationSection:
    """The quantization the manifest records; NF4 + double quant for an adapter without one."""
    return recorded_quantization(read_manifest(directory), directory)


def loaded_quantization(model) -> QuantizationSection:
    """How a loaded base's weights are stored, read from its quantization_config."""
    config = getattr(model.config, "quantization_config", None)
    settings = {} if config is None else config if isinstance(config, dict) else config.to_dict()
    if settings.get("load_in_4bit"):
        return QuantizationSection(bits=4, quant_type=settings.get("bnb_4bit_quant_type", "nf4"))
    if settings.get("load_in_8bit"):
        return QuantizationSection(bits=8)
    return QuantizationSection(bits=None)


def check_shapes(base, directory: Path) -> None:
    """Every module the adapter targets exists in the base with the in/out sizes its A and B need."""
    from safetensors import safe_open

    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if not match:
            continue
        module_path = match["module"]
        try:
            module = base.get_submodule(module_path)
        except AttributeError:
            raise ModelError(
                f"adapter {directory} targets {module_path}, which this base does not have (another architecture?)"
            ) from None
        module = getattr(module, "base_layer", module)
        expected = module.in_features if match["which"] == "A" else module.out_features
        actual = shape[1] if match["which"] == "A" else shape[0]
        if expected != actual:
            side = "input" if match["which"] == "A" else "output"
            raise ModelError(
                f"adapter {directory} expects {module_path} with {side} size {actual}, "
                f"but this base's has {expected} (another base model?)"
            )


def usable_dtype(compute_dtype: str, on_cpu: bool = False) -> str:
    """bitsandbytes computes float16 only on a GPU; CPU runs of a 4/8-bit base use bfloat16 then."""
    import torch

    on_gpu = torch.cuda.is_available() and not on_cpu
    return "bfloat16" if compute_dtype == "float16" and not on_gpu else compute_dtype


def adapter_name(directory: Path) -> str:
    return Path(directory).resolve().name or "adapter"


def parse_adapter_arguments(values: list[str]) -> list[tuple[str, Path]]:
    """`--adapter DIR` or `--adapter NAME=DIR`, each name once; `base` is reserved for no adapter."""
    adapters = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or "/" in name:
            name, path = "", value
        directory = Path(path).expanduser()
        name = name or adapter_name(directory)
        if name == "base":
            raise ConfigError(f"--adapter {value}: the name 'base' means no adapter; name it with NAME=DIR")
        if name in dict(adapters):
            raise ConfigError(f"--adapter {value}: the name {name!r} is taken; name it with NAME=DIR")
        adapters.append((name, directory))
    if not adapters:
        raise ConfigError("--adapter: give at least one adapter folder")
    return adapters
