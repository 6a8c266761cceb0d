"""The frozen base: what gets loaded and how it behaves in training.

Modules, one job each: base (tokenizer; 4-bit / 8-bit / 16-bit load, frozen; parameter and byte
counts), random_init (a random-weight base built from config.json one linear at a time),
row_attention (padding-free / packed rows attend within themselves), checkpointing (the
activation-checkpointing policy, full or selective), host_memory (what a CPU run gives back to
the OS). A model's shape from its config.json alone lives in qlora.plan.architecture, which
planning needs without any of this. torch, transformers and bitsandbytes are imported inside
the functions.
"""
