"""A simulated replica: the real scheduler with the model runner replaced by a cost model.

One step is what `EngineCore.step` does, with simulated time:

    out = sched.schedule(t)
    dt = cost.step_time(out)                      # instead of runner.execute(out)
    sched.update(out, {rid: 0 for chunks that sample}, t + dt)
    sched.observe(iteration_stats(sched, out, ...))

Schedulers come unchanged from `scheduler.policies.make_scheduler` (every policy and budget
controller). Requests are `Request`s of `[0] * prompt_len` with
`SamplingParams(max_tokens=n, ignore_eos=True)` and no EOS ids, so the sampled token 0 never ends
a request early: it ends after exactly n tokens ("length"). Like the real replica loop, messages
that reach a replica during a step (new requests, KV landings) are applied at the next step
boundary (`inbox`), never between `schedule` and `update`.

The KV cache gets what is left of the device memory after the weights and an activation reserve,
divided by the engine's own `kv_bytes_per_block`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.model_config import kv_bytes_per_block
from engine.protocol import ReplicaReady
from gateway.replica_state import ReplicaState
from scheduler.budget import StepTimeModel
from scheduler.config import SchedulerConfig
from scheduler.core import SchedulerOutput
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams
from scheduler.telemetry import iteration_stats
from sim.cost import CostModel
from sim.specs import Device, ModelSpec

RESERVED_MEMORY_FRACTION = 0.10
"""Share of each GPU's memory not given to weights or KV: activations, CUDA context, NCCL
buffers, allocator slack. vLLM's default gpu_memory_utilization of 0.9 leaves the same 10%."""


def num_kv_blocks(model: ModelSpec, device: Device, tp: int = 1, block_size: int = 16,
                  dtype: str = "bfloat16",
                  reserved_fraction: float = RESERVED_MEMORY_FRACTION) -> int:
    """KV blocks of a replica of `tp` GPUs: per GPU, memory minus its share of the weights and the
    reserve, over its share of a block (`kv_bytes_per_block`; KV heads split by whole GQA groups,
    the rank with the most of them decides)."""
    free = device.memory_bytes * (1 - reserved_fraction) - model.weight_bytes(dtype) / tp
    per_block = kv_bytes_per_block(model.model_config(), block_size, dtype)
    per_block_rank = per_block * model.max_kv_heads_per_rank(tp) / model.num_kv_heads
    blocks = int(free // per_block_rank)
    if blocks < 1:
        raise ValueError(f"{model.name} does not fit on {tp} x {device.name}: "
                         f"{model.weight_bytes(dtype) / tp / 2**30:.1f} GiB of weights per GPU, "
                         f"{device.memory_bytes * (1 - reserved_fraction) / 2**30:.1f} GiB usable")
    return blocks


def make_request(request_id: str, prompt_len: int, output_len: int, arrival: float) -> Request:
    return Request(request_id, [0] * prompt_len,
                   SamplingParams(max_tokens=output_len, ignore_eos=True), arrival)


@dataclass
class Step:
    out: SchedulerOutput
    start: float
    dt: float


class SimReplica:
    """One replica: a scheduler, a cost model, a gateway-side `ReplicaState`, and an inbox of
    messages for its next step boundary."""

    def __init__(self, replica_id: str, role: str, config: SchedulerConfig, num_blocks: int,
                 cost: CostModel, step_model: StepTimeModel | None = None,
                 model_name: str = "sim") -> None:
        if role not in ("hybrid", "prefill", "decode"):
            raise ValueError(f"role must be hybrid, prefill or decode, got {role!r}")
        self.replica_id, self.role, self.cost = replica_id, role, cost
        self.sched = make_scheduler(config, num_blocks, step_model)
        self.state = ReplicaState(replica_id, f"sim://{replica_id}", ready=ReplicaReady(
            replica_id, model_name, config.max_model_len, num_blocks, config.block_size, 0, role))
        self.inbox: list[Callable[[float], None]] = []
        self.step: Step | None = None
        self.iteration = 0
        self.busy_s = 0.0
        self.num_blocks = num_blocks

    def start_step(self, now: float) -> Step | None:
        """Apply the inbox, then schedule a step at `now`; None if there is nothing to compute
        (the replica idles until a message arrives)."""
        assert self.step is None, "a step is already running"
        inbox, self.inbox = self.inbox, []
        for message in inbox:
            message(now)
        if not self.sched.has_work():
            return None
        out = self.sched.schedule(now)
        if out.is_empty:
            return None
        self.step = Step(out, now, self.cost.step_time(out))
        return self.step

    def finish_step(self) -> list[Request]:
        """End the running step at its end time: `update` with token 0 for every sampling chunk,
        then the step's telemetry to the budget controller. Returns the updated requests."""
        step, self.step = self.step, None
        assert step is not None
        end = step.start + step.dt
        out = step.out
        updated = self.sched.update(out, {c.request.request_id: 0 for c in out.chunks if c.samples}, end)
        self.sched.observe(iteration_stats(self.sched, out, iteration=self.iteration, time=end,
                                           step_time=step.dt))
        self.iteration += 1
        self.busy_s += step.dt
        return updated

    @property
    def idle(self) -> bool:
        return self.step is None

    @property
    def free_blocks(self) -> int:
        return self.sched.block_manager.num_free_blocks
