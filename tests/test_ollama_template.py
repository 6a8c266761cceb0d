"""The Modelfile's TEMPLATE run by Go's text/template (the engine Ollama renders templates with,
tests/go_template/main.go) gives, for every conversation, the text the model's Jinja chat template
gives. Needs Go (Debian's golang-go, which .ci/run installs): skipped without it, except under CI."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.tiny_families import build_family_model

GO_SOURCE = Path(__file__).resolve().parent / "go_template"
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {{ there }}"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "reverse abc"},
        {"role": "assistant", "content": "cba"},
        {"role": "user", "content": 'and "xyz"?'},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    if shutil.which("go") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("go is not installed under CI (.ci/run installs golang-go)")
        pytest.skip("go is not installed")
    build = tmp_path_factory.mktemp("go-template")
    shutil.copy(GO_SOURCE / "main.go", build / "main.go")
    env = dict(os.environ, GOCACHE=str(build / "cache"), GOPATH=str(build / "path"), GOFLAGS="-mod=mod")
    subprocess.run(["go", "mod", "init", "render"], cwd=build, env=env, check=True, capture_output=True)
    subprocess.run(["go", "build", "-o", "render", "."], cwd=build, env=env, check=True, capture_output=True)
    return build / "render"


def go_render(renderer: Path, modelfile: Path, conversations: list) -> list[str]:
    result = subprocess.run(
        [str(renderer), str(modelfile)], input=json.dumps(conversations), capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", ["demo", "llama3", "qwen2"])
def test_go_renders_the_modelfile_template_as_jinja_renders_the_chat_template(go_renderer, tmp_path, family):
    from transformers import AutoTokenizer

    from qlora.adapters.ollama import modelfile

    model_dir = (
        Path(__file__).resolve().parent.parent / "qlora" / "demo" / "model"
        if family == "demo"
        else build_family_model(tmp_path / family, family)
    )
    text, notes = modelfile("model.gguf", model_dir)
    assert 'TEMPLATE """' in text and not notes
    path = tmp_path / "Modelfile"
    path.write_text(text)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    expected = [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in CONVERSATIONS
    ]
    assert go_render(go_renderer, path, CONVERSATIONS) == expected
