#!/usr/bin/env bash
# FedAvg time per round, decaf_ray's Ray runtime beside Flower's Ray simulation engine, same
# machine, same run: sweeps/clip-tiny-digits.yaml (tiny CLIP, LoRA on q/k/v of both encoders),
# 10 agents/clients, every client every round, local_steps steps each, evaluation only at the end.
#
#   bash bench/compare_flower.sh                          # ROUNDS=10 REPEATS=2 BATCH=5
#   PER_HOST=1 bash bench/compare_flower.sh               # 10 processes a side
#   BATCH=1 bash bench/compare_flower.sh                  # ours: each agent's step on its own
#   CLIENT_CPUS=0.2 bash bench/compare_flower.sh          # Flower: one actor per client
#
# Environment:
#   ROUNDS (10), REPEATS (2: ours, Flower, ours, Flower, ...; the summary takes medians)
#   PER_HOST (5): our agents_per_host (10 agents -> 10 / PER_HOST host processes)
#   BATCH (PER_HOST for a clip task, else 1): our runtime.batch_agents: a host's agents' steps
#     in one forward/backward pass (Flower runs each client's step on its own; the floor below
#     batches as ours does)
#   CLIENT_CPUS: Ray CPUs per Flower client actor; its pool holds cores / CLIENT_CPUS actors.
#     Default: cores / our host count, so both sides run the same number of worker processes
#     with the same CPUs each (on a shared machine a side with more processes gets a larger
#     share of the contended cores).
#   FLWR_PULL: seconds between the Flower server's polls for replies (default: Flower's own
#     0.1 s, which rounds each of its rounds up to a tick: 311 or 412 ms here); 0.01 gives
#     Flower its best case
#   FLWR_VENV (/tmp/flwr-venv): made on first use from bench/flower-requirements.txt plus
#     decaf_ray itself (editable, no dependencies: the clients run our task code only)
#   OURS_PY (.venv/bin/python)
#   CONFIG (sweeps/clip-tiny-digits.yaml): any experiment config; sweeps/quickstart.yaml (the
#     synthetic task, milliseconds of compute) compares the two runtimes' own costs
#
# Each repeat also measures the compute floor (bench_ray.py floor): the same local steps in as
# many plain processes as we have hosts, no runtime at all, batched as ours (BATCH). With BATCH=1
# both sides run the same step code, so neither can go below it and what each adds on top is its
# overhead per round; with BATCH > 1 Flower's part above it also holds the compute batching saved.
#
# Each side starts its own throwaway local Ray (Flower's 2.55.1, ours the project's);
# RAY_ADDRESS is ignored. Per-round time is taken on the driver/server: the gap between the ends
# of consecutive rounds. Medians are over rounds 2..R-1: round 1 is start-up, and round R is
# where ours evaluates every agent (Flower evaluates its final global adapter after its loop).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-10}
REPEATS=${REPEATS:-2}
PER_HOST=${PER_HOST:-5}
FLWR_PULL=${FLWR_PULL:-}
FLWR_VENV=${FLWR_VENV:-/tmp/flwr-venv}
OURS_PY=${OURS_PY:-.venv/bin/python}
CONFIG=${CONFIG:-sweeps/clip-tiny-digits.yaml}
BATCH=${BATCH:-$("$OURS_PY" -c "import sys; from decaf_ray.config import load_config
print($PER_HOST if load_config(sys.argv[1]).task.kind == 'clip' else 1)" "$CONFIG")}
AGENTS=10
CORES=$(nproc)
HOSTS=$(( (AGENTS + PER_HOST - 1) / PER_HOST ))
CLIENT_CPUS=${CLIENT_CPUS:-$(python3 -c "print(min(1.0, $CORES / $HOSTS))")}

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled FLWR_TELEMETRY_ENABLED=0
unset RAY_ADDRESS

if [ ! -f "$FLWR_VENV/.bench-installed" ]; then
  echo "making the Flower venv at $FLWR_VENV (first use: a few minutes)" >&2
  [ -x "$FLWR_VENV/bin/python" ] || python3 -m venv "$FLWR_VENV"
  "$FLWR_VENV/bin/python" -m pip install --quiet -r bench/flower-requirements.txt
  "$FLWR_VENV/bin/python" -m pip install --quiet --no-deps -e .
  touch "$FLWR_VENV/.bench-installed"
fi

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
load() { cut -d' ' -f1 /proc/loadavg; }

# Ours. bench_ray.py runs the config's algorithm (decaf) and reports a mean over all rounds, so
# ours runs here: the same config with algorithm=fedavg, rounds stamped as the driver gets them.
cat > "$log/ours.py" <<'EOF'
import json, os, statistics, sys, time

import decaf_ray.runtime.ray_runtime as rr
from decaf_ray.config import load_config
from decaf_ray.experiment import run

config, rounds, agents, per_host, batch = sys.argv[1], *map(int, sys.argv[2:6])
stamps = {}
_follow = rr.follow


def follow(items, *args, **kwargs):
    def stamped():
        for item in items:
            if isinstance(item, tuple):          # (round, rows): round `round` has ended
                stamps[item[0]] = time.perf_counter()
            yield item
    return _follow(stamped(), *args, **kwargs)


rr.follow = follow
cfg = load_config(config, ["algorithm=fedavg", f"agents={agents}", f"rounds={rounds}",
                           f"eval_every={rounds}", "grad_norm=false", "runtime.kind=ray",
                           f"runtime.agents_per_host={per_host}",
                           f"runtime.batch_agents={batch}"])
start = time.perf_counter()
result = run(cfg, progress=False)
total = time.perf_counter() - start
# stamps[0]: after the round-0 evaluation (hosts built); round r took stamps[r] - stamps[r-1]
rounds_ms = [(stamps[r] - stamps[r - 1]) * 1e3 for r in range(1, rounds + 1)]
kept = rounds_ms[1:-1] if rounds > 2 else rounds_ms[1:]
final = result.summary["final"]
print(json.dumps({"framework": "decaf_ray", "agents": cfg.agents, "rounds": rounds,
                  "per_host": per_host, "batch": batch, "status": result.status,
                  "per_round_ms": statistics.median(kept), "rounds_ms": rounds_ms,
                  "total_s": total, "load": os.getloadavg()[0],
                  "final": {k: final[k] for k in ("test_accuracy", "test_loss", "train_loss")
                            if k in final}}))
EOF

flwr_version=$("$FLWR_VENV/bin/python" -c 'import flwr; print(flwr.__version__)')
for i in $(seq 1 "$REPEATS"); do
  echo "== [$i/$REPEATS] ours: decaf_ray Ray runtime, fedavg, $AGENTS agents, $HOSTS hosts x" \
       "$PER_HOST agents, batch_agents $BATCH, $ROUNDS rounds (load $(load))" >&2
  "$OURS_PY" "$log/ours.py" "$CONFIG" "$ROUNDS" "$AGENTS" "$PER_HOST" "$BATCH" \
      > "$log/ours.$i.out" 2> "$log/ours.$i.err" || {
    tail -n 30 "$log/ours.$i.err" >&2; echo "ours failed" >&2; exit 1; }
  echo "== [$i/$REPEATS] compute floor: local steps only, $HOSTS plain processes (load $(load))" >&2
  "$OURS_PY" bench/bench_ray.py floor --config "$CONFIG" --agents "$AGENTS" \
      --per-host "$PER_HOST" --rounds "$ROUNDS" --set algorithm=fedavg \
      --set "runtime.batch_agents=$BATCH" \
      > "$log/floor.$i.out" 2> "$log/floor.$i.err" || {
    tail -n 30 "$log/floor.$i.err" >&2; echo "floor failed" >&2; exit 1; }
  echo "== [$i/$REPEATS] Flower $flwr_version: Ray simulation, FedAvg, $AGENTS clients, client" \
       "num_cpus $CLIENT_CPUS, $ROUNDS rounds (load $(load))" >&2
  "$FLWR_VENV/bin/python" bench/bench_flower.py --config "$CONFIG" --rounds "$ROUNDS" \
      --agents "$AGENTS" --client-cpus "$CLIENT_CPUS" --exclude-last \
      ${FLWR_PULL:+--pull-interval "$FLWR_PULL"} \
      > "$log/flower.$i.out" 2> "$log/flower.$i.err" || {
    tail -n 30 "$log/flower.$i.err" >&2; echo "flower failed" >&2; exit 1; }
done

python3 - "$log" "$REPEATS" <<'EOF'
import json, statistics, sys

log, repeats = sys.argv[1], int(sys.argv[2])
last = lambda p: json.loads(open(p).read().strip().splitlines()[-1])
ours = [last(f"{log}/ours.{i}.out") for i in range(1, repeats + 1)]
flower = [last(f"{log}/flower.{i}.out") for i in range(1, repeats + 1)]
floor = [last(f"{log}/floor.{i}.out") for i in range(1, repeats + 1)]
fmt = lambda xs: " ".join(f"{x:.0f}" for x in xs)
for i, (o, f) in enumerate(zip(ours, flower), 1):
    print(json.dumps(o))
    print(json.dumps(f))
    print(f"[{i}] rounds ms, ours:   {fmt(o['rounds_ms'])}")
    print(f"[{i}] rounds ms, flower: {fmt(f['rounds_ms'])}")
    print(f"[{i}] ours {o['per_round_ms']:.1f} ms, flower {f['per_round_ms']:.1f} ms, "
          f"ours / flower = {o['per_round_ms'] / f['per_round_ms']:.2f}")
o = statistics.median(r["per_round_ms"] for r in ours)
f = statistics.median(r["per_round_ms"] for r in flower)
R, f0 = ours[0]["rounds"], flower[0]
print(f"\nFedAvg, {f0['agents']} agents, median ms/round over rounds 2..{R - 1}, "
      f"median of {repeats} run(s) a side:")
print(f"  ours (decaf_ray Ray runtime, {ours[0]['per_host']} agents/host, batch_agents "
      f"{ours[0]['batch']}):  {o:.1f} ms")
pull = f0.get("pull_interval")
pull = "0.1 (Flower's default)" if pull is None else pull
print(f"  Flower {f0['flwr']} (Ray simulation, client num_cpus {f0['client_cpus']}, reply poll "
      f"every {pull} s): {f:.1f} ms")
print(f"  ours / flower = {o / f:.2f}  (target <= 0.5: {'met' if o / f <= 0.5 else 'NOT met'})")
c = statistics.median(r["per_round_ms"] for r in floor)
print(f"  compute floor (the local steps alone, {floor[0]['processes']} plain processes): {c:.1f} ms")
print(f"  overhead over the floor: ours {o - c:.1f} ms, Flower {f - c:.1f} ms"
      + (f" (ours / flower = {(o - c) / (f - c):.2f})" if f - c > 0 else ""))
acc = lambda r: r["final"].get("test_accuracy", float("nan"))
print(f"  final test accuracy: ours {acc(ours[-1]):.3f} (mean over agents), "
      f"flower {acc(flower[-1]):.3f} (global adapter)")
print(f"  Flower optimizer steps per client at the end: "
      f"{f0['final'].get('opt_steps_per_client', float('nan')):.0f} "
      f"(its state was kept across rounds if = rounds x local_steps)")
EOF
