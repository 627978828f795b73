"""The Ray cluster configs in cluster/ray/: both validate against the installed Ray's cluster-config
schema (the checks `ray up` runs first), no start command runs `ray stop`, and the custom resources
the node types advertise are exactly the ones the example deployment spec pins its roles with,
which also fits on those nodes. Nothing here starts Ray (local.yaml's bring-up is described in the
file itself)."""
from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.placement import NodeResources, PlacementError, plan_placement
from cluster.spec import DeploymentSpec
from engine.model_config import ModelConfig

os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # never let a test turn Ray's token auth on

RAY_DIR = Path(__file__).resolve().parent.parent / "cluster" / "ray"
A100 = RAY_DIR / "a100.yaml"
LOCAL = RAY_DIR / "local.yaml"
SPEC = RAY_DIR / "spec-a100.yaml"
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
# Llama-3.1-8B's shape, the model spec-a100.yaml names: 32 query heads in 8 GQA groups, 32 layers.
LLAMA31_8B = ModelConfig.from_hf(dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=8))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_util():
    pytest.importorskip("ray", reason="Ray is not installed: `pip install -e '.[ray]'` "
                                      "(the `test` extra includes it, so `make test` runs this)")
    from ray.autoscaler._private import util   # noqa: PLC0415
    return util


def _prepared(path: Path) -> dict:
    """What `ray up` would run with: the file merged with the provider's defaults."""
    return _ray_util().prepare_config(_load(path))


def _custom(resources: dict) -> set[str]:
    return set(resources) - BUILTIN


def _spec() -> DeploymentSpec:
    return DeploymentSpec.from_yaml(SPEC.read_text())


def _flag_resources(command: str) -> dict:
    """The `--resources` JSON of a `ray start` command line."""
    (value,) = [a.split("=", 1)[1] for a in shlex.split(command) if a.startswith("--resources=")]
    return json.loads(value)


def _flag(command: str, name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in shlex.split(command) if a.startswith(f"--{name}=")]
    return value


def _worker_nodes(config: dict) -> list[NodeResources]:
    """The GPU nodes `ray up` brings up: min_workers of each worker type, with its resources."""
    types = config["available_node_types"]
    return [NodeResources(f"{name}-{i}", dict(t["resources"]))
            for name, t in types.items() if name != config["head_node_type"]
            for i in range(t.get("min_workers", 0))]


# --- Ray's schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [A100, LOCAL], ids=lambda p: p.name)
def test_config_passes_rays_schema(path):
    util = _ray_util()
    util.validate_config(util.prepare_config(_load(path)))


def test_schema_check_catches_a_misspelt_key():
    """The validation above is real: a misspelt top-level key fails it."""
    import jsonschema  # noqa: PLC0415  (a dependency of ray)

    util = _ray_util()
    config = _load(A100)
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        util.validate_config(util.prepare_config(config))


@pytest.mark.parametrize("path", [A100, LOCAL], ids=lambda p: p.name)
def test_no_command_runs_ray_stop(path):
    """Ray's default start commands begin with `ray stop`, which kills every Ray process on the
    machine by name: both files replace them, and nothing else runs it."""
    raw, prepared = _load(path), _prepared(path)
    assert raw.get("head_start_ray_commands") and raw.get("worker_start_ray_commands")
    for config in (raw, prepared):
        for key in COMMAND_KEYS:
            for cmd in config.get(key) or []:
                # a command written `--resources='{"x": 1}'` in YAML would parse as a mapping
                assert isinstance(cmd, str), f"{path.name} {key}: {cmd!r} is not a string"
                assert not re.search(r"\bray\s+(stop|down)\b|--stop\b", cmd), f"{path.name} {key}: {cmd}"


# --- node kinds vs the example spec ------------------------------------------------------------

def test_a100_worker_types_carry_exactly_the_specs_custom_resources():
    config = _load(A100)
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    pinned = {g.role: _custom(g.resources) for g in _spec().groups}
    assert all(len(keys) == 1 for keys in pinned.values()), pinned   # one node kind per role
    advertised = {name: _custom(t["resources"]) for name, t in workers.items()}
    assert all(len(keys) == 1 for keys in advertised.values()), advertised
    assert set().union(*advertised.values()) == set().union(*pinned.values())
    assert not _custom(types[config["head_node_type"]]["resources"])
    for t in workers.values():
        assert t["node_config"]["InstanceType"] == "p4d.24xlarge"
        assert t["resources"]["GPU"] == 8 and t["resources"]["CPU"] == 96


def test_local_nodes_carry_exactly_the_specs_custom_resources():
    config = _load(LOCAL)
    (head,), (worker,) = config["head_start_ray_commands"], config["worker_start_ray_commands"]
    assert _flag(head, "node-ip-address") == config["provider"]["head_ip"] == "127.0.0.2"
    assert [_flag(worker, "node-ip-address")] == config["provider"]["worker_ips"] == ["127.0.0.3"]
    assert _flag(head, "include-dashboard") == "false"
    for cmd in (head, worker):
        assert len(_flag(cmd, "temp-dir")) <= 20   # AF_UNIX socket paths under it: 107 bytes
    assert _flag(head, "dashboard-agent-listen-port") != _flag(worker, "dashboard-agent-listen-port")
    advertised = set(_flag_resources(head)) | set(_flag_resources(worker))
    assert not set(_flag_resources(head)) & set(_flag_resources(worker))
    assert advertised == set().union(*(_custom(g.resources) for g in _spec().groups))


def test_example_spec_fits_the_a100_cluster():
    spec = _spec()
    spec.check_model(LLAMA31_8B)
    nodes = _worker_nodes(_load(A100))
    requests = plan_placement(spec, nodes)
    assert len(requests) == spec.num_replicas
    # Without its decode nodes the plan fails naming the pinned resource (Ray would hang instead).
    with pytest.raises(PlacementError, match="decode_node"):
        plan_placement(spec, [n for n in nodes if "decode_node" not in n.resources])
    # Every node's GPUs are used: the example fills the cluster, nothing more.
    assert sum(len(r.bundles) for r in requests) == sum(n.resources["GPU"] for n in nodes)

