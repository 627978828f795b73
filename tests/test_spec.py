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


def test_idle_token_budget_is_a_replica_setting():
    from cluster.spec import apply_overrides
    from engine.config import EngineConfig

    cfg = apply_overrides(EngineConfig(model_dir="unused"), {"idle_token_budget": 64})  # not loaded
    assert cfg.scheduler.idle_token_budget == 64


HETEROGENEOUS = """
routing: least_loaded
replicas:
  - {role: hybrid, count: 2, token_budget: 96, idle_token_budget: 512, max_num_seqs: 16}
  - {role: hybrid, count: 1, scheduler: orca, max_batched_tokens: 4096, watermark: 0.05,
     num_kv_blocks: 300, dtype: float32, threads: 3}
"""


class _Launcher:
    def ipc_addr(self, name: str) -> str:
        return f"ipc:///tmp/tandem-test/{name}"


def test_group_overrides_reach_each_replicas_engine_config():
    """Through the path `tandem serve --spec` takes (spec -> ReplicaSpec per replica): each group
    gets its own settings on top of the command line's, and nothing leaks to the other group."""
    from cluster.cli import _replica_specs
    from engine.config import EngineConfig
    from scheduler.config import SchedulerConfig

    base = EngineConfig(model_dir="unused", scheduler=SchedulerConfig(
        token_budget=128, idle_token_budget=1024, max_num_seqs=32, max_model_len=1024))
    specs = _replica_specs(DeploymentSpec.from_yaml(HETEROGENEOUS), base, _Launcher(), 5.0)
    assert [s.replica_id for s in specs] == ["hybrid-0", "hybrid-1", "hybrid-2"]
    assert len({s.input_addr for s in specs}) == 3        # one socket each
    for s in specs[:2]:
        sc = s.engine.scheduler
        assert (sc.token_budget, sc.idle_token_budget, sc.max_num_seqs) == (96, 512, 16)
        assert (sc.policy, sc.watermark, s.engine.num_kv_blocks) == ("sarathi", 0.01, None)
    sc, eng = specs[2].engine.scheduler, specs[2].engine
    assert (sc.token_budget, sc.idle_token_budget, sc.max_num_seqs) == (128, 1024, 32)
    assert (sc.policy, sc.max_batched_tokens, sc.watermark) == ("orca", 4096, 0.05)
    assert (eng.num_kv_blocks, eng.dtype, eng.threads) == (300, "float32", 3)
    assert base.scheduler.token_budget == 128 and base.num_kv_blocks is None


def test_replica_ids_stay_unique_across_groups_of_one_role():
    spec = DeploymentSpec.from_yaml("replicas: [{role: decode, count: 2}, {role: prefill},"
                                    " {role: decode, count: 1, token_budget: 512}]")
    assert [rid for rid, *_ in spec.replicas(cores=4)] == ["decode-0", "decode-1", "prefill-0",
                                                            "decode-2"]


@pytest.mark.parametrize("group, message", [
    ("token_budgett: 96", r"unknown replica settings \['token_budgett'\]; allowed: .*token_budget"),
    ("budget: feedback", r"unknown replica settings \['budget'\]"),
    ("token_budget: 0", "token_budget must be a positive integer, got 0"),
    ("max_num_seqs: many", "max_num_seqs must be a positive integer, got 'many'"),
    ("token_budget: 16", r"token_budget \(16\) must be >= max_num_seqs \(32\)"),
    ("scheduler: fifo", "unknown scheduler policy 'fifo'"),
    ("dtype: fp8", "dtype must be one of .* got 'fp8'"),
    ("watermark: 1.5", r"watermark must be in \[0, 1\), got 1.5"),
    # wrong YAML types fail a comparison inside the config; the error must still name the setting
    ("watermark: high", "'watermark': 'high'"),
    ("kv_cache_gb: lots", "'kv_cache_gb': 'lots'"),
    ("threads: all", "threads must be an integer >= 1, got 'all'"),   # a group field, not an override
])
def test_bad_group_overrides_name_the_setting(group, message):
    from cluster.spec import apply_overrides
    from engine.config import EngineConfig
    from scheduler.config import SchedulerConfig

    base = EngineConfig(model_dir="unused", scheduler=SchedulerConfig(token_budget=128, max_num_seqs=32))
    with pytest.raises(ValueError, match=message):
        spec = DeploymentSpec.from_yaml(f"replicas: [{{role: hybrid, {group}}}]")
        apply_overrides(base, spec.groups[0].overrides)


def test_serve_checks_tp_against_the_model_and_the_kv_transport(tiny_model_dir):
    from cluster.cli import _check_parallelism
    from engine.config import EngineConfig

    cfg = EngineConfig(model_dir=str(tiny_model_dir))          # 4 query heads, 2 KV heads
    too_wide = DeploymentSpec.from_yaml("replicas: [{role: hybrid, count: 1, tp: 4}]")
    with pytest.raises(SystemExit, match=r"tp=4 exceeds the model's 2 KV heads"):
        _check_parallelism(too_wide, cfg)
    pd_tp = "replicas: [{role: prefill, count: 1, tp: 2}, {role: decode, count: 1, tp: 2}]"
    with pytest.raises(SystemExit, match=r"need --kv-transport zmq.*replicas\[0\] \(prefill\): tp=2"):
        _check_parallelism(DeploymentSpec.from_yaml("kv_transport: torch\n" + pd_tp), cfg)
    _check_parallelism(DeploymentSpec.from_yaml(pd_tp), cfg)
    _check_parallelism(DeploymentSpec.from_yaml("replicas: [{role: hybrid, count: 1, tp: 2, pp: 2}]"), cfg)
