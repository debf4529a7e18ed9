"""Centralized fine-tuning on Ray Train: a ``TorchTrainer`` with data-parallel workers.

The Centralized baseline is one agent on all the data, so on a cluster it is an ordinary
data-parallel fine-tune. Every worker runs the same round loop (``runtime.loop.stream``) on the
same single-agent plan; only the gradient is shared out: each batch is split into one chunk per
worker and the chunk gradients are averaged with a ``torch.distributed`` all-reduce
(``DataParallelTask``), so every worker takes the same step and holds the same adapter.

Worker 0 forwards the loop's items (rows per round, checkpoints, the result) through a Ray queue
to the driver, which follows them as for the other runtimes: rows stream, the progress bar moves
per round. With one worker the numbers are the in-process ones exactly; with more they agree to
float rounding (a batch gradient summed in chunks) when dropout is off; dropout draws differ per
chunk. Chunks are weighted by their share of what the loss is a mean over (``chunk_share``):
examples for the synthetic and CLIP tasks, answer tokens for the causal LM, so the weighted sum
is the batch's loss and gradient. The all-reduce runs on gloo: gradients come back from the
task on the CPU.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from decaf_ray import devices, placement
from decaf_ray import factors as F
from decaf_ray.seeding import derive_seed
from decaf_ray.experiment_config import ExperimentConfig, load_config
from decaf_ray.plan import RunFailed, RunResult, prepare
from decaf_ray.factors import Grads
from decaf_ray.runtime.loop import RunState, follow, stream

_DONE = "__decaf_ray_train_done__"


def chunk_share(task, chunk: np.ndarray, batch: np.ndarray) -> float:
    """``chunk``'s weight in ``batch``'s mean loss: its share of the task's ``loss_weight``
    (answer tokens for the causal LM), or of the examples for tasks without one."""
    weight = getattr(task, "loss_weight", len)
    return float(weight(chunk)) / float(weight(batch))


class DataParallelTask:
    """``task`` with ``loss_and_grads`` of a batch shared between ``world`` workers.

    Worker ``rank`` computes the mean loss and gradient of its chunk of the indices
    (``np.array_split``), weights them by ``chunk_share`` and all-reduces the sum:
    every worker returns the batch's mean loss and gradient. Everything else is the task's.
    """

    def __init__(self, task, rank: int, world: int):
        self.task, self.rank, self.world = task, rank, world

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def loss_and_grads(self, factors, indices: np.ndarray, train_A: bool, seed: int
                       ) -> tuple[float, Grads]:
        import torch.distributed as dist

        indices = np.asarray(indices)
        mine = np.array_split(indices, self.world)[self.rank]
        # Rank 0 draws as the unsplit step would; the other chunks need draws of their own.
        chunk_seed = derive_seed(seed, self.rank) if self.rank else seed
        loss, grads = self.task.loss_and_grads(factors, mine, train_A, chunk_seed)
        names = list(grads)
        parts = [g for n in names for g in grads[n] if g is not None]
        flat = torch.cat([p.reshape(-1).float() for p in parts]
                         + [torch.tensor([loss], dtype=torch.float32)])
        flat *= chunk_share(self.task, mine, indices)
        dist.all_reduce(flat)
        out, offset = {}, 0
        for n in names:
            pair = []
            for g in grads[n]:
                if g is None:
                    pair.append(None)
                    continue
                pair.append(flat[offset:offset + g.numel()].view_as(g).to(g.dtype))
                offset += g.numel()
            out[n] = tuple(pair)
        return float(flat[-1]), out


def _worker(config: dict) -> None:
    """One Ray Train worker: the whole round loop on its share of every batch."""
    import ray.train

    from decaf_ray.runtime.inprocess import InProcessHosts

    devices.hide_unassigned_gpus()  # before anything touches CUDA: use_gpu False sees no GPU
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = load_config(config["experiment"])
    torch.set_num_threads(placement.host_threads(cfg.runtime))
    devices.set_deterministic(cfg.runtime.deterministic)
    plan = prepare(cfg)
    if world > 1:
        plan = replace(plan, task=DataParallelTask(plan.task, rank, world))
    hosts = InProcessHosts(plan)
    queue = config["queue"]
    for item in stream(plan, hosts, resume=config["resume"],
                       checkpoint_every=config["checkpoint_every"]):
        if rank == 0:
            if isinstance(item, RunResult):
                item.summary["train_workers"] = world
                # What worker 0 could see: "" none (it reserved no GPU), else Ray's ids.
                item.summary["train_cuda_visible_devices"] = devices.visible()
                item.factors = {i: F.clone(f) for i, f in item.factors.items()}
            queue.put(item)


def run_on_train(cfg: ExperimentConfig, *, run_id: str | None = None,
                 resume: RunState | None = None, checkpoint_every: int | None = None,
                 **follow_kwargs) -> RunResult:
    """Run a Centralized ``cfg`` as a ``TorchTrainer`` with ``runtime.train_workers`` workers.

    ``follow_kwargs`` go to ``runtime.loop.follow`` (on_rows, on_checkpoint, progress). A worker
    failure raises ``RunFailed`` with its first line."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    placement.connect()
    rt = cfg.runtime
    per_worker = {"CPU": rt.cpus_per_host if rt.cpus_per_host is not None else 1.0}
    if rt.gpus_per_host:
        per_worker["GPU"] = rt.gpus_per_host
    queue = Queue(actor_options={"num_cpus": 0})  # fits a Tune trial's placement group
    storage = tempfile.mkdtemp(prefix="decaf-ray-train-")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"experiment": cfg.to_dict(), "queue": queue, "resume": resume,
                           "checkpoint_every": checkpoint_every},
        scaling_config=ScalingConfig(num_workers=rt.train_workers, use_gpu=bool(rt.gpus_per_host),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=run_id or f"decaf-ray-{uuid.uuid4().hex[:8]}",
                             storage_path=storage),
        torch_config=TorchConfig(backend="gloo"),  # CPU gradients, also beside GPUs
    )
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # handed to the driver thread below
            errors.append(e)
        finally:
            queue.put(_DONE)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()

    def items():
        while (item := queue.get()) != _DONE:
            yield item
        first = str(errors[0]).strip().splitlines() if errors else []
        raise RunFailed(f"Ray Train run failed: {first[0] if first else 'no result'}")

    try:
        result = follow(items(), cfg.rounds, cfg.algorithm,
                        initial=resume.round if resume else 0, **follow_kwargs)
    except BaseException:
        queue.shutdown(force=True)  # worker 0's next put fails, so the trainer stops now
        thread.join(timeout=60)
        shutil.rmtree(storage, ignore_errors=True)
        raise
    thread.join()
    queue.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    return result
