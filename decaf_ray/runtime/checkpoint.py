"""A ``RunState`` on disk: what a run between rounds needs to continue exactly, written so that
reading it back runs no code (``torch.load(weights_only=True)``: tensors, lists, dicts and
numbers only). A run directory keeps its latest one as ``checkpoint/state.pt``; a Tune trial's
checkpoint holds the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from decaf_ray.runtime.loop import RunState

FILE = "state.pt"


def save(state: RunState, path: str | Path) -> None:
    """Write ``state`` to ``path`` whole or not at all (a temporary file renamed over it), so a
    process killed while writing leaves the previous checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(_plain(state), tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> RunState:
    """Read ``save``'s file back."""
    data = torch.load(str(path), weights_only=True)
    agents = {int(i): _revive(st) for i, st in data["agents"].items()}
    # A checkpoint written before the network counters existed has none: they start at zero.
    return RunState(data["round"], data["step"], data["rows"], agents, data.get("network"))


def _plain(state: RunState) -> dict:
    def conv(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x.copy())
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        return x

    return {"round": state.round, "step": state.step, "rows": state.rows,
            "agents": conv(state.agents), "network": state.network}


def _revive(state: dict) -> dict:
    """Undo ``_plain`` where types matter: factor pairs are tuples, sampler arrays numpy."""
    tup = lambda tree: {n: (a, b) for n, (a, b) in tree.items()}
    out = dict(state)
    out["factors"] = tup(state["factors"])
    if "residual" in state:  # error feedback's (A, B) residual pairs
        out["residual"] = tup(state["residual"])
    out["opt_state"] = {k: tup(v) if isinstance(v, dict) else v
                        for k, v in state["opt_state"].items()}
    sampler = dict(state["sampler"])
    sampler["order"] = sampler["order"].numpy()
    out["sampler"] = sampler
    return out
