"""The deployment files in deploy/ parse, and the commands inside them are valid rekbatch
command lines with the shard count the engine is told to start."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import typer.main
import yaml

from rekbatch.cli import app
from rekbatch.config.model import Config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"


def _parse(args: list[str]) -> dict[str, object]:
    """Parse ``args`` as rekbatch's CLI would; a bad flag or value raises."""
    group = typer.main.get_command(app)
    name, *rest = args
    command = group.commands[name]  # type: ignore[attr-defined]
    with command.make_context(name, list(rest)) as ctx:
        return dict(ctx.params)


def test_kubernetes_indexed_job_runs_one_shard_per_index() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "indexed-job.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    job = next(d for d in docs if d["kind"] == "Job")
    Config.model_validate(tomllib.loads(config_map["data"]["job.toml"]))
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    params = _parse(container["args"])
    assert params["shards"] == spec["completions"] == spec["parallelism"]
    assert params["shard_index_env"] == "JOB_COMPLETION_INDEX"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(str(params["config"])).parent) in mounts


def test_aws_batch_array_job_matches_its_job_definition() -> None:
    definition = json.loads((DEPLOY / "aws-batch" / "job-definition.json").read_text())
    params = _parse(definition["containerProperties"]["command"])
    assert params["shard_index_env"] == "AWS_BATCH_JOB_ARRAY_INDEX"
    submit = (DEPLOY / "aws-batch" / "submit.sh").read_text()
    size = re.search(r"--array-properties size=(\d+)", submit)
    assert size is not None and int(size.group(1)) == params["shards"]
    assert f"--job-definition {definition['jobDefinitionName']}" in submit
    merge = re.search(r"#\s+(rekbatch merge .+)", submit)
    assert merge is not None
    assert Path(str(_parse(shlex.split(merge.group(1))[1:])["output"])) == Path("merged/")


def test_ray_job_submit_runs_the_ray_engine() -> None:
    script = (DEPLOY / "ray" / "submit.sh").read_text()
    command = script.split(" -- ", 1)[1].strip()
    args = shlex.split(command)
    assert args[0] == "rekbatch"
    params = _parse(args[1:])
    assert params["engine"] == "ray" and params["ray_address"] == "auto"
    assert "ray job submit" in script


def test_dockerfile_installs_the_package_and_runs_rekbatch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert 'ENTRYPOINT ["rekbatch"]' in text
    for path in re.findall(r"^COPY (\S+)", text, re.M):
        assert (REPO / path).exists(), path
