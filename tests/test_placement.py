"""Multi-device replicas in the deployment spec (tp, pp, per-rank resources) and their placement
plan (Ray placement-group requests): pure, no Ray, no torch, no model files."""
import subprocess
import sys
import textwrap

import pytest

import cluster.spec
from cluster.placement import (STRICT_PACK, Bundle, NodeResources, PlacementError,
                               PlacementGroupRequest, plan_placement)
from cluster.spec import DeploymentSpec, ReplicaGroup
from engine.model_config import ModelConfig, shard_heads


def _model(heads: int, kv_heads: int, layers: int, hidden: int) -> ModelConfig:
    return ModelConfig.from_hf(dict(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads))


SMOLLM2 = _model(9, 3, 30, 576)          # SmolLM2-135M: 9 query heads in 3 GQA groups
LLAMA_7B = _model(32, 32, 32, 4096)      # Llama-2-7B: multi-head attention
MISTRAL_7B = _model(32, 8, 32, 4096)     # Mistral-7B: 8 GQA groups of 4


def _spec(text: str) -> DeploymentSpec:
    return DeploymentSpec.from_yaml(text)


def _gpus(*counts: int, **extra) -> list[NodeResources]:
    return [NodeResources(f"node-{i}", {"CPU": 16, "GPU": n, **extra}) for i, n in enumerate(counts)]


# --- heads split by whole GQA groups -----------------------------------------------------------

