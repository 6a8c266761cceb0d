"""LoRA adapters: attach and save (training), load / switch / merge / inspect (everything after).

Modules, one job each: lora (attach to a frozen base, save PEFT format), manifest (the
compatibility record next to each adapter), loading (base + adapters for inference, switching),
merge (into a 16-bit base, sharded safetensors), spectra (what an adapter learned), generation
(prompts -> tokens). torch, transformers and peft are imported inside the functions.
"""

from qlora.adapters.loading import load, load_with_adapters, select_adapter, with_adapter
from qlora.adapters.lora import attach_lora, load_adapter_weights, save_adapter
from qlora.adapters.manifest import MANIFEST_NAME, read_manifest, write_manifest

__all__ = [
    "MANIFEST_NAME",
    "attach_lora",
    "load",
    "load_adapter_weights",
    "load_with_adapters",
    "read_manifest",
    "save_adapter",
    "select_adapter",
    "with_adapter",
    "write_manifest",
]
