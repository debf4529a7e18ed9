"""Clusters, described (``parse_cluster("2x8xA100-80GB")``) or live, and how many identical
trials of one ``sizing.TrialSize`` run on one at once (``fit``).

``fit(trial, cluster)`` packs identical trials onto a cluster the way Ray places them: each
trial's bundles (a 0.01 CPU driver sliver, then one per host, as ``sweep_resources.trial_resources``;
a null ``cpus_per_host`` counts as 1 CPU, the most a cluster's share gives) whole
on one node, fractional GPUs inside one GPU, PACK first; and checks each host's estimate against
its GPU share (a host runs on one device, so a share is min(gpus_per_host, 1) x GPU memory).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from decaf_ray.config import ConfigError
from decaf_ray.sizing import GB, TrialSize

CPUS_PER_GPU = 8
"""CPUs per node a cluster spec implies when it does not say: 8 per GPU."""
PAPER_CLUSTER = "2x8xA100-80GB"
"""The cluster the shipped GPU sweeps are sized for (each says so in a ``# cluster:`` line)."""
MAX_TRIALS = 10_000
_SPEC = re.compile(r"^(\d+)x(\d+)x([A-Za-z0-9_.]+)-(\d+(?:\.\d+)?)GB(?:-(\d+(?:\.\d+)?)CPU)?$",
                   re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Nodes' totals (``CPU``, ``GPU``) and the memory of one GPU in bytes (None: unknown)."""

    nodes: tuple[tuple[float, int], ...]
    """(CPUs, GPUs) per node."""
    gpu_memory: float | None
    label: str


def parse_cluster(spec: str) -> Cluster:
    """``NODESxGPUSxTYPE-MEMGB[-CPUSCPU]``: ``2x8xA100-80GB`` is 2 nodes of 8 GPUs of 80 GB
    (10^9 bytes) and, unsaid, 8 CPUs per GPU; ``1x4xL4-24GB-48CPU`` says 48 CPUs per node.

    Raises:
        ConfigError("--cluster"): anything else.
    """
    m = _SPEC.match(spec.strip())
    if m is None or int(m[1]) < 1 or int(m[2]) < 1 or float(m[4]) <= 0 or (m[5] and float(m[5]) <= 0):
        raise ConfigError("--cluster", f"expected NODESxGPUSxTYPE-MEMGB[-CPUSCPU] with counts >= 1, "
                                       f"e.g. 2x8xA100-80GB or 1x4xL4-24GB-48CPU (got {spec!r})")
    nodes, gpus = int(m[1]), int(m[2])
    cpus = float(m[5]) if m[5] else float(CPUS_PER_GPU * gpus)
    return Cluster(((cpus, gpus),) * nodes, float(m[4]) * GB,
                   f"{nodes} node(s) x {gpus} {m[3]} GPUs of {float(m[4]):g} GB, {cpus:g} CPUs each")


def live_cluster() -> Cluster:
    """The Ray cluster at ``RAY_ADDRESS``: its alive nodes; GPU memory is not known to Ray."""
    from decaf_ray import placement

    placement.connect()
    found = placement.nodes()
    return Cluster(tuple((n["CPU"], int(n["GPU"])) for n in found), None,
                   f"the live Ray cluster ({len(found)} node(s), "
                   f"{sum(n['CPU'] for n in found):g} CPUs, {sum(n['GPU'] for n in found):g} GPUs)")


def stated_cluster(path: str | Path) -> str | None:
    """The spec in a ``# cluster: SPEC`` comment line of a config or sweep file (or, for a
    sweep, of its ``base`` file), or None. How shipped files state what they are sized for."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    m = re.search(r"^#\s*cluster:\s*(\S+)", text, re.M)
    if m:
        return m[1]
    base = re.search(r"^base:\s*([^\s#{]+\.ya?ml)\s*(?:#.*)?$", text, re.M)
    return stated_cluster(path.parent / base[1]) if base else None


@dataclasses.dataclass(frozen=True)
class Fit:
    """How ``trial`` fares on ``cluster``: trials at once, what bounds them, and problems."""

    trials: int
    bound: str
    share: float | None
    """GPU memory one host gets (bytes), None when unknown or on the CPU."""
    problems: tuple[str, ...]


def fit(trial: TrialSize, cluster: Cluster) -> Fit:
    """Trials of this shape that run at once on ``cluster`` (0 with a reason when none can)."""
    cpus, gpus = trial.host
    problems = []
    if not any(_take(cpus, gpus, c, [1.0] * g) for c, g in cluster.nodes):
        biggest = max(cluster.nodes)
        problems.append(f"DOES NOT FIT: a host bundle of {cpus:g} CPUs, {gpus:g} GPU is larger "
                        f"than every node ({biggest[0]:g} CPUs, {biggest[1]} GPUs)")
    share = None
    if trial.device == "cuda" and cluster.gpu_memory is not None:
        share = min(gpus, 1.0) * cluster.gpu_memory
        if trial.memory > share:
            problems.append(f"DOES NOT FIT: a host needs ~{trial.memory / GB:.1f} GB but its GPU "
                            f"share is {share / GB:.1f} GB ({min(gpus, 1.0):g} x "
                            f"{cluster.gpu_memory / GB:g} GB); raise gpus_per_host or lower "
                            "batch_agents / micro batch")
    if problems:
        return Fit(0, "", share, tuple(problems))
    both = _pack(trial.bundles, cluster.nodes)
    cpu_only = _pack([(c, 0.0) for c, _ in trial.bundles], cluster.nodes)
    gpu_only = _pack([(0.0, g) for _, g in trial.bundles], cluster.nodes) if trial.gpus else MAX_TRIALS
    bound = " and ".join(n for n, v in (("CPUs", cpu_only), ("GPUs", gpu_only)) if v == both) \
        or "packing both"
    return Fit(both, bound, share, ())


def _take(cpus: float, gpus: float, free_cpus: float, free: list[float]):
    """(CPUs left, per-GPU free fractions left) after placing one bundle, or None. A fraction
    below 1 must fit inside one GPU; whole GPUs need wholly free ones."""
    eps = 1e-9
    if cpus > free_cpus + eps:
        return None
    free = list(free)
    if 0 < gpus < 1:
        i = next((i for i, f in enumerate(free) if f >= gpus - eps), None)
        if i is None:
            return None
        free[i] -= gpus
    elif gpus >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - eps][:int(gpus)]
        if len(whole) < int(gpus):
            return None
        for i in whole:
            free[i] = 0.0
    return free_cpus - cpus, free


def _pack(bundles: list[tuple[float, float]], nodes) -> int:
    """Identical trials placed until one does not fit (at most ``MAX_TRIALS``): each trial on
    one node if it fits there (Tune's PACK), else bundle by bundle on the first node with room."""
    state = [(float(c), [1.0] * int(g)) for c, g in nodes]
    for count in range(MAX_TRIALS):
        placed = None
        for i in range(len(state)):  # whole trial on one node
            node = state[i]
            for c, g in bundles:
                node = node and _take(c, g, *node)
            if node:
                placed = state[:i] + [node] + state[i + 1:]
                break
        if placed is None:  # spread
            placed = list(state)
            for c, g in bundles:
                i = next((i for i, n in enumerate(placed) if _take(c, g, *n)), None)
                if i is None:
                    return count
                placed[i] = _take(c, g, *placed[i])
        state = placed
    return MAX_TRIALS
