"""The copy-paste blocks of docker/README.md's "Several GPUs and several nodes": the YAML parses and
its pieces agree with each other, the sbatch script is valid bash, and every torchrun flag they
use is one the installed torchrun accepts."""

import re
import shlex
import subprocess
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[1] / "docker" / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


def accepted_by_torchrun(arguments: list[str]) -> None:
    from torch.distributed.run import parse_args

    parsed = parse_args(arguments)  # argparse exits on an unknown flag or a bad value
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (
        True,
        "qlora.cli",
        ["train", parsed.training_script_args[1]],
    )


def test_every_yaml_block_of_the_readme_parses():
    documents = [document for block in blocks("yaml") for document in yaml.safe_load_all(block)]
    assert len(documents) >= 3 and all({"apiVersion", "kind", "metadata", "spec"} <= set(d) for d in documents)


def test_the_indexed_job_names_its_rendezvous_through_the_headless_service_and_resumes_from_a_shared_volume():
    documents = [document for block in blocks("yaml") for document in yaml.safe_load_all(block)]
    (service,) = [document for document in documents if document["kind"] == "Service"]
    (job,) = [document for document in documents if document["spec"].get("completionMode") == "Indexed"]
    name, pod = job["metadata"]["name"], job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["/usr/bin/tini", "--", "torchrun"]
    arguments = dict(argument.removeprefix("--").split("=", 1) for argument in container["args"] if "=" in argument)
    assert int(arguments["nnodes"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert arguments["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert arguments["rdzv-endpoint"] == f"{name}-0.{pod['subdomain']}:{service['spec']['ports'][0]['port']}"
    assert pod["terminationGracePeriodSeconds"] > int(arguments["shutdown-timeout"])
    accepted_by_torchrun([argument.replace("$(JOB_COMPLETION_INDEX)", "1") for argument in container["args"]])
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "rwx" in volumes["output"]["persistentVolumeClaim"]["claimName"]
    assert {"mountPath": "/output", "name": "output"} in container["volumeMounts"]


def test_the_sbatch_script_is_valid_bash_and_its_torchrun_line_is_accepted(tmp_path):
    (script,) = [block for block in blocks("bash") if block.startswith("#!/bin/bash\n#SBATCH")]
    assert script in section("Several GPUs and several nodes")
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    for option in ("--signal=B:TERM@120", "--requeue", "--ntasks-per-node=1"):
        assert f"#SBATCH {option}\n" in script
    # The command each task runs, with the variables Slurm sets per task filled in.
    inner = re.search(r"bash -c '(trap \"\" TERM; exec torchrun .*?)' &", script, flags=re.S).group(1)
    filled = inner.replace("\\\n", " ")
    for variable, value in {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "HEAD_NODE": "node01",
        "SLURM_JOB_ID": "7",
    }.items():
        filled = filled.replace(f'"${variable}', f'"{value}').replace(f"${variable}", value)
    arguments = shlex.split(filled.split("exec torchrun", 1)[1])
    assert "SIGTERM" not in arguments[arguments.index("--signals-to-handle") + 1]
    accepted_by_torchrun(arguments)
