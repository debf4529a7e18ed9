"""The Ray cluster a run joins (``connect``), what it has (``nodes``), and whether a request fits
it, with the shares a host gets (``cpu_share``, ``host_threads``).

Will a request fit the cluster? Answered before anything is placed, so that an impossible run or
sweep ends in a second with one line instead of actors that stay pending forever.

Ray itself never refuses an infeasible actor or placement group: it waits (for an autoscaler that
may add a node). ``check`` compares what is asked (bundles of resources: one per host, or a
trial's driver sliver plus its hosts) with the nodes' totals and raises a ``ConfigError`` naming
the config field and the numbers when no cluster state could ever hold it. A request that could
fit but is not placed in time (busy nodes, an autoscaler that does not come) ends through
``wait_ready`` with a line saying which resources are pending.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import Mapping

from decaf_ray.config import ConfigError, RuntimeConfig
from decaf_ray.plan import RunFailed

Bundle = Mapping[str, float]
RESOURCES = ("CPU", "GPU", "memory")
EPS = 1e-6


class PlacementTimeout(RunFailed):
    """A feasible request that Ray did not place within the configured time."""


def connect() -> None:
    """Join the cluster at ``RAY_ADDRESS`` if set, else start an embedded local Ray. Every
    driver-side entry (a run, a Ray Train fine-tune, a sweep, ``describe --cluster live``) joins
    through here.

    Authentication is left as the cluster (or Ray's local default) has it: never turned off here.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        print(f"decaf-ray: joining the Ray cluster at RAY_ADDRESS={address}", file=sys.stderr)
        try:
            ray.init(address=address, logging_level="ERROR")
        except ConnectionError as e:
            raise ConfigError("RAY_ADDRESS", f"{address}: {str(e).splitlines()[0]}; check the "
                              "address (ray status on the head node) or unset it") from None
    else:
        ray.init(include_dashboard=False, logging_level="ERROR")


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming ``RAY_ADDRESS``, when nothing listens at ``host:port`` (Ray
    itself retries for minutes without a word). ``auto`` and addresses without a port are left
    to Ray."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError("RAY_ADDRESS", f"{address}: no Ray cluster answers there "
                          f"({e.strerror or e}); start one (ray start --head) or unset "
                          "RAY_ADDRESS for a local Ray") from None


def host_threads(runtime: RuntimeConfig) -> int:
    """torch threads of a host or Ray Train worker: ``runtime.threads``, else its CPU reservation
    (at most 1 unless ``cpus_per_host`` says more; see ``cpu_share``), at least 1."""
    return runtime.threads or max(1, int(runtime.cpus_per_host or 1))


def cpu_share(total: float, hosts: int, reserved: float = 0.0) -> float:
    """CPUs per host when ``cpus_per_host`` is null: ``total`` less ``reserved`` shared evenly
    between ``hosts``, at most 1, floored to Ray's unit of 1e-4. Ray rounds a request to the
    nearest unit, so an unfloored share can ask more than there is (6 x 0.33165 + 0.01 is
    asked as 2.0002 of 2 CPUs) and stay pending forever."""
    return min(1.0, math.floor((total - reserved) / max(hosts, 1) * 1e4) / 1e4)


