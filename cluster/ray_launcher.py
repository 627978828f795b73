"""Replicas as Ray actors in placement groups (`tandem serve --ray-address ADDR`, or `--ray local`
for a private single-node Ray).

Life cycle of a replica on a Ray cluster:
1. `cluster.placement.plan_placement` turns its group into a placement-group request (one bundle
   per rank, STRICT_PACK: a replica's ranks share a node); the group must be ready within
   `ready_timeout_s`, else the error names the replica and what it asked for (Ray would leave it
   pending forever);
2. a `ReplicaActor` starts in bundle 0 with that bundle's resources; `start()` builds the node
   server (the same classes as `python -m cluster.node`) bound at `tcp://<its node ip>:<free
   port>` (a decode node's KV address likewise) and returns the input address; its tp/pp worker
   ranks are its own child processes on that node (the other bundles reserve their resources);
3. `serve()` runs the replica loop in the actor; its ObjectRef ends when the loop does, or fails
   when the actor dies, which `dead()` reports at once (`ray.wait`, no timeout);
4. `restart()` kills the actor and starts a new one in the same placement group (a new address:
   the gateway reconnects when its `ReplicaReady` arrives); `stop()` kills every actor and
   removes the groups. No per-step data goes through Ray: requests and tokens travel over the
   replica's ZeroMQ sockets, as with local processes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace

from cluster.launcher import ReplicaSpec
from cluster.net import free_port

log = logging.getLogger("tandem.ray")

SERVE_EXITED = 0
"""`dead()` code of a replica whose loop ended by itself (Shutdown)."""
ACTOR_DIED = -9
"""`dead()` code of a replica whose actor died (killed, crashed, node lost)."""


def _actor_class():
    import ray  # noqa: PLC0415 - only with --ray-address

    @ray.remote(max_restarts=0)
    class ReplicaActor:
        """One replica's driver process on a Ray node."""

        def start(self, role: str, replica_id: str, config: dict, kv: dict, output_addr: str) -> str:
            import torch  # noqa: PLC0415 - in the actor process

            from cluster.node import build_server  # noqa: PLC0415
            from engine.config import EngineConfig  # noqa: PLC0415
            from kv_transfer.config import KVConfig  # noqa: PLC0415

            ip = ray.util.get_node_ip_address()
            cfg = EngineConfig.from_dict(config)
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            kv_cfg = KVConfig(**kv)
            if role == "decode" and kv_cfg.transport == "zmq":
                kv_cfg = replace(kv_cfg, kv_addr=f"tcp://{ip}:0")
            self.server = build_server(role, replica_id, cfg, f"tcp://{ip}:*", output_addr, kv_cfg)
            return self.server.input_addr

        def serve(self) -> int:
            self.server.serve()
            return self.server.exit_code

        def pid(self) -> int:
            return os.getpid()

    return ReplicaActor


class RayLauncher:
    """Starts replicas as Ray actors; the same `start` / `dead` / `restart` / `stop` as
    `LocalLauncher`, so the supervisor and the serve loop do not know which one they drive."""

    def __init__(self, address: str | None, ready_timeout_s: float = 120.0) -> None:
        """`address`: a running cluster to join (host:port, or "auto"); None starts a private
        single-node Ray for this `tandem serve` (no dashboard, its own short temp dir)."""
        import ray  # noqa: PLC0415 - only with --ray-address / --ray local

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if address is None:
            self._temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # AF_UNIX paths: keep it short
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     _temp_dir=self._temp)
        else:
            self._temp = None
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        self._ray = ray
        self.ready_timeout_s = ready_timeout_s
        self.output_addr = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
        self.specs: dict[str, ReplicaSpec] = {}
        self._groups: dict[str, object] = {}
        self._bundles: dict[str, list[dict]] = {}
        self._actors: dict[str, object] = {}
        self._serving: dict[str, object] = {}
        self._actor_class = _actor_class()

    def nodes(self) -> list:
        """The live nodes and their resources, for `cluster.placement.plan_placement`."""
        from cluster.placement import NodeResources  # noqa: PLC0415

        return [NodeResources(n["NodeManagerAddress"], n["Resources"])
                for n in self._ray.nodes() if n["Alive"]]

    def ipc_addr(self, name: str) -> str:
        """Placeholder: a Ray replica binds its addresses on its own node (`ReplicaActor.start`)."""
        return f"tcp://assigned-on-the-node/{name}"

    def place(self, replica_id: str, bundles: list[dict], strategy: str = "STRICT_PACK") -> None:
        """Reserve the replica's bundles; an error names the replica if Ray cannot within the
        timeout (a spec the cluster cannot hold)."""
        from ray.util.placement_group import placement_group  # noqa: PLC0415

        group = placement_group(bundles, strategy=strategy, name=f"tandem-{replica_id}")
        ready, _ = self._ray.wait([group.ready()], timeout=self.ready_timeout_s)
        if not ready:
            self._ray.util.remove_placement_group(group)
            raise RuntimeError(f"replica {replica_id}: Ray could not place {bundles} "
                               f"({strategy}) within {self.ready_timeout_s:g}s; the cluster's "
                               f"nodes lack those resources")
        self._groups[replica_id], self._bundles[replica_id] = group, bundles

    def start(self, spec: ReplicaSpec) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415

        rid = spec.replica_id
        resources = dict(self._bundles[rid][0])
        actor = self._actor_class.options(
            num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._groups[rid], placement_group_bundle_index=0),
        ).remote()
        addr = self._ray.get(actor.start.remote(spec.role, rid, spec.engine.to_dict(), spec.kv.to_dict(),
                                                self.output_addr), timeout=self.ready_timeout_s)
        self.specs[rid] = replace(spec, input_addr=addr)
        self._actors[rid] = actor
        self._serving[rid] = actor.serve.remote()
        log.info("replica %s started as a Ray actor at %s", rid, addr)

    def dead(self) -> dict[str, int]:
        """Replicas whose actor died or whose loop ended."""
        ready, _ = self._ray.wait(list(self._serving.values()), num_returns=len(self._serving), timeout=0)
        out = {}
        for rid, ref in self._serving.items():
            if ref in ready:
                try:
                    out[rid] = self._ray.get(ref) or SERVE_EXITED
                except self._ray.exceptions.RayError:
                    out[rid] = ACTOR_DIED
        return out

    def restart(self, replica_id: str) -> None:
        self._ray.kill(self._actors[replica_id], no_restart=True)
        self.start(self.specs[replica_id])

    def stop(self, grace: float = 3.0, timeout: float = 10.0) -> None:
        """Give replicas `grace` seconds to end their loops (the gateway sent them Shutdown), then
        kill the actors and free the placement groups."""
        if self._serving:
            self._ray.wait(list(self._serving.values()), num_returns=len(self._serving), timeout=grace)
        for actor in self._actors.values():
            self._ray.kill(actor, no_restart=True)
        for group in self._groups.values():
            self._ray.util.remove_placement_group(group)
        self._ray.shutdown()
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
