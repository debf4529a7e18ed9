"""Ray runtime: a ``Coordinator`` actor drives ``AgentHost`` actors; factors move through the
object store and never through the driver.

- ``AgentHost`` (``runtime.ray_host``) builds the task itself (its own data and frozen base model, loaded once) and holds
  an ``AgentGroup`` of ``runtime.agents_per_host`` agents.
- ``Coordinator`` makes the plan (graph, Pi, shards), starts the hosts, and runs the shared round
  loop (``runtime.loop.stream``) over ``RayHosts``. At a communication step each host returns
  one object per active agent (the agent's published factors, encoded as ``network.compress``
  says: numpy arrays, so reads are zero-copy); the coordinator routes the refs by the round's
  graph (``Schedule.inboxes``): a host receives the refs its mixing agents' neighbourhoods
  name, and a host with no active agent publishes nothing. Rows stream back to the driver
  through a Ray generator, one item per round.
- Placement: a run's hosts are one placement group (a sweep trial's hosts take the trial's), so
  they start together or not at all; a request no node could hold fails before anything starts
  (``decaf_ray.placement``), and one not placed within ``runtime.placement_timeout_s`` ends with
  the pending resources named. Every actor uses exactly the GPUs Ray assigned to it
  (``decaf_ray.devices``): a host that reserved none, and the coordinator, see no GPU.
- Crash recovery: every ``checkpoint_every`` rounds each host returns a snapshot of its agents as
  an object the coordinator owns (so it outlives the host's process). When a host dies, the
  coordinator kills what is left of it, starts a replacement in its bundle, restores every host to
  the last snapshot, and replays the calls made since, which reproduces the same numbers because
  all randomness is seeded per agent and step. ``max_host_restarts`` bounds it. Whether a host
  died is Ray's word (its actor is dead), asked through a ``ping`` that has its own thread, so a
  host busy in a long step or evaluation is never mistaken for a dead one.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from typing import Any, Callable

import ray
import torch

from decaf_ray.agents import Diverged
from decaf_ray.folding import BaseDelta
from decaf_ray import devices, placement
from decaf_ray.algorithms import ALGORITHMS
from decaf_ray.config import ConfigError
from decaf_ray.experiment_config import ExperimentConfig, load_config
from decaf_ray.plan import Plan, RunFailed, RunResult, prepare
from decaf_ray.factors import Factors, Grads
from decaf_ray.network import RoundNet
from decaf_ray.runtime import weights
from decaf_ray.runtime.ray_host import AgentHost, to_numpy
from decaf_ray.runtime.loop import RunState, follow, stream

class HostFailure(RunFailed):
    """A host died more often than ``runtime.max_host_restarts`` allows."""


def _cpus_per_host(cfg: ExperimentConfig, hosts: int) -> float:
    if cfg.runtime.cpus_per_host is not None:
        return cfg.runtime.cpus_per_host
    total = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    return placement.cpu_share(total, hosts)


def host_count(cfg: ExperimentConfig) -> int:
    return placement.host_count(cfg.agents, cfg.runtime.agents_per_host)


def host_bundle(cfg: ExperimentConfig, hosts: int | None = None) -> dict[str, float]:
    """The resources one host reserves: its CPUs and, if any, GPUs."""
    bundle = {"CPU": _cpus_per_host(cfg, hosts or host_count(cfg))}
    if cfg.runtime.gpus_per_host:
        bundle["GPU"] = cfg.runtime.gpus_per_host
    return bundle


def hosts_group(run_id: str) -> str:
    """The name of the placement group a run's hosts live in (outside a sweep trial)."""
    return f"{run_id}/hosts"


HOST_FIELDS = {"CPU": "runtime.cpus_per_host", "GPU": "runtime.gpus_per_host"}


def check_resources(cfg: ExperimentConfig) -> None:
    """Raise ``ConfigError`` (naming the field and the numbers) when the run's hosts could never
    be placed on the cluster Ray is connected to. Connects first (an embedded Ray if none)."""
    placement.connect()
    n = host_count(cfg)
    bundle = host_bundle(cfg, n)
    placement.check([bundle] * n, placement.nodes(), HOST_FIELDS,
                     f"runtime: {n} hosts ({cfg.agents} agents, agents_per_host "
                     f"{cfg.runtime.agents_per_host}) of {placement.fmt(bundle)} each")


