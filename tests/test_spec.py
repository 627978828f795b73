import pytest

from cluster.spec import DeploymentSpec, ReplicaGroup

YAML = """
routing: pd
offload_threshold: 256
kv_codec: raw
replicas:
  - {role: prefill, count: 1, token_budget: 512}
  - {role: decode, count: 2, threads: 1}
"""


def test_yaml_spec_and_thread_split():
    spec = DeploymentSpec.from_yaml(YAML)
    assert spec.routing == "pd" and spec.offload_threshold == 256 and spec.kv_codec == "raw"
    reps = spec.replicas(cores=4)
    assert [r[0] for r in reps] == ["prefill-0", "decode-0", "decode-1"]
    assert [r[2] for r in reps] == [1, 1, 1]
    assert reps[0][1].overrides == {"token_budget": 512}


@pytest.mark.parametrize("text, message", [
    ("replicas: [{role: prefill}]", "at least one hybrid or decode"),
    ("replicas: [{role: hybrid}, {role: prefill}]", "need at least one decode"),
    ("routing: pd\nreplicas: [{role: hybrid}]", "needs at least one prefill"),
    ("replicas: [{role: mixer}]", "'mixer'"),
    ("kv_codec: zstd\nreplicas: [{role: hybrid}]", "'zstd'"),
    ("colour: blue\nreplicas: [{role: hybrid}]", "colour"),
])
def test_bad_specs_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        DeploymentSpec.from_yaml(text)


def test_threads_default_to_an_even_share_but_at_least_one():
    spec = DeploymentSpec(groups=(ReplicaGroup("hybrid", 3),))
    assert [t for *_, t in spec.replicas(cores=2)] == [1, 1, 1]
    assert [t for *_, t in DeploymentSpec(groups=(ReplicaGroup(),)).replicas(cores=2)] == [2]


@pytest.mark.parametrize("replicas, routing", [
    ("[{role: prefill}, {role: decode}]", "pd"),            # as `--prefill-replicas` does
    ("[{role: hybrid, count: 2}]", "round_robin"),
])
def test_spec_routing_defaults_like_the_command_line(replicas, routing):
    assert DeploymentSpec.from_yaml(f"replicas: {replicas}").routing == routing
    explicit = DeploymentSpec.from_yaml(f"routing: least_loaded\nreplicas: {replicas}")
    assert explicit.routing == "least_loaded"


def test_idle_token_budget_is_a_replica_setting(tiny_model_dir):
    from cluster.spec import apply_overrides
    from engine.config import EngineConfig

    cfg = apply_overrides(EngineConfig(model_dir=str(tiny_model_dir)), {"idle_token_budget": 64})
    assert cfg.scheduler.idle_token_budget == 64
