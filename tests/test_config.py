"""The job schema: strict validation with one-line errors naming the key, overrides, shipped configs."""

from pathlib import Path

import pytest
import yaml

from qlora.config import JobConfig, load_config, overrides_from_env
from qlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, job: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def minimal(**sections) -> dict:
    job = {"model": {"name_or_path": "org/model"}, "data": {"train": "train.jsonl"}, "output": {"dir": "out"}}
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    return job


def error_for(tmp_path: Path, job: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, job), overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_are_qlora(tmp_path):
    config = load_config(write(tmp_path, minimal()))
    assert (config.quantization.bits, config.quantization.quant_type, config.quantization.double_quant) == (
        4,
        "nf4",
        True,
    )
    assert config.lora.target_modules == "all-linear"
    assert config.train.gradient_checkpointing and config.train.optimizer == "paged_adamw_8bit"
    assert config.model.trust_remote_code is False


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    message = error_for(tmp_path, minimal(train={"learning_rat": 1e-4}))
    assert "train.learning_rat: unknown key" in message
    assert "did you mean 'train.learning_rate'" in message


def test_unknown_key_inside_a_data_source_list(tmp_path):
    message = error_for(tmp_path, minimal(data={"train": [{"path": "a.jsonl", "formt": "chat"}]}))
    assert "data.train.formt: unknown key" in message and "data.train.format" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    message = error_for(tmp_path, minimal(train={"max_steps": "many"}))
    assert message.startswith(f"{tmp_path / 'job.yaml'}: train.max_steps:") and "'many'" in message


def test_bad_enum_lists_the_allowed_values(tmp_path):
    message = error_for(tmp_path, minimal(train={"optimizer": "sgd"}))
    assert "train.optimizer" in message and "paged_adamw_8bit" in message and "'sgd'" in message


def test_out_of_range_and_conflicting_keys(tmp_path):
    assert "lora.r" in error_for(tmp_path, minimal(lora={"r": 0}))
    assert "train.max_steps and train.epochs" in error_for(tmp_path, minimal(train={"max_steps": 3, "epochs": 1}))
    assert "data.eval and data.eval_fraction" in error_for(
        tmp_path, minimal(data={"eval": "e.jsonl", "eval_fraction": 0.1})
    )


def test_eval_every_needs_eval_data_and_zero_means_off(tmp_path):
    message = error_for(tmp_path, minimal(train={"eval_every": 5}))
    assert "train.eval_every: 5 needs eval data" in message and "data.eval_fraction" in message
    assert load_config(write(tmp_path, minimal(train={"eval_every": 5}, data={"eval_fraction": 0.1}))).train.eval_every
    config = load_config(write(tmp_path, minimal(train={"eval_every": 0, "save_every": 0})))
    assert (config.train.eval_every, config.train.save_every) == (None, None)
    assert "greater than or equal to 0" in error_for(tmp_path, minimal(train={"save_every": -1}))


def test_missing_section_is_named(tmp_path):
    job = minimal()
    del job["output"]
    assert "output: required key is missing" in error_for(tmp_path, job)


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    path = write(tmp_path, minimal())
    config = load_config(path, ["train.max_steps=20", "quantization.bits=none", "lora.target_modules=[q_proj, v_proj]"])
    assert config.train.max_steps == 20 and config.quantization.bits is None
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert "train.max_stepz: unknown key" in error_for(tmp_path, minimal(), ["train.max_stepz=3"])
    assert "expected section.key=value" in error_for(tmp_path, minimal(), ["train.max_steps"])


def test_qlora_set_applies_before_set_and_splits_like_a_shell(tmp_path):
    path = write(tmp_path, minimal())
    env = overrides_from_env({"QLORA_SET": "train.max_steps=100  'output.dir=/out/run 2' train.seed=7"})
    assert env == ["train.max_steps=100", "output.dir=/out/run 2", "train.seed=7"]
    config = load_config(path, ["train.seed=9"], env_overrides=env)
    # The command line wins.
    assert (config.train.max_steps, config.output.dir, config.train.seed) == (100, "/out/run 2", 9)
    assert overrides_from_env({}) == [] and overrides_from_env({"QLORA_SET": " "}) == []


def test_a_bad_qlora_set_names_qlora_set_and_the_key(tmp_path):
    path = write(tmp_path, minimal())

    def error(env, overrides=()):
        with pytest.raises(ConfigError) as caught:
            load_config(path, overrides, env_overrides=overrides_from_env({"QLORA_SET": env}))
        return str(caught.value)

    assert error("train.max_stepz=3").endswith(
        "QLORA_SET: train.max_stepz: unknown key (did you mean 'train.max_steps'?)"
    )
    assert error("train.max_steps=lots").startswith("QLORA_SET: train.max_steps: ")
    assert error("train.max_steps") == "QLORA_SET 'train.max_steps': expected section.key=value"
    assert error("output.dir='/out") == 'QLORA_SET="output.dir=\'/out": No closing quotation'
    # The same bad value given again on the command line is the command line's problem.
    assert error("train.max_steps=lots", ["train.max_steps=many"]).startswith(f"{path}: train.max_steps: ")
    # And a good --set repairs a bad QLORA_SET value.
    assert load_config(path, ["train.max_steps=3"], env_overrides=["train.max_steps=lots"]).train.max_steps == 3


def test_relative_paths_resolve_against_the_job_file(tmp_path):
    (tmp_path / "base").mkdir()
    config = load_config(write(tmp_path, minimal(model={"name_or_path": "base"}, data={"eval": "e.jsonl"})))
    assert config.model.name_or_path == str(tmp_path / "base")
    assert config.data.train == str(tmp_path / "train.jsonl")
    assert config.data.eval == str(tmp_path / "e.jsonl")
    assert config.output.dir == str(tmp_path / "out")
    # A hub id stays a hub id when no such folder exists.
    assert load_config(write(tmp_path, minimal())).model.name_or_path == "org/model"


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: not valid YAML"):
        load_config(path)


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(JobConfig)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_parses(path):
    config = load_config(path)
    assert config.output.dir


def test_readme_config_reference_is_up_to_date():
    from qlora.config.reference import reference_markdown

    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate the README table with `python -m qlora.config`"
