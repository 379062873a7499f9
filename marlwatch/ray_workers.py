"""Rollout workers as Ray actors (`marlwatch run --backend ray`): the learner's `RayWorkerPool`,
the `RolloutActor`s it starts, and one `NodeSampler` actor per other node.

The learner is the Ray driver, a local process beside the monitor (its telemetry on a pipe, as
with the local backend). Each iteration it puts the weights into Ray's object store once and
calls every actor with the reference (`sync/broadcast`); each actor loads them, collects, and
puts its results into the object store (`sync/send`); the learner fetches them (`sync/gather`).
The phases are the local backend's, so the two backends' recordings compare phase by phase.

Actors reach the monitor over its listener: the address and key travel in their runtime
environment (MARLWATCH_ADDRESS, MARLWATCH_AUTHKEY), and each actor connects with its role and
node and answers the monitor's clock requests (marlwatch.clock). docs/distributed.md.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from marlwatch import instrument
from marlwatch.instrument import ADDRESS_ENV, AUTHKEY_ENV
from marlwatch.lifecycle import STOP_SIGNALS
from marlwatch.nodes import node_name
from marlwatch.workers import WorkerLost, report_crash, rollout_round

SAMPLE_EVERY_S = 0.5  # a node sampler's period (the monitor samples its own node at --sample-hz)
CLOSE_TIMEOUT_S = 10.0


def _connect(role: str, spans: bool) -> None:
    instrument.connect_monitor(os.environ[ADDRESS_ENV], bytes.fromhex(os.environ[AUTHKEY_ENV]), spans_enabled=spans,
                               role=role, pid=os.getpid(), node=instrument.ray_node())


class RolloutActor:
    """One rollout worker: the local worker's round (`rollout_round`), called once per iteration."""

    def __init__(self, spec: Any, index: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.index = index
        _connect(f"worker {index}", spec.spans)
        self.rollout = spec.algorithm.rollout_cls(spec.config, index - 1)
        self.rounds = 0
        self._wait = instrument.span("sync/wait")  # between two calls: waiting for the learner
        self._wait.__enter__()

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": instrument.ray_node()}

    def rollout_round(self, weights: Any, spans: bool | None) -> list[Any]:
        self._wait.__exit__(None, None, None)
        try:
            payload = rollout_round(self.rollout, weights, spans)
            with instrument.span("sync/send"):
                ref = ray.put(payload)  # the results go back through the object store, as the weights came
        except BaseException as e:
            report_crash(e, close=False)
            raise
        instrument.tick()
        self.rounds += 1
        self._wait = instrument.span("sync/wait")
        self._wait.__enter__()
        return [ref]  # a reference in a list: Ray hands it over as it is, not the object

    def close(self) -> int:
        self._wait.abandon()
        tel = instrument.telemetry()
        tel.event("finished", iterations=self.rounds)
        tel.close()
        return self.rounds


class NodeSampler:
    """Per-core utilisation of its node, and CPU and memory of the marlwatch processes there,
    sent to the monitor as ``sys`` control frames (the monitor samples its own node itself)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        _connect("sampler", True)
        self._procs: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        psutil.cpu_percent(percpu=True)
        threading.Thread(target=self._loop, name="marlwatch-node-sampler", daemon=True).start()

    def watch(self, pids: list[int]) -> None:
        with self._lock:
            for pid in pids:
                try:
                    p = self._psutil.Process(pid)
                    p.cpu_percent()
                    self._procs[pid] = p
                except self._psutil.Error:
                    pass

    def _loop(self) -> None:
        tel = instrument.telemetry()
        while not self._stop.wait(SAMPLE_EVERY_S):
            procs = []
            with self._lock:
                for pid, p in list(self._procs.items()):
                    try:
                        with p.oneshot():
                            procs.append([pid, p.cpu_percent(), p.memory_info().rss])
                    except self._psutil.Error:
                        del self._procs[pid]
            tel.control({"type": "sys", "cores": self._psutil.cpu_percent(percpu=True), "procs": procs})

    def close(self) -> None:
        self._stop.set()
        instrument.telemetry().close()


# -- the learner's side --------------------------------------------------------------------------
def init_ray(address: str | None) -> None:
    """Connect to the cluster at `address` ("auto", HOST:PORT), or start a local Ray instance sized
    to the machine and reachable from it only."""
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    # The learner ignores the stop signals (the monitor decides when a run stops); the processes
    # Ray starts inherit what it does with them, and must not: they are stopped by signal.
    old = {sig: signal.signal(sig, signal.SIG_DFL) for sig in STOP_SIGNALS}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def cluster_nodes() -> tuple[str, list[dict[str, str]]]:
    """This process's node id and every alive node (``{"id", "host", "ip"}``), this one first."""
    here = ray.get_runtime_context().get_node_id()
    nodes = [{"id": n["NodeID"], "host": n.get("NodeManagerHostname", ""), "ip": n.get("NodeManagerAddress", "")}
             for n in ray.nodes() if n.get("Alive")]
    nodes.sort(key=lambda n: (n["id"] != here, n["ip"], n["host"], n["id"]))
    return here, nodes


def _short(error: BaseException) -> str:
    """One line of what Ray says about a failure (its messages run to many lines)."""
    text = str(error)
    for marker in ("The actor died", "The actor is dead", "died because", "node"):
        i = text.find(marker)
        if i >= 0:
            text = text[i:]
            break
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(error).__name__)
    return line if len(line) <= 160 else line[:157] + "..."