@pytest.mark.parametrize("heads, kv_heads, tp, shards", [
    (9, 3, 1, [(9, 3)]),
    (9, 3, 2, [(6, 2), (3, 1)]),
    (9, 3, 3, [(3, 1)] * 3),
    (32, 8, 2, [(16, 4)] * 2),
    (32, 8, 4, [(8, 2)] * 4),
    (32, 8, 8, [(4, 1)] * 8),
    (32, 8, 3, [(12, 3), (12, 3), (8, 2)]),
    (32, 32, 8, [(4, 4)] * 8),
    (32, 32, 32, [(1, 1)] * 32),
])
def test_shard_heads_splits_whole_gqa_groups_evenly(heads, kv_heads, tp, shards):
    assert shard_heads(heads, kv_heads, tp) == shards
    assert sum(q for q, _ in shards) == heads and sum(kv for _, kv in shards) == kv_heads
    assert all(q == kv * (heads // kv_heads) for q, kv in shards)   # a query head sits with its KV


@pytest.mark.parametrize("heads, kv_heads, tp, message", [
    (9, 3, 4, "tp=4 exceeds the model's 3 KV heads"),
    (32, 8, 16, "tp=16 exceeds the model's 8 KV heads"),
    (9, 3, 0, "tp must be an integer >= 1, got 0"),
    (9, 3, 1.5, "tp must be an integer >= 1, got 1.5"),
    (10, 3, 1, r"num_heads \(10\) must be a multiple of num_kv_heads \(3\)"),
])
def test_shard_heads_errors(heads, kv_heads, tp, message):
    with pytest.raises(ValueError, match=message):
        shard_heads(heads, kv_heads, tp)


# --- the spec: tp, pp, resources ---------------------------------------------------------------

def test_yaml_groups_take_tp_pp_and_resources_which_are_not_engine_overrides():
    spec = _spec("replicas:\n"
                 "  - {role: prefill, tp: 2, pp: 3, resources: {CPU: 2, GPU: 1}, token_budget: 512}\n"
                 "  - {role: decode, count: 2, tp: 2, pp: 3, resources: {GPU: 1, decode_node: 0.01}}\n"
                 "  - {role: hybrid}\n")
    pre, dec, hyb = spec.groups
    assert (pre.tp, pre.pp, pre.world_size, pre.resources) == (2, 3, 6, {"CPU": 2, "GPU": 1})
    assert pre.overrides == {"token_budget": 512}
    assert dec.resources == {"GPU": 1, "decode_node": 0.01} and dec.overrides == {}
    assert (hyb.tp, hyb.pp, hyb.resources) == (1, 1, {"CPU": 1})     # the defaults
    assert ReplicaGroup().resources is not ReplicaGroup().resources  # not one shared dict


def test_the_module_docstring_examples_are_valid_specs():
    doc = cluster.spec.__doc__
    first = doc[doc.index("    model:"):doc.index("\n\nA group")]
    second = doc[doc.index("    replicas:", doc.index("A group")):doc.index("\n\n`resources`")]
    assert _spec(textwrap.dedent(first)).routing == "pd"
    spec = _spec(textwrap.dedent(second))
    assert [(g.role, g.count, g.tp, g.pp) for g in spec.groups] == [("prefill", 1, 2, 2),
                                                                     ("decode", 2, 2, 2)]
    assert spec.groups[1].resources == {"CPU": 1, "GPU": 1, "decode_node": 0.01}


@pytest.mark.parametrize("group, message", [
    ("tp: 0", r"replicas\[0\]: tp must be an integer >= 1, got 0"),
    ("tp: two", r"replicas\[0\]: tp must be an integer >= 1, got 'two'"),
    ("tp: true", "tp must be an integer >= 1, got True"),
    ("pp: 1.5", r"replicas\[0\]: pp must be an integer >= 1, got 1.5"),
    ("pp: -2", "pp must be an integer >= 1, got -2"),
    ("resources: {}", "resources must be a non-empty mapping"),
    ("resources: [GPU]", "resources must be a non-empty mapping .* got \\['GPU'\\]"),
    ("resources: {GPU: -1}", "resources: GPU must be a number >= 0, got -1"),
    ("resources: {GPU: lots}", "resources: GPU must be a number >= 0, got 'lots'"),
    ("resources: {GPU: .inf}", "resources: GPU must be a number >= 0, got inf"),
    ("resources: {GPU: 1.5}", "resources: GPU above 1 must be a whole number"),
    ("resources: {CPU: 0, GPU: 0}", "resources: at least one amount must be > 0"),
    ("resources: {gpu: 1}", "'gpu' is not a Ray resource; Ray spells it 'GPU'"),
])
def test_bad_tp_pp_resources_name_group_field_and_value(group, message):
    with pytest.raises(ValueError, match=message):
        _spec(f"replicas: [{{role: hybrid, {group}}}]")


def test_prefill_and_decode_groups_must_shard_alike():
    with pytest.raises(ValueError, match=r"prefill and decode groups must have equal tp and pp "
                                         r".*replicas\[0\] \(prefill\) has tp=2, pp=1, "
                                         r"replicas\[1\] \(decode\) has tp=1, pp=1"):
        _spec("replicas: [{role: prefill, tp: 2}, {role: decode}]")
    with pytest.raises(ValueError, match=r"replicas\[2\] \(decode\) has tp=2, pp=2"):
        _spec("replicas: [{role: prefill, tp: 2}, {role: decode, tp: 2}, {role: decode, tp: 2, pp: 2}]")
    # hybrid replicas push no KV, and an empty group starts nothing: both may differ
    spec = _spec("replicas: [{role: prefill, tp: 2}, {role: decode, tp: 2}, {role: hybrid, pp: 4},"
                 " {role: decode, count: 0}]")
    assert [g.tp for g in spec.groups] == [2, 2, 1, 1]


@pytest.mark.parametrize("model, tp, pp", [
    (SMOLLM2, 1, 1), (SMOLLM2, 3, 30), (LLAMA_7B, 8, 4), (LLAMA_7B, 32, 32), (MISTRAL_7B, 8, 2),
])
def test_model_check_accepts_what_the_model_can_split(model, tp, pp):
    _spec(f"replicas: [{{role: hybrid, tp: {tp}, pp: {pp}}}]").check_model(model)


@pytest.mark.parametrize("model, group, message", [
    (SMOLLM2, "tp: 4", r"replicas\[1\] \(hybrid\): tp=4 exceeds the model's 3 KV heads "
                       r"\(9 query heads\); .* tp <= 3"),
    (MISTRAL_7B, "tp: 16", r"replicas\[1\] \(hybrid\): tp=16 exceeds the model's 8 KV heads"),
    (SMOLLM2, "pp: 31", r"replicas\[1\] \(hybrid\): pp=31 exceeds the model's 30 layers; pp <= 30"),
    (LLAMA_7B, "pp: 33", "pp=33 exceeds the model's 32 layers"),
])
def test_model_check_names_group_field_and_limit(model, group, message):
    spec = _spec(f"replicas: [{{role: hybrid}}, {{role: hybrid, {group}}}]")
    with pytest.raises(ValueError, match=message):
        spec.check_model(model)


# --- placement ---------------------------------------------------------------------------------

def test_placement_is_pure():
    """The gateway and the tests plan without Ray (or torch) installed or loaded."""
    code = ("import sys, cluster.placement, cluster.spec, engine.model_config; "
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_nodes_each_replica_asks_for_one_strict_pack_group():
    spec = _spec("replicas: [{role: prefill, tp: 2, pp: 2, resources: {GPU: 1}},"
                 " {role: decode, count: 2, tp: 2, pp: 2, resources: {GPU: 1, CPU: 1}}]")
    reqs = plan_placement(spec)
    assert [(r.replica_id, r.stage, r.strategy) for r in reqs] == [
        ("prefill-0", None, STRICT_PACK), ("decode-0", None, STRICT_PACK), ("decode-1", None, STRICT_PACK)]
    assert reqs[0].ranks == ((0, 0), (0, 1), (1, 0), (1, 1))          # (stage, tp_rank)
    assert reqs[1].bundle_dicts() == [{"GPU": 1, "CPU": 1}] * 4
    assert reqs[1].total() == {"GPU": 4, "CPU": 4}
    assert [r.name for r in reqs] == ["tandem-prefill-0", "tandem-decode-0", "tandem-decode-1"]


def test_a_replica_that_fits_a_node_is_packed_on_it():
    spec = _spec("replicas: [{role: hybrid, count: 2, tp: 2, pp: 2, resources: {CPU: 1, GPU: 1}}]")
    for nodes in (_gpus(8), _gpus(4, 4)):   # one node for both, or one node each
        reqs = plan_placement(spec, nodes)
        assert [(r.replica_id, r.stage, len(r.bundles)) for r in reqs] == [
            ("hybrid-0", None, 4), ("hybrid-1", None, 4)]
        assert all(r.strategy == STRICT_PACK for r in reqs)


def test_a_replica_bigger_than_any_node_gets_a_group_per_pipeline_stage():
    spec = _spec("replicas: [{role: hybrid, tp: 4, pp: 2, resources: {CPU: 1, GPU: 1}}]")
    assert len(plan_placement(spec, _gpus(8))) == 1
    reqs = plan_placement(spec, _gpus(4, 4))
    assert reqs == [
        PlacementGroupRequest("hybrid-0", (Bundle({"CPU": 1, "GPU": 1}),) * 4,
                              ((0, 0), (0, 1), (0, 2), (0, 3)), stage=0),
        PlacementGroupRequest("hybrid-0", (Bundle({"CPU": 1, "GPU": 1}),) * 4,
                              ((1, 0), (1, 1), (1, 2), (1, 3)), stage=1),
    ]
    assert [r.name for r in reqs] == ["tandem-hybrid-0-stage0", "tandem-hybrid-0-stage1"]


def test_a_tp_group_bigger_than_any_node_is_refused_naming_replica_and_resource():
    spec = _spec("replicas: [{role: prefill, tp: 8, resources: {GPU: 1}},"
                 " {role: decode, tp: 8, resources: {GPU: 1}}]")
    with pytest.raises(PlacementError, match=r"^replica prefill-0 stage 0 needs GPU: 8 on one node "
                                             r"\(tp=8\); the largest node has GPU: 4$"):
        plan_placement(spec, _gpus(4, 4, 2))


def test_a_cluster_too_small_for_all_replicas_names_the_first_that_does_not_fit():
    spec = _spec("replicas: [{role: hybrid, count: 3, tp: 4, resources: {CPU: 1, GPU: 1}}]")
    with pytest.raises(PlacementError) as e:
        plan_placement(spec, _gpus(4, 4))
    assert str(e.value) == (
        "cannot place replica hybrid-2: it needs CPU: 4, GPU: 4 on one node, but once hybrid-0, "
        "hybrid-1 are placed at most GPU: 0 is free on any node; the spec needs GPU: 12 in all, "
        "the nodes have GPU: 8 (Ray would leave its placement group pending)")


def test_fragmented_nodes_are_refused_even_when_the_totals_suffice():
    spec = _spec("replicas: [{role: hybrid, count: 3, tp: 2, resources: {GPU: 1}}]")
    with pytest.raises(PlacementError, match=r"cannot place replica hybrid-2: it needs GPU: 2 on "
                                             r"one node, .* at most GPU: 1 is free on any node"):
        plan_placement(spec, _gpus(3, 3))          # 6 GPUs, but 2 + 1 and 2 + 1


def test_a_whole_replica_without_room_left_is_split_into_its_stages():
    spec = _spec("replicas: [{role: hybrid, count: 2, tp: 3, resources: {GPU: 1}},"
                 " {role: hybrid, pp: 2, resources: {GPU: 1}}]")
    reqs = plan_placement(spec, _gpus(4, 4))       # 3 + 3 leave 1 + 1 for the two stages
    assert [(r.replica_id, r.stage) for r in reqs] == [
        ("hybrid-0", None), ("hybrid-1", None), ("hybrid-2", 0), ("hybrid-2", 1)]


def test_a_custom_resource_pins_ranks_to_one_node_kind():
    nodes = [NodeResources("prefill-box", {"CPU": 32, "GPU": 4}),
             NodeResources("decode-box", {"CPU": 32, "GPU": 4, "decode_node": 1})]
    two = ("replicas: [{role: prefill, tp: 2, resources: {GPU: 1}},"
           " {role: decode, count: %d, tp: 2, resources: {GPU: 1, decode_node: 0.01}}]")
    assert [r.replica_id for r in plan_placement(_spec(two % 2), nodes)] == [
        "prefill-0", "decode-0", "decode-1"]
    # a third decode replica would fit the free GPUs of prefill-box, but not where it is pinned
    with pytest.raises(PlacementError, match=r"cannot place replica decode-2: it needs "
                                             r"GPU: 2, decode_node: 0.02 on one node, .* no node "
                                             r"has all of it free \(prefill-box has decode_node: 0; "
                                             r"decode-box has GPU: 0\)"):
        plan_placement(_spec(two % 3), nodes)
    # no node advertises the key at all
    with pytest.raises(PlacementError, match=r"replica decode-0 stage 0 needs GPU: 2, decode_node: "
                                             r"0.02 on one node \(tp=2\); the largest node has "
                                             r"decode_node: 0$"):
        plan_placement(_spec(two % 1), nodes[:1])
    # a node kind with the key but no GPUs, and GPU nodes without it
    split = [NodeResources("gpu", {"GPU": 8}), NodeResources("tag", {"CPU": 8, "decode_node": 1})]
    with pytest.raises(PlacementError, match=r"no node has all of it \(gpu has decode_node: 0; "
                                             r"tag has GPU: 0\)"):
        plan_placement(_spec("replicas: [{role: decode, resources: {GPU: 1, decode_node: 0.01}}]"), split)


def test_fractional_resources_add_up_without_drift():
    node = [NodeResources("n", {"CPU": 200, "decode_node": 1})]
    fits = "replicas: [{role: hybrid, count: 100, resources: {CPU: 1, decode_node: 0.01}}]"
    assert len(plan_placement(_spec(fits), node)) == 100
    with pytest.raises(PlacementError, match=r"cannot place replica hybrid-100: .* once hybrid-0, "
                                             r"hybrid-1, hybrid-2, hybrid-3 and 96 more are placed "
                                             r"at most decode_node: 0 is free"):
        plan_placement(_spec(fits.replace("100", "101")), node)


def test_no_nodes_is_an_error():
    with pytest.raises(PlacementError, match="no nodes"):
        plan_placement(_spec("replicas: [{role: hybrid}]"), [])