class RayHosts:
    """``Hosts`` (see ``runtime.loop``) over AgentHost actors, with crash recovery."""

    def __init__(self, plan: Plan, run_id: str, shipped: weights.Shipped | None = None):
        cfg = plan.config
        self.plan, self.run_id, self.restarts, self.shipped = plan, run_id, 0, shipped
        per = cfg.runtime.agents_per_host
        ids = list(range(plan.agents))
        self.members = [ids[k:k + per] for k in range(0, len(ids), per)]
        self.bundle = host_bundle(cfg, len(self.members))
        self.cpus = self.bundle["CPU"]
        what = (f"runtime: {len(self.members)} hosts of {placement.fmt(self.bundle)} each "
                f"(run {run_id})")
        # Inside a sweep trial the hosts take the trial's placement group (reserved by Tune);
        # otherwise the run reserves its own, spread over nodes, and waits for it with a limit.
        self.pg = None
        if ray.util.get_current_placement_group() is None:
            placement.check([self.bundle] * len(self.members), placement.nodes(), HOST_FIELDS,
                            what)
            self.pg = ray.util.placement_group([self.bundle] * len(self.members),
                                               strategy="SPREAD", name=hosts_group(run_id))
            placement.wait_ready(self.pg, cfg.runtime.placement_timeout_s, what)
        self.hosts = [self._start(k, f"{run_id}/host{k}") for k in range(len(self.members))]
        self.load_s = max(ray.get([h.setup.remote() for h in self.hosts]))
        self.mix_s, self.sent_bytes = 0.0, {}
        self.log: list[tuple[str, tuple]] = []
        self.snapshots = [h.snapshot.remote() for h in self.hosts]
        self.deferred: tuple[int, int, RoundNet] | None = None

    def _start(self, k: int, name: str):
        cfg = self.plan.config
        shards = {i: self.plan.shards[i] for i in self.members[k]}
        strategy = None  # a sweep trial's hosts: its placement group captures them
        if self.pg is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k)
        return AgentHost.options(
            name=name, num_cpus=self.cpus, num_gpus=cfg.runtime.gpus_per_host,
            scheduling_strategy=strategy,
        ).remote(cfg.to_dict(), shards, self.shipped, self.plan.ranks)

    # ------------------------------------------------------------ recovery

    def _call(self, name: str, *args):
        """Run one state-changing step on every host, recovering from host deaths."""
        while True:
            try:
                with _unwrapped():
                    out = getattr(self, f"_{name}")(*args)
                self.log.append((name, args))
                return out
            except ray.exceptions.RayActorError as e:
                self._recover(e)

    def _recover(self, error: Exception) -> None:
        """Replace dead hosts, restore every host to the last snapshot, replay the log."""
        cfg = self.plan.config
        limit, idle = cfg.runtime.max_host_restarts, 0
        while True:
            dead = [k for k, h in enumerate(self.hosts) if not _alive(h)]
            self.restarts += len(dead)
            if self.restarts > limit:
                raise HostFailure(
                    f"host(s) {dead} died ({type(error).__name__}); {self.restarts} restarts "
                    f"exceed runtime.max_host_restarts={limit}")
            # Every host alive yet the call failed again: what failed is not a host (e.g. a
            # snapshot lost with its host's process); retrying once more could only spin.
            idle = idle + 1 if not dead else 0
            if idle > 1:
                raise HostFailure(f"recovery failed though every host is alive: "
                                  f"{str(error).strip().splitlines()[0] if str(error) else error!r}")
            try:
                if dead and self.pg is not None:  # the bundle may be moving off a lost node
                    placement.wait_ready(self.pg, cfg.runtime.placement_timeout_s,
                                         f"replacement of host(s) {dead} (run {self.run_id})")
                for k in dead:  # what is left of it (a wedged process) must free its bundle
                    with contextlib.suppress(Exception):
                        ray.kill(self.hosts[k], no_restart=True)
                    self.hosts[k] = self._start(k, f"{self.run_id}/host{k}-r{self.restarts}")
                ray.get([self.hosts[k].setup.remote() for k in dead])
                ray.get([h.restore.remote(s) for h, s in zip(self.hosts, self.snapshots)])
                for name, args in self.log:  # back to where the failed call started
                    getattr(self, f"_{name}")(*args)
                return
            except ray.exceptions.RayActorError as e:  # another death while recovering
                error = e

    # ------------------------------------------------------------ Hosts protocol

    def local_steps(self, t: int, count: int, net: RoundNet) -> None:
        # Communicating algorithms publish right after their quiet steps: the steps then ride
        # in the publish call (one call and one barrier per round instead of two).
        if self.plan.algorithm.communicates:
            self._flush()
            self.deferred = (t, count, net)
        else:
            self._call("local_steps", t, count, net)

    def _flush(self) -> None:
        """Run deferred local steps now (anything but ``communicate`` must see them done)."""
        if self.deferred is not None:
            steps, self.deferred = self.deferred, None
            self._call("local_steps", *steps)

    def _active(self, net: RoundNet) -> list[tuple[Any, list[int]]]:
        """(host, its active agents) of each host that has any this round."""
        on = set(net.active)
        return [(h, mine) for h, ids in zip(self.hosts, self.members)
                if (mine := [i for i in ids if i in on])]

    def _local_steps(self, t: int, count: int, net: RoundNet) -> None:
        ray.get([h.local_steps.remote(t, count, {i: net.steps[i] for i in mine})
                 for h, mine in self._active(net)])

    def communicate(self, t: int, diagnose: bool, net: RoundNet) -> dict[int, dict[str, float]]:
        steps, self.deferred = self.deferred, None
        return self._call("communicate", t, diagnose, net, steps)

    def _communicate(self, t: int, diagnose: bool, net: RoundNet,
                     steps: tuple[int, int, RoundNet] | None = None
                     ) -> dict[int, dict[str, float]]:
        refs: dict[int, Any] = {}
        sizes = []
        for h, mine in self._active(net):
            quiet = None if steps is None else (*steps[:2], {i: net.steps[i] for i in mine})
            *out, size = h.publish.options(num_returns=len(mine) + 1).remote(t, mine, quiet)
            refs.update(zip(mine, out))
            sizes.append(size)
        inboxes, calls = self.plan.schedule.inboxes(net), []
        for h, ids in zip(self.hosts, self.members):
            inbox = {i: (inboxes[i][0], inboxes[i][1], [refs[j] for j in inboxes[i][0]])
                     for i in ids if i in inboxes}
            if inbox:
                calls.append(h.mix_and_apply.remote(t, inbox, diagnose))
        parts = ray.get(calls)
        self.sent_bytes = {i: b for part in ray.get(sizes) for i, b in part.items()}
        self.mix_s = max((s for _, s in parts), default=0.0)  # side by side: the slowest counts
        return {i: d for part, _ in parts for i, d in part.items()}

    def evaluate(self, final: bool = False) -> dict[int, dict[str, Any]]:
        self._flush()
        return self._call("evaluate", final)

    def _evaluate(self, final: bool) -> dict[int, dict[str, Any]]:
        return {i: m for part in ray.get([h.evaluate.remote(final) for h in self.hosts])
                for i, m in part.items()}

    def factors(self) -> dict[int, Factors]:
        parts = self._read(lambda h: h.factors.remote())
        return {i: {n: (torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
                    for n, (a, b) in f.items()} for part in parts for i, f in part.items()}

    def full_grads(self, factors: Factors) -> dict[int, Grads]:
        ref = ray.put(to_numpy(factors))
        return {i: g for part in self._read(lambda h: h.full_grads.remote(ref))
                for i, g in part.items()}

    def _read(self, call: Callable) -> list:
        """A read-only call on every host, retried after recovery."""
        self._flush()
        while True:
            try:
                with _unwrapped():
                    return ray.get([call(h) for h in self.hosts])
            except ray.exceptions.RayActorError as e:
                self._recover(e)

    def end_round(self, rnd: int) -> None:
        self._flush()
        if rnd % self.plan.config.runtime.checkpoint_every == 0:
            self.snapshots = [h.snapshot.remote() for h in self.hosts]
            self.log = []

    def snapshot(self) -> dict[int, dict]:
        return {i: st for part in self._read(lambda h: h.snapshot.remote()) for i, st in part.items()}

    def base_delta(self) -> BaseDelta | None:
        return self._read(lambda h: h.base_delta.remote())[0]  # every host folded the same S

    def restore(self, agents: dict[int, dict]) -> None:
        parts = [{i: agents[i] for i in ids} for ids in self.members]
        ray.get([h.restore.remote(p) for h, p in zip(self.hosts, parts)])
        self.snapshots, self.log, self.deferred = [ray.put(p) for p in parts], [], None

    def where(self) -> list[dict[str, Any]]:
        return ray.get([h.where.remote() for h in self.hosts])

    def close(self) -> None:
        for h in self.hosts:
            ray.kill(h)
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)


