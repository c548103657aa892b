"""deploy/: the Serve config and the RayService manifest parse as Serve configs and build the app."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def build_from(config: dict) -> object:
    """Validate like `serve run` does and call the builder (binding loads nothing)."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    return call_user_app_builder_with_args_if_necessary(builder, app.args)


def test_serve_yaml_builds_the_application() -> None:
    from ray.serve import Application

    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert isinstance(build_from(config), Application)


def test_rayservice_embeds_a_valid_serve_config_on_gpu_workers() -> None:
    from ray.serve import Application

    documents = list(yaml.safe_load_all((DEPLOY / "kuberay-rayservice.yaml").read_text()))
    service = next(d for d in documents if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["engine_num_gpus"] == 1
    assert isinstance(build_from(config), Application)
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(e["name"] == "CARVE_ADMIN_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in worker["env"])
    # the database is PostgreSQL from a secret on every pod, never in the Serve args; the shared volume holds the registry's files only
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["CARVE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "carve-db", "key": "url"}
        assert env["CARVE_REGISTRY"]["value"].startswith("/data/carve/") and not env["CARVE_MODEL_CACHE"]["value"].startswith("/data/carve")
    assert "database_url" not in config["applications"][0]["args"]


def test_bad_args_are_refused_naming_the_field() -> None:
    config = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    config["applications"][0]["args"]["max_adapters"] = 0
    with pytest.raises(ValueError, match="max_adapters"):
        build_from(config)
