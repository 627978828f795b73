"""A simulated replica: the real scheduler with the model runner replaced by a cost model.

One step is what `EngineCore.step` does, with simulated time:

    out = sched.schedule(t)
    dt = cost.step_time(out)                      # instead of runner.execute(out)
    sched.update(out, {rid: 0 for chunks that sample}, t + dt)
    sched.observe(iteration_stats(sched, out, ...))

With `cost.pp` > 1 pipeline stages, up to pp such batches (micro-batches) are in flight at once.
A new one is scheduled whenever stage 0 is free and fewer than pp are in flight (the scheduler's
`in_flight` set keeps their requests out of it); stage s of a batch starts when the batch has
left stage s-1 and stage s is free; the batch is `update`d when it leaves the last stage, so in
the order they were scheduled. Its telemetry step time is schedule-to-update: what a decode in it
sees as its time between tokens. With pp = 1 this is exactly the loop above.

Schedulers come unchanged from `scheduler.policies.make_scheduler` (every policy and budget
controller). Requests are `Request`s of `[0] * prompt_len` with
`SamplingParams(max_tokens=n, ignore_eos=True)` and no EOS ids, so the sampled token 0 never ends
a request early: it ends after exactly n tokens ("length"). Those prompts are placeholders, so
the schedulers run with `enable_prefix_caching=False` (set here, whatever the config says): the
simulator models no prefix sharing between requests. Like the real replica loop, messages
that reach a replica during a step (new requests, KV landings) are applied at the next step
boundary (`inbox`), never between `schedule` and `update`.

With `noise` (a `sim.noise.StepNoise`), every step's (and every stage's) time is multiplied by
its factor at the step's start: the variation of a served run's steps around the cost model.

The KV cache gets what is left of the device memory after the weights and an activation reserve,
divided by the engine's own `kv_bytes_per_block`; with stages, each GPU holds its stage's layers
(and their KV) only.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.model_config import DTYPE_BYTES, kv_bytes_per_block
from engine.protocol import ReplicaReady
from gateway.replica_state import ReplicaState
from scheduler.budget import StepTimeModel
from scheduler.config import SchedulerConfig
from scheduler.core import SchedulerOutput
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams
from scheduler.telemetry import iteration_stats
from sim.cost import CostModel, stage_layers
from sim.noise import StepNoise
from sim.specs import Device, ModelSpec

RESERVED_MEMORY_FRACTION = 0.10
"""Share of each GPU's memory not given to weights or KV: activations, CUDA context, NCCL
buffers, allocator slack. vLLM's default gpu_memory_utilization of 0.9 leaves the same 10%."""