@contextlib.contextmanager
def _unwrapped():
    """Re-raise a host's ``Diverged`` as itself, so the shared loop records the divergence."""
    try:
        yield
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Diverged):
            raise e.cause from None
        raise


def _alive(host) -> bool:
    """Ray's word on whether a host's actor lives. ``where`` runs in its own concurrency group,
    so a host in a long step answers at once; a dead one raises (Ray detects dead processes and
    nodes itself), so no timeout decides it."""
    try:
        ray.get(host.where.remote())
        return True
    except ray.exceptions.RayActorError:
        return False


@ray.remote(num_cpus=0, concurrency_groups={"control": 1})
class Coordinator:
    """Owns the plan and the hosts of one run; ``run`` streams (round, rows) then the result.
    ``stop`` (its own thread, answered while ``run`` works) ends the run at the next round
    boundary, as an interrupted run with a state to resume from."""

    def __init__(self, config: dict, run_id: str, shipped: weights.Shipped | None = None):
        devices.hide_unassigned_gpus()  # it reserved none; it must never start a CUDA context
        self.config, self.run_id, self.shipped = config, run_id, shipped
        self.stopping = False

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        self.stopping = True

    def run(self, resume=None, checkpoint_every: int | None = None):
        plan = prepare(load_config(self.config))  # reads no weights: the hosts load them
        hosts = RayHosts(plan, self.run_id, self.shipped)
        try:
            for item in stream(plan, hosts, resume=resume, checkpoint_every=checkpoint_every,
                               stop=lambda: self.stopping):
                if isinstance(item, RunResult):
                    where = hosts.where()
                    item.summary["hosts"] = len(hosts.members)
                    item.summary["host_restarts"] = hosts.restarts
                    item.summary["host_nodes"] = len({w["node"] for w in where})
                    item.summary["placement"] = {
                        "hosts": [{k: w[k] for k in ("node", "gpu_ids", "cuda_visible", "device")}
                                  for w in where],
                        "coordinator": {"cuda_visible": devices.visible(),
                                        "device": str(devices.resolve("auto"))}}
                yield item
        finally:
            hosts.close()


