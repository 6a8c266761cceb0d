"""Training: the one readable loop, handed built objects, and what it needs.

Modules, one job each: loop (the optimizer steps, top to bottom; eval), loss (summed, chunked
cross-entropy), offload (saved activations on the host), builders (config sections -> optimizer,
schedule, precision), checkpoint (the training state on disk, written atomically), metrics
(metrics.jsonl, progress bar, peak memory), plot (the loss curves). The loop imports none of
data, model, adapters or config: it runs on any tiny torch model.
"""