class RayWorkerPool:
    """The learner's workers as Ray actors: `broadcast`, `gather`, `stop`, as `PipeWorkerPool`."""

    def __init__(self, spec: Any, *, keep_going: bool = False) -> None:
        self.keep_going = keep_going
        self.actors: list[Any] = []
        self.samplers: list[Any] = []
        self.where: list[str] = []  # per actor: "Ray actor 1a2b3c4d on node-b (host)"
        self._pending: dict[int, Any] = {}
        init_ray(spec.ray_address)
        try:
            self._start(spec)
        except BaseException:
            self.stop()
            raise

    def _start(self, spec: Any) -> None:
        here, nodes = cluster_nodes()
        names = {n["id"]: node_name(i) for i, n in enumerate(nodes)}
        tel = instrument.telemetry()
        tel.control({"type": "nodes", "local": here, "nodes": nodes})
        tel.control({"type": "node", "node": nodes[0] if nodes else None})
        address = spec.monitor_address
        if address.startswith("0.0.0.0:"):  # the monitor listens on every interface: say which one
            address = f"{ray.util.get_node_ip_address()}:{address.rpartition(':')[2]}"
        env = {"env_vars": {ADDRESS_ENV: address, AUTHKEY_ENV: spec.authkey}}
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        per_actor = min(1.0, cpus / max(1, spec.workers))
        actor_cls = ray.remote(RolloutActor)
        self.actors = [actor_cls.options(num_cpus=per_actor, runtime_env=env, max_restarts=0).remote(spec, i)
                       for i in range(1, spec.workers + 1)]
        infos = ray.get([a.info.remote() for a in self.actors])  # every actor up and connected
        self.alive = list(range(len(self.actors)))
        by_node: dict[str, list[int]] = {}
        for actor, info in zip(self.actors, infos, strict=True):
            node_id = (info.get("node") or {}).get("id", "")
            host = (info.get("node") or {}).get("host", "")
            self.where.append(f"Ray actor {actor._actor_id.hex()[:8]} on {names.get(node_id, 'a new node')} ({host})")
            by_node.setdefault(node_id, []).append(info["pid"])
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        sampler_cls = ray.remote(NodeSampler)
        for n in nodes:
            if n["id"] == here:
                continue  # the monitor's own node: the monitor samples it
            sampler = sampler_cls.options(
                num_cpus=0, runtime_env=env, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote()
            sampler.watch.remote(by_node.get(n["id"], []))
            self.samplers.append(sampler)

    def _lose(self, index: int, why: str) -> None:
        self.alive.remove(index)
        # Its connection only says it left: the monitor learns here what became of it, and where.
        instrument.telemetry().event("lost", role=f"worker {index + 1}", error=f"{self.where[index]} {why}")
        if not self.keep_going or not self.alive:
            raise WorkerLost(f"worker {index + 1} ({self.where[index]}) {why}")

    def broadcast(self, weights: Any, *, spans: bool | None = None) -> None:
        ref = ray.put(weights)  # once, whatever the number of actors
        self._pending = {i: self.actors[i].rollout_round.remote(ref, spans) for i in self.alive}

    def gather(self) -> list[Any]:
        payloads: list[Any] = []
        pending, self._pending = self._pending, {}
        for i, outer in pending.items():
            try:
                payloads.append(ray.get(ray.get(outer)[0]))
            except RayTaskError as e:
                self._lose(i, f"failed: {_short(e.cause) if e.cause else _short(e)}")
            except RayActorError as e:
                self._lose(i, f"died: {_short(e)}")
            except RayError as e:  # its results lost with its node
                self._lose(i, f"is gone: {_short(e)}")
        return payloads

    def stop(self) -> None:
        """End the actors (each ships what it has left first) and leave the cluster; a Ray
        instance this process started stops with it."""
        if ray.is_initialized():
            closing = [a.close.remote() for a in [*self.actors, *self.samplers]]
            if closing:
                deadline = time.monotonic() + CLOSE_TIMEOUT_S
                ray.wait(closing, num_returns=len(closing), timeout=max(0.0, deadline - time.monotonic()))
            for a in [*self.actors, *self.samplers]:
                try:
                    ray.kill(a)
                except RayError:
                    pass
            ray.shutdown()
