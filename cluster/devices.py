"""Which device each replica of a node runs on. Pure functions, imported lazily by the CLI; torch
is imported only to count GPUs, when a bare `cuda` device is shared by several replicas."""
from __future__ import annotations

from collections.abc import Callable, Sequence


def replica_devices(device: str, replica_ids: Sequence[str],
                    device_count: Callable[[], int] | None = None) -> dict[str, str]:
    """replica id -> torch device. A bare `cuda` with several replicas gives replica i `cuda:i`
    (one GPU each; an error if torch sees fewer GPUs than replicas). Anything else (`cpu`, an
    explicit `cuda:N`, a single replica) applies to every replica as given.
    `device_count` defaults to torch.cuda.device_count (imported only when needed)."""
    n = len(replica_ids)
    if device.strip().lower() != "cuda" or n <= 1:
        return {rid: device for rid in replica_ids}
    count = (device_count or _cuda_device_count)()
    if count < n:
        raise ValueError(f"--device cuda puts each of the {n} replicas on its own GPU, but torch "
                         f"sees {count} CUDA device(s); start at most {count} replicas, or give an "
                         f"explicit --device cuda:N to share one GPU (not with --kv-transport torch)")
    return {rid: f"cuda:{i}" for i, rid in enumerate(replica_ids)}


def check_kv_devices(devices: dict[str, str]) -> None:
    """torch KV transport: the ranks (replica id -> device) must agree on the backend, and under
    NCCL each needs a GPU of its own (NCCL refuses two ranks on one device)."""
    from kv_transfer.config import kv_backend  # noqa: PLC0415 - the one place the backend is chosen

    backends = {rid: kv_backend(dev) for rid, dev in devices.items()}
    if len(set(backends.values())) > 1:
        raise ValueError(f"--kv-transport torch needs every prefill/decode replica on the same kind "
                         f"of device (gloo for CPU, nccl for CUDA), got {devices}")
    if "nccl" not in backends.values():
        return
    seen: dict[str, str] = {}
    for rid, dev in devices.items():
        key = dev if ":" in dev else "cuda:0"   # bare `cuda` is the current device, 0 in a fresh process
        if key in seen:
            raise ValueError(f"--kv-transport torch over NCCL needs one GPU per replica, but "
                             f"{seen[key]} and {rid} are both on {key}")
        seen[key] = rid


def _cuda_device_count() -> int:
    import torch  # noqa: PLC0415 - only when a cuda device is requested

    return torch.cuda.device_count()


__all__ = ["check_kv_devices", "replica_devices"]
