"""What the tests expect of a finished job's folder and of a bad input's error, shared by the CLI
and preference tests."""

EXPECTED_FILES = {
    ".qlora-run",  # lets --overwrite tell our folders from anyone else's
    "README.md",  # peft's model card
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "config.yaml",
    "loss.svg",
    "metrics.jsonl",
    "qlora_manifest.json",  # the compatibility record: base fingerprint, quantization, versions, sha256s
    "summary.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]
