"""KV transport backend from the engine's device, and one GPU per replica (pure; runs on CPU)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.devices import check_kv_devices, replica_devices
from kv_transfer.config import kv_backend, kv_transport_device


@pytest.mark.parametrize("device, backend, transport_device", [
    ("cpu", "gloo", "cpu"), ("cuda", "nccl", "cuda"), ("cuda:1", "nccl", "cuda:1"),
    ("CUDA:0", "nccl", "CUDA:0"), ("mps", "gloo", "cpu"),
])
def test_backend_and_transport_device_follow_the_engine_device(device, backend, transport_device):
    assert kv_backend(device) == backend
    assert kv_transport_device(device, backend) == transport_device


def test_gloo_on_a_cuda_engine_stays_on_the_cpu_and_nccl_refuses_cpu():
    assert kv_transport_device("cuda:1", "gloo") == "cpu"
    with pytest.raises(ValueError, match="nccl backend moves CUDA tensors only.*'cpu'"):
        kv_transport_device("cpu", "nccl")


IDS = ["prefill-0", "decode-0", "decode-1"]


def _no_torch() -> int:
    raise AssertionError("the GPU count must not be asked for here")


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_explicit_devices_apply_to_every_replica(device):
    assert replica_devices(device, IDS, device_count=_no_torch) == dict.fromkeys(IDS, device)


def test_a_single_replica_keeps_bare_cuda():
    assert replica_devices("cuda", ["hybrid-0"], device_count=_no_torch) == {"hybrid-0": "cuda"}


def test_bare_cuda_gives_each_replica_its_own_gpu():
    assert replica_devices("cuda", IDS, device_count=lambda: 4) == {
        "prefill-0": "cuda:0", "decode-0": "cuda:1", "decode-1": "cuda:2"}


def test_too_few_gpus_is_an_error_naming_the_numbers():
    with pytest.raises(ValueError, match=r"each of the 3 replicas.*torch sees 2 CUDA device"):
        replica_devices("cuda", IDS, device_count=lambda: 2)


def test_kv_device_checks():
    check_kv_devices(dict.fromkeys(IDS, "cpu"))                       # gloo: sharing is fine
    check_kv_devices({"prefill-0": "cuda:0", "decode-0": "cuda:1"})
    with pytest.raises(ValueError, match="prefill-0 and decode-0 are both on cuda:1"):
        check_kv_devices({"prefill-0": "cuda:1", "decode-0": "cuda:1"})
    with pytest.raises(ValueError, match="both on cuda:0"):
        check_kv_devices({"prefill-0": "cuda", "decode-0": "cuda:0"})
    with pytest.raises(ValueError, match="same kind of device"):
        check_kv_devices({"prefill-0": "cpu", "decode-0": "cuda:0"})


def test_device_assignment_does_not_load_torch():
    code = ("import sys, cluster.devices as d, cluster.net; "
            "d.replica_devices('cuda', ['a']); d.replica_devices('cpu', ['a', 'b']); "
            "d.replica_devices('cuda:1', ['a', 'b']); cluster.net.free_port(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


class _Launcher:
    def ipc_addr(self, name: str) -> str:
        return f"ipc:///tmp/x/{name}"


def _specs(device: str, transport: str, monkeypatch, gpus: int = 8):
    import cluster.devices
    from cluster.cli import _replica_specs
    from cluster.spec import DeploymentSpec, ReplicaGroup
    from engine.config import EngineConfig

    monkeypatch.setattr(cluster.devices, "_cuda_device_count", lambda: gpus)
    dep = DeploymentSpec(groups=(ReplicaGroup("prefill", 1), ReplicaGroup("decode", 2)),
                         kv_transport=transport)
    return _replica_specs(dep, EngineConfig(model_dir="m", device=device, threads=1), _Launcher(), 30.0)


def test_replica_specs_put_each_replica_on_its_gpu(monkeypatch):
    specs = _specs("cuda", "torch", monkeypatch)
    assert [(s.replica_id, s.engine.device, s.kv.rank) for s in specs] == [
        ("prefill-0", "cuda:0", 0), ("decode-0", "cuda:1", 1), ("decode-1", "cuda:2", 2)]
    assert {s.kv.world_size for s in specs} == {3}
    assert [s.engine.device for s in _specs("cpu", "torch", monkeypatch)] == ["cpu"] * 3


def test_replica_specs_errors_are_clear(monkeypatch):
    with pytest.raises(SystemExit, match="3 replicas.*torch sees 2"):
        _specs("cuda", "zmq", monkeypatch, gpus=2)
    with pytest.raises(SystemExit, match="one GPU per replica.*both on cuda:1"):
        _specs("cuda:1", "torch", monkeypatch)
    assert [s.engine.device for s in _specs("cuda:1", "zmq", monkeypatch)] == ["cuda:1"] * 3


def test_free_port_moved_to_cluster_and_still_in_bench():
    import bench.server
    import cluster.net

    assert bench.server.free_port is cluster.net.free_port
    assert 0 < cluster.net.free_port() < 65536
