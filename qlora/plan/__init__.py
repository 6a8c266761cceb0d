"""What a job costs, from a model's config.json alone: no weights loaded, answered in a second.

Modules, one job each: architecture (a model's shape from its config.json, on the meta device),
hardware (GPU specs as data), memory (the memory plan, line by line), sharding (one GPU's share
on N: DDP's buckets, FSDP's shards and gathered units), flops (the useful-FLOP model),
peak_flops (the device's measured matmul rate), mfu (the loop's FLOP meter for a job),
micro_batch (`train.micro_batch_size: auto`), checkpointing_mode (`train.gradient_checkpointing: auto`).
"""
