"""In-process engine benchmark: decode step time per batch size, prefill throughput, compile time,
and the host work of a step (everything that is not the model forward).

    tandem bench-engine [--batch-sizes 1 8 32] [--context 512] [--prefill-len 512] [--no-compile]

A step is `EngineCore.step()`: schedule, prepare the StepBatch, forward (layers + LM head of the
sampled rows), sample, update, detokenize. Framing is timed separately: encoding the step's
outputs into the msgpack frame a replica sends to the gateway.
"""
from __future__ import annotations

import statistics
import time

import torch

from engine import protocol
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.runner import StepTimes
from scheduler.request import SamplingParams


def _timed_steps(engine: EngineCore, repeats: int) -> tuple[float, StepTimes, float]:
    """Median step time, median of each part, median framing time, over `repeats` steps."""
    engine.step()  # warm-up
    totals, parts, frames = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = engine.step()
        totals.append(time.perf_counter() - start)
        parts.append(engine.runner.times)
        start = time.perf_counter()
        protocol.encode(protocol.StepOutputs("bench", outputs, engine.stats(), [engine.last_step]))
        frames.append(time.perf_counter() - start)
    median = StepTimes(**{f: statistics.median(getattr(p, f) for p in parts)
                          for f in StepTimes.__dataclass_fields__})
    return statistics.median(totals), median, statistics.median(frames)


def run_engine_bench(config: EngineConfig, batch_sizes: list[int], context: int,
                     prefill_len: int, repeats: int) -> None:
    start = time.perf_counter()
    engine = EngineCore(config)
    load_s = time.perf_counter() - start
    runner, mc = engine.runner, engine.model_config
    compiled = (f"compiled in {runner.compile_seconds:.1f} s" if config.compile
                else "eager (--no-compile)")
    print(f"model {config.model_name}: {mc.num_layers} layers, hidden {mc.hidden_size}, "
          f"dtype {str(runner.dtype).removeprefix('torch.')}, quantization {config.quantization}, "
          f"{compiled}; start-up {load_s:.1f} s; {torch.get_num_threads()} threads, token budget "
          f"{config.scheduler.token_budget}, tp {config.tp} x pp {config.pp}")

    print(f"\ndecode step (context {context} tokens), median of {repeats}:")
    print(f"{'batch':>6} {'step ms':>9} {'forward ms':>11} {'host ms':>8} {'host %':>7} "
          f"{'frame ms':>9} {'tok/s':>8}")
    host_rows = []
    for b in batch_sizes:
        # Long enough that no request finishes while the others still prefill (they are aborted
        # after the timed steps).
        sampling = SamplingParams(max_tokens=config.scheduler.max_model_len - context,
                                  temperature=0.0, ignore_eos=True)
        for i in range(b):
            prompt = [(7 * i + j) % mc.vocab_size + 1 for j in range(context)]
            err = engine.add_request(f"bench-{b}-{i}", prompt, sampling)
            if err:
                raise SystemExit(f"cannot add request: {err.error}")
        while any(r.num_uncomputed_tokens > 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill everything (not timed)
        assert len(engine.scheduler.running) == b, "a request finished before the timed steps"
        step, parts, frame = _timed_steps(engine, repeats)
        engine.abort([f"bench-{b}-{i}" for i in range(b)])
        host = parts.host + frame
        host_rows.append((b, parts, frame, step))
        print(f"{b:>6} {step * 1e3:>9.2f} {parts.forward * 1e3:>11.2f} {host * 1e3:>8.2f} "
              f"{host / step:>7.1%} {frame * 1e3:>9.3f} {b / step:>8.1f}")

    b, parts, frame, step = host_rows[0]
    print(f"\nhost work per step at batch {b} (ms): schedule {parts.schedule * 1e3:.3f}, prepare "
          f"{parts.prepare * 1e3:.3f}, sample {parts.sample * 1e3:.3f}, update+detokenize "
          f"{parts.update * 1e3:.3f}, frame {frame * 1e3:.3f} = {(parts.host + frame) * 1e3:.2f} "
          f"({(parts.host + frame) / step:.1%} of the step)")

    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def prefill(salt: int) -> None:
        # A prompt of its own each time: a repeated one would come from the prefix cache.
        engine.add_request("bench-prefill", [(3 * j + salt) % mc.vocab_size + 1 for j in range(prefill_len)],
                           sampling)
        while engine.has_work():
            engine.step()

    prefill(0)  # warm-up
    times = []
    for rep in range(max(1, repeats // 4)):
        start = time.perf_counter()
        prefill(rep + 1)
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    chunks = -(-prefill_len // config.scheduler.token_budget)
    print(f"\nprefill of {prefill_len} tokens in {chunks} chunk(s) of the token budget: "
          f"{prefill_len / t:.0f} tok/s ({t * 1e3:.1f} ms to the first token)")
    if runner.recompiles_since_warmup:
        print(f"warning: {runner.recompiles_since_warmup} graph(s) compiled after warm-up")
    runner.close()
