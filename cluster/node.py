"""Entry point of one node process: `python -m cluster.node --role ...` (the launcher runs it;
Ray actors will construct the same server classes). The servers do not know how they were started."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import torch

from engine.config import EngineConfig
from engine.replica import ReplicaServer
from kv_transfer.config import KVConfig

log = logging.getLogger("tandem.node")


def build_server(role: str, replica_id: str, config: EngineConfig, input_addr: str,
                 output_addr: str, kv: KVConfig) -> ReplicaServer:
    if config.device.startswith("cuda:"):
        # Bind the process to its GPU (the launcher gives each replica its own, cuda:i), so work
        # that uses "the current device" (NCCL, kernels, workspaces) lands there too.
        torch.cuda.set_device(torch.device(config.device))
    if role == "hybrid":
        return ReplicaServer(replica_id, config, input_addr, output_addr)
    if kv.transport == "torch":
        from kv_transfer.torch_transport import init_process_group  # noqa: PLC0415 - torch transport only

        # The backend follows the engine's device: gloo for CPU engines, nccl (on this GPU) for
        # CUDA ones; the transports then default to that device.
        init_process_group(kv.rank, kv.world_size, kv.master_port, device=config.device,
                           timeout_s=kv.timeout_s * 4)
    if role == "prefill":
        from prefill_node.server import PrefillServer  # noqa: PLC0415

        return PrefillServer(replica_id, config, input_addr, output_addr, kv)
    if role == "decode":
        from decode_node.server import DecodeServer  # noqa: PLC0415

        return DecodeServer(replica_id, config, input_addr, output_addr, kv)
    raise ValueError(f"unknown role {role!r}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run one Tandem replica (started by `tandem serve`).")
    p.add_argument("--role", choices=["hybrid", "prefill", "decode"], default="hybrid")
    p.add_argument("--replica-id", required=True)
    p.add_argument("--input-addr", required=True, help="ZeroMQ address this replica binds for requests")
    p.add_argument("--output-addr", required=True, help="ZeroMQ address of the gateway's output socket")
    p.add_argument("--config-json", required=True, help="EngineConfig as JSON")
    p.add_argument("--kv-json", default="{}", help="KVConfig as JSON (prefill/decode nodes)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = EngineConfig.from_dict(json.loads(args.config_json))
    if config.threads:
        torch.set_num_threads(config.threads)
    server = build_server(args.role, args.replica_id, config, args.input_addr, args.output_addr,
                          KVConfig(**json.loads(args.kv_json)))
    # Until here SIGTERM kills outright (model loading); from now on it ends the loop cleanly.
    # SIGINT too: Ctrl-C in a terminal reaches every process of the group, and the gateway sends
    # Shutdown anyway, so a replica ends quietly instead of with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    log.info("%s replica %s ready: %d KV blocks, %d threads", args.role, args.replica_id,
             server.engine.runner.num_blocks, torch.get_num_threads())
    server.serve()
    sys.exit(server.exit_code)


if __name__ == "__main__":
    main()
