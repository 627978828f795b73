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
