"""The peer: FedAvg of decaf_ray's own task on Flower's Ray simulation engine; time per round.

Runs under the Flower venv (``bench/flower-requirements.txt``; ``bench/compare_flower.sh`` makes
it), never under decaf_ray's: flwr[simulation] pins its own Ray. Only decaf_ray's task code is
used here (config, shards, model, data, loss, optimizer, batch sampler), never its runtime.

    python bench/bench_flower.py --rounds 10                     # sweeps/clip-tiny-digits.yaml
    python bench/bench_flower.py --rounds 10 --client-cpus 1 --set local_steps=4

Flower side (flwr's Message API, the documented current way):
- ``ServerApp`` runs ``flwr.serverapp.strategy.FedAvg`` (every node every round, no federated
  evaluation) started from decaf_ray's shared initial adapter (A Gaussian from the experiment
  seed, B zero, seeded exactly as ``AgentGroup.build``). Clients report a weight of 1 under the
  strategy's ``weighted_by_key``, so the average is the equal-weight 1/N of our ``fedavg``.
- ``ClientApp``: supernode i is agent i (``plan.shards[i]``). Per round it does
  ``local_steps`` steps of ``task.loss_and_grads`` + our optimizer's update from the global
  adapter, with the step counter, dropout seeds and batch order of our agents.
- State: the task (frozen model and data) is built once per Ray actor process and cached in a
  module-level dict; Flower may hand a node to any actor in its pool, so each node's optimizer
  state (Adam moments) and batch sampler travel in the node's ``Context.state`` (Flower's
  documented mechanism for stateful clients) and survive across rounds.
- Resources: ``--client-cpus`` Ray CPUs per client actor (0.2: on 2 cores a pool of 10 actors,
  one per client, Flower's fastest here; 1: 2 actors). Torch threads per actor: the config's
  ``runtime.threads`` (1), as our hosts use.
- Timing: stamps on the server at the end of each round's ``aggregate_train``; round 1 is
  start-up and is excluded from the median. The final global adapter is evaluated once on the
  server after timing (test accuracy, for a sanity check only). It is close to ours, not equal:
  a round of ours takes its last local step in the paper's form (gradient at w_t, applied after
  the average, so agents end a round apart), Flower's FedAvg averages after all local steps.
  The work per round (gradients, optimizer steps, one exchange) is the same.

Prints a JSON line last: per_round_ms (median of rounds 2..R-1 or 2..R, see --exclude-last),
rounds_ms, and the final test metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "sweeps" / "clip-tiny-digits.yaml"

# per process (server or Ray actor): overrides key -> everything one config implies
_SETUPS: dict[str, dict] = {}


def _overrides(args) -> list[str]:
    return ["algorithm=fedavg", f"agents={args.agents}", f"rounds={args.rounds}",
            f"eval_every={args.rounds}", "grad_norm=false", *args.set]


def setup(config: str, overrides: list[str]) -> dict:
    """Config, task, shards, optimizer and the shared initial adapter; built once per process."""
    key = json.dumps([config, overrides])
    if key not in _SETUPS:
        import torch
        from decaf_ray.agents import derive_seed
        from decaf_ray.algorithms import ALGORITHMS
        from decaf_ray.experiment_config import load_config
        from decaf_ray.plan import prepare
        from decaf_ray.factors import init_factors
        from decaf_ray.optim import build_optimizer
        from decaf_ray.tasks import build_task

        cfg = load_config(config, overrides)
        torch.set_num_threads(cfg.runtime.threads or 1)
        task = build_task(cfg.task, cfg.lora, cfg.seed)
        plan = prepare(cfg, task=task)
        init = init_factors(task.lora_shapes(), cfg.lora.rank,
                            torch.Generator().manual_seed(derive_seed(cfg.seed, 1)),
                            cfg.lora.init_std)
        _SETUPS[key] = {"cfg": cfg, "task": task, "shards": plan.shards, "init": init,
                        "algorithm": ALGORITHMS[cfg.algorithm],
                        "optimizer": build_optimizer(cfg.optim, cfg.total_steps)}
    return _SETUPS[key]


def to_state_dict(factors, train_A: bool) -> dict:
    out = {}
    for name, (a, b) in factors.items():
        if train_A:
            out[f"{name}/A"] = a
        out[f"{name}/B"] = b
    return out


def from_state_dict(sd: dict, like) -> dict:
    """Back to ``{module: (A, B)}``; a frozen A (FA variants) comes from ``like``."""
    return {name: (sd.get(f"{name}/A", a), sd[f"{name}/B"]) for name, (a, b) in like.items()}


# ---------------------------------------------------------------------------------- ClientApp

def _client_app():
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import numpy as np
        from decaf_ray.agents import Sampler, derive_seed
        from decaf_ray.optim import apply_updates

        conf = msg.content["config"]
        s = setup(str(conf["config"]), json.loads(str(conf["overrides"])))
        cfg, task, alg, opt = s["cfg"], s["task"], s["algorithm"], s["optimizer"]
        i = int(context.node_config["partition-id"])
        rnd = int(conf["server-round"])
        shard = s["shards"][i]
        factors = from_state_dict(msg.content["arrays"].to_torch_state_dict(), s["init"])

        # this node's optimizer state and batch sampler, from its Context (see module docstring)
        sampler = Sampler(shard, cfg.data.batch_size, derive_seed(cfg.seed, 2, i))
        if "agent" in context.state:
            meta = pickle.loads(context.state["agent"]["blob"])
            sampler.set_state(meta["sampler"])
            moments = context.state["opt"].to_torch_state_dict()
            opt_state = {k: (meta["rest"][k] if k in meta["rest"] else
                             from_state_dict({n.split(":", 1)[1]: v for n, v in moments.items()
                                              if n.startswith(k + ":")}, s["init"]))
                         for k in meta["keys"]}
        else:
            opt_state = opt.init(s["init"])

        losses = []
        for k in range(cfg.local_steps):
            t = (rnd - 1) * cfg.local_steps + k + 1      # our step counter (lr schedule, seeds)
            batch = sampler.next()
            loss, grads = task.loss_and_grads(factors, batch, alg.train_A,
                                              derive_seed(cfg.seed, 3, i, t))
            losses.append(loss)
            updates, opt_state = opt.update(grads, opt_state, factors, t)
            factors = apply_updates(factors, updates)

        tensors = {k: v for k, v in opt_state.items() if isinstance(v, dict)}
        rest = {k: v for k, v in opt_state.items() if not isinstance(v, dict)}
        context.state["opt"] = ArrayRecord(
            {f"{k}:{n}": x for k, tree in tensors.items()
             for n, x in to_state_dict(tree, True).items()})
        context.state["agent"] = ConfigRecord({"blob": pickle.dumps(
            {"sampler": sampler.state(), "rest": rest, "keys": list(opt_state)})})

        content = RecordDict({
            "arrays": ArrayRecord(to_state_dict(factors, alg.train_A)),
            "metrics": MetricRecord({"agent-weight": 1, "num-examples": len(shard),
                                     "train_loss": float(np.mean(losses)),
                                     # optimizer steps this node has taken: 2R at round R
                                     # only if its state survived every round
                                     "opt-steps": int(rest.get("count", -1))}),
        })
        return Message(content=content, reply_to=msg)

    return app


# ---------------------------------------------------------------------------------- ServerApp

def _server_app(args, report: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        """FedAvg that stamps the end of each round's aggregation on the server."""

        def aggregate_train(self, server_round, replies):
            out = super().aggregate_train(server_round, replies)
            report["stamps"].append(time.perf_counter())
            return out

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        overrides = _overrides(args)
        s = setup(str(args.config), overrides)
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                               min_train_nodes=args.agents, min_available_nodes=args.agents,
                               weighted_by_key="agent-weight")
        initial = ArrayRecord(to_state_dict(s["init"], s["algorithm"].train_A))
        report["stamps"] = [time.perf_counter()]
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds,
                                train_config=ConfigRecord({"config": str(args.config),
                                                           "overrides": json.dumps(overrides)}))
        final = from_state_dict(result.arrays.to_torch_state_dict(), s["init"])
        report["final"] = dict(s["task"].evaluate(final))
        losses = result.train_metrics_clientapp
        if losses:
            last = losses[max(losses)]
            report["final"]["train_loss"] = float(last["train_loss"])
            report["final"]["opt_steps_per_client"] = float(last["opt-steps"])

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--client-cpus", type=float, default=0.2,
                   help="Ray CPUs per client actor: the pool holds (cluster CPUs / this) actors; "
                        "0.2 on 2 cores = one actor per client (Flower's fastest here)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (all)")
    p.add_argument("--pull-interval", type=float, default=None,
                   help="seconds between the server's polls for client replies (Flower's "
                        "InMemoryGrid; default its own 0.1, which rounds each round up to a "
                        "tick); lower gives Flower its best case")
    p.add_argument("--exclude-last", action="store_true",
                   help="also drop the last round from the median (as ours evaluates there)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra decaf_ray config override (repeatable)")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (round 1 is start-up and is excluded)")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Import this file as a module so Ray pickles the apps by reference and each actor keeps
    # one module-level cache (functions from __main__ would be pickled by value per message).
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_flower
    import flwr
    from flwr.simulation import run_simulation

    if args.pull_interval is not None:
        from flwr.superlink.grid import inmemory_grid

        grid_init = inmemory_grid.InMemoryGrid.__init__

        def init(self, *a, pull_interval=args.pull_interval, **k):
            grid_init(self, *a, pull_interval=pull_interval, **k)

        inmemory_grid.InMemoryGrid.__init__ = init
    report: dict = {"stamps": []}
    init_args = {"include_dashboard": False, "logging_level": "ERROR"}
    if args.num_cpus:
        init_args["num_cpus"] = args.num_cpus
    start = time.perf_counter()
    run_simulation(server_app=bench_flower._server_app(args, report),
                   client_app=bench_flower._client_app(),
                   num_supernodes=args.agents,
                   backend_config={"client_resources": {"num_cpus": args.client_cpus,
                                                        "num_gpus": 0.0},
                                   "init_args": init_args})
    total = time.perf_counter() - start
    stamps = report["stamps"]
    if len(stamps) != args.rounds + 1:
        raise SystemExit(f"flower run incomplete: {len(stamps) - 1} of {args.rounds} rounds")
    rounds_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    kept = rounds_ms[1:-1] if args.exclude_last and args.rounds > 2 else rounds_ms[1:]
    print(json.dumps({"framework": "flower", "flwr": flwr.__version__, "agents": args.agents,
                      "rounds": args.rounds, "client_cpus": args.client_cpus,
                      "pull_interval": args.pull_interval,
                      "per_round_ms": statistics.median(kept), "rounds_ms": rounds_ms,
                      "total_s": total, "load": os.getloadavg()[0],
                      "final": report.get("final", {})}))


if __name__ == "__main__":
    main()