def num_kv_blocks(model: ModelSpec, device: Device, tp: int = 1, block_size: int = 16,
                  dtype: str = "bfloat16",
                  reserved_fraction: float = RESERVED_MEMORY_FRACTION, pp: int = 1) -> int:
    """KV blocks of a replica of `tp` GPUs: per GPU, memory minus its share of the weights and the
    reserve, over its share of a block (`kv_bytes_per_block`; KV heads split by whole GQA groups,
    the rank with the most of them decides). With `pp` stages a GPU holds its stage's layers, of
    weights and of every block: stage 0 also the embedding, the last stage the LM head (its own
    copy, even when tied); the stage that fits the fewest blocks decides."""
    usable = device.memory_bytes * (1 - reserved_fraction)
    per_block = kv_bytes_per_block(model.model_config(), block_size, dtype)
    per_block_rank = per_block * model.max_kv_heads_per_rank(tp) / model.num_kv_heads
    if pp == 1:
        weights = model.weight_bytes(dtype) / tp
        blocks = int((usable - weights) // per_block_rank)
    else:
        b = DTYPE_BYTES[dtype]
        layers = stage_layers(model.num_layers, pp)
        embed = model.vocab_size * model.hidden_size
        stage_weights = [(n * model.params_per_layer + embed * ((s == 0) + (s == pp - 1))) * b / tp
                         for s, n in enumerate(layers)]
        fits = [int((usable - w) // (per_block_rank * n / model.num_layers))
                for w, n in zip(stage_weights, layers)]
        weights, blocks = max(stage_weights), min(fits)
    if blocks < 1:
        raise ValueError(f"{model.name} does not fit on {tp * pp} x {device.name} (tp {tp}, pp {pp}): "
                         f"{weights / 2**30:.1f} GiB of weights per GPU, "
                         f"{usable / 2**30:.1f} GiB usable")
    return blocks


def make_request(request_id: str, prompt_len: int, output_len: int, arrival: float) -> Request:
    return Request(request_id, [0] * prompt_len,
                   SamplingParams(max_tokens=output_len, ignore_eos=True), arrival)


@dataclass
class Step:
    """One batch (a micro-batch, with stages) from `schedule` to `update`."""

    out: SchedulerOutput
    start: float
    """When it was scheduled (and stage 0 took it)."""
    dt: float
    """Scheduled to updated: its latency through every stage, waits for busy stages included."""
    stage_ends: tuple[float, ...] = ()
    """When it leaves each stage (the last one: `end`); empty for a single-stage replica."""

    @property
    def end(self) -> float:
        """When it leaves the last stage and is updated."""
        return self.stage_ends[-1] if self.stage_ends else self.start + self.dt


class SimReplica:
    """One replica: a scheduler, a cost model (with `cost.pp` pipeline stages), a gateway-side
    `ReplicaState`, and an inbox of messages for its next step boundary."""

    def __init__(self, replica_id: str, role: str, config: SchedulerConfig, num_blocks: int,
                 cost: CostModel, step_model: StepTimeModel | None = None,
                 model_name: str = "sim", noise: StepNoise | None = None) -> None:
        if role not in ("hybrid", "prefill", "decode"):
            raise ValueError(f"role must be hybrid, prefill or decode, got {role!r}")
        self.replica_id, self.role, self.cost, self.noise = replica_id, role, cost, noise
        # Simulated prompts are placeholders ([0] * prompt_len, see `make_request`): with prefix
        # caching every prompt would share every other's blocks. The simulator models no prefix
        # sharing, so its schedulers run with caching off whatever the config says.
        self.sched = make_scheduler(replace(config, enable_prefix_caching=False), num_blocks, step_model)
        self.state = ReplicaState(replica_id, f"sim://{replica_id}", ready=ReplicaReady(
            replica_id, model_name, config.max_model_len, num_blocks, config.block_size, 0, role))
        self.inbox: list[Callable[[float], None]] = []
        # Cost models that do not say are single-stage (ProfiledCost: a profile times whole steps).
        self.pp: int = getattr(cost, "pp", 1)
        self.batches: deque[Step] = deque()
        """Batches in flight, oldest first (at most `pp`); they leave the last stage in order."""
        self.stage_free = [0.0] * self.pp
        """When each stage has finished the batches given to it so far."""
        self.stage_busy_s = [0.0] * self.pp
        """Seconds each stage has been busy (its sends included)."""
        self.iteration = 0
        self.num_blocks = num_blocks

    @property
    def step(self) -> Step | None:
        """The oldest batch in flight (the next to be updated), if any."""
        return self.batches[0] if self.batches else None

    @property
    def busy_s(self) -> float:
        """Busy seconds of the average stage (single stage: the sum of step times)."""
        return sum(self.stage_busy_s) / self.pp

    def can_start(self, now: float) -> bool:
        """Whether a batch may be scheduled at `now`: stage 0 free and a micro-batch slot open."""
        return len(self.batches) < self.pp and self.stage_free[0] <= now

    def start_step(self, now: float) -> Step | None:
        """Apply the inbox, then schedule a batch at `now`; None if there is nothing to compute
        (the replica then waits for a batch to leave, or, with none in flight, for a message)."""
        assert self.can_start(now), "stage 0 is busy or every micro-batch slot is taken"
        inbox, self.inbox = self.inbox, []
        for message in inbox:
            message(now)
        if not self.sched.has_work():
            return None
        out = self.sched.schedule(now)
        if out.is_empty:
            return None
        scale = self.noise.factor(now, out.num_prefill_tokens > 0) if self.noise else 1.0
        if self.pp == 1:
            step = Step(out, now, self.cost.step_time(out) * scale)
            self.stage_free[0] = step.end
            self.stage_busy_s[0] += step.dt
        else:
            ends, t = [], now
            for s, busy in enumerate(self.cost.stage_times(out)):
                busy *= scale
                t = max(t, self.stage_free[s]) + busy
                self.stage_free[s] = t
                self.stage_busy_s[s] += busy
                ends.append(t)
            step = Step(out, now, t - now, tuple(ends))
        self.batches.append(step)
        return step

    def finish_step(self) -> list[Request]:
        """The oldest batch leaves the last stage: `update` with token 0 for every sampling chunk
        at its end time, then its telemetry to the budget controller. Returns the updated
        requests."""
        step = self.batches.popleft()
        end = step.end
        out = step.out
        updated = self.sched.update(out, {c.request.request_id: 0 for c in out.chunks if c.samples}, end)
        self.sched.observe(iteration_stats(self.sched, out, iteration=self.iteration, time=end,
                                           step_time=step.dt))
        self.iteration += 1
        return updated

    @property
    def idle(self) -> bool:
        """No batch in flight."""
        return not self.batches

    @property
    def free_blocks(self) -> int:
        return self.sched.block_manager.num_free_blocks
