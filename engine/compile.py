"""The compiled forward: torch.compile (inductor) with frozen weights and dynamic row counts.

Why these choices (measured on the 2-core AVX512-BF16 development VM, SmolLM2-135M):
- Eager, a batch-1 decode step is mostly per-op dispatch; inductor fuses norms, RoPE, residuals
  and SiLU into a few C++ loops and, with `freezing`, prepacks every weight for oneDNN, which makes
  the GEMMs themselves faster (bf16 batch-1 matmuls 18.6 ms eager -> 13.6 ms frozen).
- Attention is one custom op (`tandem::paged_attention`, engine/attention.py): inductor calls it as
  an extern kernel, so ragged sequence lengths, block tables and the prefill/decode split never
  reach the graph's shapes.
- Row counts are dynamic instead of bucketed: the step's rows T and logit rows N are marked
  dynamic, so one graph serves every batch size without padding to a bucket. Dynamo specialises
  a size of 1, so the runner pads a lone decode to two rows (the extra row writes into a scratch
  block) and a single logit row to two; a batch-1 step costs the same either way (the GEMMs are
  bound by reading weights). One graph for bf16/fp32; with int8 linears, which branch on the row
  count, a graph fixed at INT8_MAX_ROWS (2) rows for the int8 kernel and a dynamic one above.
  Warm-up compiles them all (logged); serving afterwards never recompiles
  (`recompiles_since_warmup` counts it if it ever does; a test holds it at 0).
- Freezing makes inductor bypass its FX-graph cache (prepacked oneDNN weights cannot be
  pickled), so every start re-runs inductor on the graph; the C++ it generates is cached on disk
  (`~/.cache/tandem/inductor`, or TORCHINDUCTOR_CACHE_DIR), which saves gcc's share on the next
  start (SmolLM2: 55-60 s on a fresh cache, 32-33 s cached). Without freezing the FX-graph cache
  works (21 s cached) but steps are 20-50% slower (batch-1 decode 22.7-29.4 vs 18.7 ms, batch 32
  78-89 vs 57-68 ms), so freezing wins.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from engine.quant import INT8_MAX_ROWS
from engine.step_batch import StepBatch

if TYPE_CHECKING:
    from engine.runner import ModelRunner

log = logging.getLogger("tandem.compile")


def inductor_cache_dir() -> str:
    env = os.environ.get("TANDEM_CACHE_DIR")
    base = os.path.dirname(os.path.expanduser(env)) if env else os.path.expanduser("~/.cache/tandem")
    return os.path.join(base, "inductor")


def _configure_inductor() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    inductor_config.freezing = True
    # The graph's wrapper in C++ rather than Python: ~330 kernel launches per step at batch 1 cost
    # ~2 ms of Python; measured 17.4 vs 18.7 ms per batch-1 decode step, for ~15 s more compile.
    inductor_config.cpp_wrapper = True
    # Shape/alignment asserts are debugging aids that cost ~6 Python calls per layer per step.
    inductor_config.size_asserts = False
    inductor_config.alignment_asserts = False
    _stable_wrapper_source()


def _stable_wrapper_source() -> None:
    """Make the C++ wrapper's source, and so its on-disk cache key, the same on every start.

    Inductor writes a comment per frozen weight into the wrapper, ending in the weight's data
    pointer, so the code cache never hits across processes and every start spends ~15 s in gcc
    on the same ~280 KB of C++. In the JIT (non-AOT) wrapper the weights are arguments of every
    call, not part of the compiled code, so the pointer is not needed to tell graphs apart; the
    comment keeps name, dtype, shape and strides."""
    try:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu  # noqa: PLC0415
    except ImportError:
        return
    if getattr(CppWrapperCpu, "_tandem_stable", False):
        return
    original = CppWrapperCpu.write_constant

    def write_constant(self, name, hashed):
        description = hashed.rsplit(" ", 1)[0] if " " in hashed else hashed
        return original(self, name, description)

    CppWrapperCpu.write_constant = write_constant
    CppWrapperCpu._tandem_stable = True


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"])


def warmup_batches(runner: "ModelRunner") -> list[tuple[str, StepBatch]]:
    """One synthetic step per graph the compiled forward needs: one for every row count (the
    runner pads to two rows and two logit rows), two with int8 linears (which branch on the row
    count). Their K/V land in the scratch block, which no request uses."""
    sizes = [("any batch", 16, 3)]
    if runner.config.quantization == "int8":
        sizes = [("small batches", INT8_MAX_ROWS, INT8_MAX_ROWS), ("large batches", 16, 3)]
    batches = []
    for name, rows, logits in sizes:
        scratch = runner.scratch_block * runner.block_size
        batches.append((name, StepBatch(
            input_ids=np.ones(rows, np.int64), positions=np.zeros(rows, np.int64),
            slot_mapping=np.full(rows, scratch, np.int64),
            seq_info=np.array([[i, 1, 1] for i in range(rows)], np.int32),
            block_table=np.full((rows, 1), runner.scratch_block, np.int32),
            num_short_seqs=rows, logit_rows=np.arange(logits, dtype=np.int64))))
    return batches


class CompiledForward:
    """`model.forward` and `model.compute_logits` under torch.compile, marking row counts
    dynamic on every call. The LM head is a graph of its own, so prompt logprobs (echo) can run it
    on any rows of the body's output."""

    def __init__(self, model, static_rows: int = 1) -> None:
        """`static_rows`: calls with at most this many rows are not marked dynamic. The model
        branches on row counts up to it (int8 linears), so dynamo gives them a graph of their own
        with those sizes fixed; marking them dynamic would be an error."""
        import torch  # noqa: PLC0415

        self._torch = torch
        self.static_rows = static_rows
        self._compiled = torch.compile(model, fullgraph=True)
        self._logits = torch.compile(model.compute_logits, fullgraph=True)
        self.graphs_after_warmup: int | None = None

    def compute_logits(self, hidden):
        if hidden.shape[0] > self.static_rows:
            self._torch._dynamo.mark_dynamic(hidden, 0)
        return self._logits(hidden)

    def __call__(self, input_ids, positions, kv_caches, attn, logit_rows, backend, hidden_in=None):
        # Compiled only without parallelism, where a forward always starts from the embedding.
        assert hidden_in is None, "a compiled forward does not take a previous stage's activations"
        mark = self._torch._dynamo.mark_dynamic
        if input_ids.shape[0] > self.static_rows:
            for t in (input_ids, positions, attn.slot_mapping):
                mark(t, 0)
            if logit_rows.shape[0] > 1:
                mark(logit_rows, 0)
        return self._compiled(input_ids, positions, kv_caches, attn, logit_rows, backend)

    @property
    def recompiles_since_warmup(self) -> int:
        return 0 if self.graphs_after_warmup is None else _unique_graphs() - self.graphs_after_warmup


def compile_runner(runner: "ModelRunner") -> float:
    """Compile `runner`'s forward and warm every graph up; returns the seconds it took."""
    if runner.device.type != "cpu":
        log.info("--compile is CPU-only for now; %s runs eagerly", runner.device)
        return 0.0
    _configure_inductor()
    start = time.perf_counter()
    int8 = runner.config.quantization == "int8"
    compiled = CompiledForward(runner.model, static_rows=INT8_MAX_ROWS if int8 else 1)
    runner.use_forward(compiled, compiled.compute_logits, min_rows=2)
    batches = warmup_batches(runner)
    for i, (name, batch) in enumerate(batches, 1):
        t = time.perf_counter()
        runner.compute_logits(runner.forward(batch))
        log.info("compiled forward %d/%d (%s, %d rows): %.1f s", i, len(batches), name,
                 batch.num_tokens, time.perf_counter() - t)
    compiled.graphs_after_warmup = _unique_graphs()
    seconds = time.perf_counter() - start
    log.info("forward compiled in %.1f s (inductor cache: %s)", seconds,
             os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return seconds
