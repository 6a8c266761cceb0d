"""The job: its schema (pydantic, one docstring per key), YAML loading with overrides, one-line
errors, and the generated reference. No torch here, so a job validates on any machine."""

from qlora.config.loading import OVERRIDES_ENV, apply_override, dump_config, load_config, overrides_from_env, validate
from qlora.config.schema import (
    DATA_FILE_SUFFIXES,
    DataSection,
    JobConfig,
    LoraSection,
    ModelSection,
    OutputSection,
    QuantizationSection,
    TrainSection,
)

__all__ = [
    "DATA_FILE_SUFFIXES",
    "OVERRIDES_ENV",
    "DataSection",
    "JobConfig",
    "LoraSection",
    "ModelSection",
    "OutputSection",
    "QuantizationSection",
    "TrainSection",
    "apply_override",
    "dump_config",
    "load_config",
    "overrides_from_env",
    "validate",
]