def run_on_ray(cfg: ExperimentConfig, *, run_id: str | None = None, resume: RunState | None = None,
               checkpoint_every: int | None = None, stop: threading.Event | None = None,
               **follow_kwargs) -> RunResult:
    """Run ``cfg`` on Ray; rows reach ``on_rows`` as each evaluation round completes.

    ``stop``, once set, ends the run at the next round boundary (``runtime.loop.stream``).
    ``follow_kwargs`` go to ``runtime.loop.follow`` (on_rows, on_checkpoint, progress)."""
    from decaf_ray.pretrain import resolve_checkpoint

    check_resources(cfg)
    cfg = resolve_checkpoint(cfg)  # a stand-in is trained here, once, never in a host
    run_id = run_id or f"decaf-ray-{uuid.uuid4().hex[:8]}"
    coordinator = Coordinator.options(name=f"{run_id}/coordinator").remote(
        cfg.to_dict(), run_id, weights.ship(cfg))
    done = threading.Event()
    if stop is not None:
        threading.Thread(target=_pass_stop, args=(stop, done, coordinator), daemon=True).start()
    try:
        gen = coordinator.run.remote(resume, checkpoint_every)
        items = (ray.get(ref) for ref in gen)
        return follow(items, cfg.rounds, cfg.algorithm,
                      initial=resume.round if resume else 0, **follow_kwargs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (RunFailed, ConfigError)):
            raise e.cause from None
        raise
    finally:
        done.set()
        ray.kill(coordinator)
        # The coordinator is killed as soon as its result is in, before its own cleanup can
        # run; its hosts die with it (their owner), its placement group is freed here.
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(ray.util.get_placement_group(hosts_group(run_id)))


def _pass_stop(stop: threading.Event, done: threading.Event, coordinator) -> None:
    """Tell the coordinator once ``stop`` is set (the driver's signal handler sets it while the
    main thread waits on the run's next item)."""
    while not done.is_set():
        if stop.wait(0.2):
            coordinator.stop.remote()
            return
