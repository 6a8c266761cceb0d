"""The frozen base: tokenizer, 4-bit/8-bit/16-bit load, gradient checkpointing.

bitsandbytes and transformers are imported inside the functions, so the config and the CLI
import on any machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from qlora.config import ModelSection, QuantizationSection
from qlora.errors import ModelError
from qlora.model.checkpointing import checkpoint_kwargs
from qlora.model.host_memory import release_checkpoint_file
from qlora.model.row_attention import BatchLayout, use_row_attention


def check_source(name_or_path: str) -> None:
    """A local base must be a model folder; anything else is taken as a hub id."""
    path = Path(name_or_path)
    if path.is_absolute() and not path.is_dir():
        raise ModelError(f"model.name_or_path: folder not found: {name_or_path}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"model.name_or_path: {name_or_path} has no config.json (not a Hugging Face model folder)")


def load_tokenizer(name_or_path: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    """The base's tokenizer, with a pad token (with_pad_token)."""
    from transformers import AutoTokenizer

    check_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelError(
            f"model.name_or_path: cannot load a tokenizer from {name_or_path!r}: {first_line(error)}"
        ) from None
    return with_pad_token(tokenizer)


def with_pad_token(tokenizer):
    """eos as the pad token where the tokenizer has none: padding is masked by the attention
    mask, never by comparing with a token id, so eos is a safe pad."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    source: ModelSection,
    quantization: QuantizationSection,
    *,
    gradient_checkpointing: Union[bool, str],
    seed: int = 0,
    quant_storage: Optional[str] = None,
    on_cpu: bool = False,
    layout: BatchLayout = BatchLayout(),
):
    """The base of `source`, stored as `quantization` says, frozen, ready for adapters.

    Every weight is frozen; non-quantized layers (embeddings, norms, head) stay in the compute
    dtype. With gradient checkpointing (True, or "selective": qlora.model.checkpointing), the
    non-reentrant variant is used and input embeddings require grad, so the checkpointed blocks
    see a graph even though the base is frozen. `seed` draws the weights of `init: random`.
    quant_storage: the dtype the packed 4-bit bytes are stored as (bitsandbytes_config); on_cpu:
    load into host memory even with a GPU (FSDP moves each wrapped unit to its GPU itself).
    layout: the micro-batches it will train on (row_attention.batch_layout), which decide where
    flash attention keeps their rows apart; the default (one sequence, or padded rows with an
    attention mask) is what evaluation and generation feed.
    """
    import torch
    from transformers import AutoModelForCausalLM

    name_or_path = source.name_or_path
    check_source(name_or_path)
    if source.init == "random":
        from qlora.model.random_init import build_random_base

        model = build_random_base(
            name_or_path,
            quantization,
            seed=seed,
            trust_remote_code=source.trust_remote_code,
            device="cpu" if on_cpu else None,
            quant_storage=quant_storage,
        )
        return freeze_for_training(model, gradient_checkpointing, quantization.compute_dtype, layout)
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() and not on_cpu else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=source.revision,
            trust_remote_code=source.trust_remote_code,
            quantization_config=bitsandbytes_config(quantization, quant_storage=quant_storage),
            dtype=getattr(torch, quantization.compute_dtype),
            device_map=device_map,
            use_safetensors=True,
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name_or_path: cannot load {name_or_path!r}: {first_line(error)}") from None
    if quantization.bits in (4, 8):
        release_checkpoint_file(model)  # the unquantized rest pins the whole file's pages: qlora/model/host_memory.py
    return freeze_for_training(model, gradient_checkpointing, quantization.compute_dtype, layout)


def bitsandbytes_config(quantization: QuantizationSection, quant_storage: Optional[str] = None):
    """transformers' BitsAndBytesConfig for a 4-bit or 8-bit base; None for a 16-bit one.

    quant_storage: the dtype whose elements hold the packed 4-bit pairs (default uint8). FSDP
    flattens a wrapped layer's tensors into one tensor of one dtype, so a sharded base stores its
    4-bit bytes as the compute dtype, the dtype of the layer's norms (qlora.model.sharded_load).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if quantization.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, quant_storage or "uint8"),
        )
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def freeze_for_training(
    model, gradient_checkpointing: Union[bool, str], compute_dtype: str = "float32", layout: BatchLayout = BatchLayout()
):
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    disable_cpu_weight_repacking(model)
    # Padding-free / packed micro-batches attend within each row only (no block-diagonal mask
    # over the whole sequence); every other input takes transformers' SDPA path unchanged.
    use_row_attention(model, compute_dtype, layout)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(gradient_checkpointing))
        model.enable_input_require_grads()
    return model


def disable_cpu_weight_repacking(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights on CPUs with AVX512-BF16.

    Its first eval-mode forward under no_grad repacks the weight in place for a faster CPU
    kernel, and every backward after that computes wrong gradients (LoRA grads off by >100%).
    Training with eval passes must equal training without them, so the fast path stays off.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting each packed 4-bit byte as the two weights it holds
    (whatever dtype stores the bytes: FSDP's quant storage is the compute dtype)."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2 * parameter.element_size()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def weight_bytes(model) -> int:
    """Bytes the weights really occupy: every parameter and buffer plus each 4-bit weight's
    quantization state (absmaxes, nested absmaxes, codes), which get_memory_footprint leaves out.
    Tensors shared between modules are counted once."""
    import torch

    seen: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for value in (state.absmax, state.code, getattr(state, "offset", None)):
                add(value)
            state = state.state2 if getattr(state, "nested", False) else None
    return sum(seen.values())


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else error.__class__.__name__
