"""qlora: fine-tune a 4-bit base with LoRA adapters, then use the adapters anywhere.

The notebook API, two calls like the tools users know:

    import qlora
    model, tokenizer = qlora.load("path/to/base", bits=4)      # 4 = NF4 as trained; 16 = unquantized
    model = qlora.with_adapter(model, "runs/demo")             # again with another folder to add one
    qlora.select_adapter(model, "demo")                        # choose per call; None = the bare base

Everything heavy (torch, transformers, bitsandbytes, peft) is imported on first use, so
`import qlora` stays light and the CLI and config import on any machine.
"""


def load(base, bits=4, **options):
    """(model, tokenizer) for inference; see `qlora.adapters.loading.load` for the options."""
    from qlora.adapters.loading import load as load_base_for_inference

    return load_base_for_inference(base, bits, **options)


def with_adapter(model, directory, name=None):
    """The model with the adapter in `directory` loaded and active (checked against the base first)."""
    from qlora.adapters.loading import with_adapter as attach_saved_adapter

    return attach_saved_adapter(model, directory, name)


def select_adapter(model, name):
    """Make the loaded adapter `name` answer every following call; None runs the bare base."""
    from qlora.adapters.loading import select_adapter as choose

    return choose(model, name)