def host_count(agents: int, agents_per_host: int) -> int:
    """Hosts of a run: ``agents`` in groups of ``agents_per_host``."""
    return -(-agents // agents_per_host)


def nodes() -> list[dict[str, float]]:
    """The alive nodes' total resources (``CPU``, ``GPU``, ``memory`` in bytes; 0 if absent)."""
    import ray

    return [{k: float(n["Resources"].get(k, 0.0)) for k in RESOURCES}
            for n in ray.nodes() if n.get("Alive")]


def fmt(bundle: Bundle, keys: tuple[str, ...] = ()) -> str:
    """``{CPU: 1, GPU: 0.5}`` as ``1 CPU, 0.5 GPU`` (memory in GiB); ``keys`` are shown even
    when zero."""
    parts = []
    for k in RESOURCES:
        v = float(bundle.get(k, 0.0))
        if v or k in keys:
            parts.append(f"{v / 2**30:.3g} GiB memory" if k == "memory" else f"{v:g} {k}")
    return ", ".join(parts) or "nothing"


def problem(bundles: list[Bundle], cluster: list[Bundle]) -> tuple[str, str] | None:
    """Why ``bundles`` can never be placed on ``cluster`` (resource, reason), or None.

    Two necessary conditions, each exact: every bundle fits on some node (a bundle is never split
    between nodes), and the bundles' sum fits the cluster's total. A request that passes may still
    not pack (bundles are placed whole); that case waits and ends through ``wait_ready``.
    """
    def holds(node: Bundle, bundle: Bundle) -> bool:
        return all(float(bundle.get(k, 0.0)) <= float(node.get(k, 0.0)) + EPS
                   for k in RESOURCES)

    for bundle in bundles:  # whole on one node: every resource of it on the same node
        if any(holds(n, bundle) for n in cluster):
            continue
        for k in RESOURCES:
            largest = max((float(n.get(k, 0.0)) for n in cluster), default=0.0)
            need = float(bundle.get(k, 0.0))
            if need > largest + EPS:
                unit = "GiB of memory" if k == "memory" else k
                scale = 2**30 if k == "memory" else 1
                return k, (f"one bundle asks {need / scale:g} {unit} but the largest of the "
                           f"cluster's {len(cluster)} node(s) has {largest / scale:g}")
        k = next((k for k in RESOURCES if bundle.get(k)), "CPU")
        return k, (f"one bundle asks {fmt(bundle)} and no node has all of it at once (each "
                   "resource exists, on different nodes)")
    for k in RESOURCES:
        total = sum(float(n.get(k, 0.0)) for n in cluster)
        asked = sum(float(b.get(k, 0.0)) for b in bundles)
        if asked > total + EPS:
            unit = "GiB of memory" if k == "memory" else k
            scale = 2**30 if k == "memory" else 1
            return k, (f"{len(bundles)} bundles ask {asked / scale:g} {unit} in all but the "
                       f"cluster has {total / scale:g}")
    return None


def check(bundles: list[Bundle], cluster: list[Bundle], field: str | Mapping[str, str],
          what: str) -> None:
    """Raise ``ConfigError`` when ``bundles`` can never be placed on ``cluster``.

    Args:
        bundles: the resources asked, one mapping per bundle (e.g. one per host).
        cluster: the nodes' totals (``nodes()``, or a planned cluster).
        field: the config field to blame, or one per resource name (``{"GPU":
            "runtime.gpus_per_host", ...}``); a resource missing from the mapping blames
            ``field["*"]`` or ``runtime``.
        what: what is being placed, for the message (``"4 hosts of 1 CPU, 1 GPU"``).
    """
    found = problem(bundles, cluster)
    if found is None:
        return
    resource, reason = found
    name = field if isinstance(field, str) else field.get(resource, field.get("*", "runtime"))
    raise ConfigError(name, f"{what} cannot be placed: {reason}; ask for less or use a "
                            "bigger cluster")


def wait_ready(pg, timeout_s: float, what: str) -> None:
    """Wait until placement group ``pg`` is placed; after ``timeout_s`` seconds remove it and
    raise ``PlacementTimeout`` naming what is pending and what the cluster has free."""
    import ray

    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        free = ray.available_resources()
        ray.util.remove_placement_group(pg)
        raise PlacementTimeout(
            f"{what}: not placed after {timeout_s:g} s (runtime.placement_timeout_s); pending "
            f"{len(pg.bundle_specs)} bundles of {fmt(pg.bundle_specs[0])}; the cluster has "
            f"{fmt(free, tuple(pg.bundle_specs[0]))} free now") from None
