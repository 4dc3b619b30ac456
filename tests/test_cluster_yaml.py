"""cluster.yaml passes the same schema check `ray up` runs, and that check rejects broken copies."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _load() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """What `ray up` does before touching AWS: merge the provider's defaults.yaml, then validate against Ray's
    ray/autoscaler/ray-schema.json (plus Ray's cross-field checks)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray_up():
    config = _load()
    prepared = _validate(config)
    assert prepared["cluster_name"] == "cdul-ray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(max_worker=8), id="typo-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="eight"), id="wrong-type"),
        pytest.param(lambda c: c["available_node_types"]["worker.gpu"].update(min_worker=0), id="typo-node-key"),
        pytest.param(lambda c: c["available_node_types"]["worker.gpu"]["resources"].update(GPU=0.5), id="frac-gpu"),
    ],
)
def test_schema_check_rejects_broken_configs(breakage):
    config = _load()
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate(config)


def test_head_must_be_a_declared_node_type():
    config = _load()
    config["head_node_type"] = "head.gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(config)


def test_node_types():
    config = _load()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_workers, "no GPU worker type"
    for worker in gpu_workers:
        assert worker["min_workers"] == 0
        assert worker["max_workers"] >= 1
        assert worker["resources"]["GPU"] >= 1
        assert worker["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    for node_type in types.values():
        assert "IamInstanceProfile" in node_type["node_config"]
    text = CLUSTER_YAML.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA"):
        assert secret.lower() not in text.lower()


def test_package_is_installed_from_the_mounted_working_copy():
    config = _load()
    assert config["file_mounts"]["~/cdul-ray"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("pip install -e ~/cdul-ray" in cmd for cmd in config["setup_commands"])


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_start_uses_token_auth(key):
    commands = _load()[key]
    starts = [cmd for cmd in commands if "ray start" in cmd]
    assert starts
    for cmd in starts:
        # Each command runs in its own shell: the export must precede `ray start` in the same command.
        assert "RAY_AUTH_MODE=token" in cmd
        assert cmd.index("RAY_AUTH_MODE=token") < cmd.index("ray start")
