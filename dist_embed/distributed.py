"""The one place that owns distributed state: process group, device, collectives.

We do not wrap the model in DDP. Gradients are summed with one bucketed all-reduce per optimizer
step, after all micro-batches (and after every cached-MNRL replay), which gives: one sync per step by
construction, ranks that hold an empty slice of a ragged batch still take part, and unused
parameters need no special handling.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    # a gloo group beside NCCL for host values (stop flags, log records): agreeing on them never
    # waits for the GPU's queue; None: the default group carries them (gloo runs)
    control: object = None
    # a gloo group of the data planner's own (the sharded plane's exchanges): it may run in a
    # loader thread while the training thread talks on the other groups
    data: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env_int(*names: str) -> int | None:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return None


def init_distributed(timeout_s: int = 1800, force_cpu: bool = False, group_of_one: bool = False) -> DistState:
    """Join the process group described by the environment (torchrun, accelerate, srun, Ray).

    torchrun/accelerate/Ray set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; under ``srun`` we
    read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (MASTER_ADDR/PORT come from our sbatch template).
    The device is chosen by LOCAL rank, never by global rank. ``group_of_one``: make a process group
    even for a single process (DeepSpeed needs one).
    """
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    use_cuda = torch.cuda.is_available() and not force_cpu
    device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a launcher (e.g. Ray Train) already made the process group
        backend = dist.get_backend()
        return DistState(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                         device=device, backend=backend, control=_control_group(backend), data=_data_group())
    backend = "nccl" if use_cuda else "gloo"
    if world == 1:
        if not group_of_one:
            return DistState(device=device)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set; start workers with dist-embed "
                           "train --nproc N, torchrun, srun (our sbatch template) or Ray")
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                     control=_control_group(backend), data=_data_group())


def _data_group():
    return dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None


def gather_objects(obj, state: DistState) -> list:
    """Every rank's ``obj`` (picklable), in rank order, over the data group."""
    if not state.enabled:
        return [obj]
    out = [None] * state.world_size
    dist.all_gather_object(out, obj, group=state.data)
    return out


def _control_group(backend: str):
    """A CPU (gloo) group for host values when the main group is NCCL (every rank makes it)."""
    return dist.new_group(backend="gloo") if backend == "nccl" and dist.get_world_size() > 1 else None


class _GatherVarlen(torch.autograd.Function):
    """All-gather rows of different counts per rank, with gradients flowing back to their owners.

    Backward: every rank's loss depends on every gathered row, so the gradient of a row is the sum of
    all ranks' gradients for it: all-reduce(SUM) the full gradient, then keep our own slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, timer):
        ctx.sizes, ctx.rank, ctx.timer = sizes, rank, timer
        t0 = time.perf_counter()
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        out = torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)
        if timer is not None:
            timer.add("comm", time.perf_counter() - t0)
            timer.add("gather", time.perf_counter() - t0)  # reported on its own too
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t0 = time.perf_counter()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        if ctx.timer is not None:
            ctx.timer.add("comm", time.perf_counter() - t0)
            ctx.timer.add("gather", time.perf_counter() - t0)
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: torch.Tensor, sizes: list[int], state: DistState, timer=None) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order; ``sizes[r]`` rows come from rank r."""
    if not state.enabled:
        return x
    return _GatherVarlen.apply(x, list(sizes), state.rank, timer)


def all_reduce_grads(params: list[torch.nn.Parameter], state: DistState, bucket_mb: float = 25.0,
                     timer=None, sparse_rows: tuple[torch.nn.Parameter, torch.Tensor] | None = None) -> None:
    """Sum gradients over ranks in flat buckets (few large messages beat many small ones).

    ``sparse_rows = (embedding weight, bool mask of the rows this rank used)``: a word-embedding
    gradient is zero outside the rows of tokens seen in the batch, so only the union of the ranks'
    rows is summed (a small share of the table). The result is identical.
    """
    if not state.enabled:
        return
    t0 = time.perf_counter()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if sparse_rows is not None:
        weight, used = sparse_rows  # ``used`` on the host: the union is found without a device read
        mask = used.to(torch.uint8)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=state.control)
        from .data.batch import to_device

        idx = to_device(mask.nonzero().squeeze(1), weight.grad.device)  # pinned: the copy does not wait
        rows = weight.grad.index_select(0, idx)
        dist.all_reduce(rows, op=dist.ReduceOp.SUM)
        weight.grad.index_copy_(0, idx, rows)
        params = [p for p in params if p is not weight]
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= limit:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)
    if timer is not None:
        timer.add("comm", time.perf_counter() - t0)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in same:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def all_reduce_sum(values: list[float], state: DistState, op=dist.ReduceOp.SUM) -> list[float]:
    """A few host numbers combined over ranks (SUM, or e.g. ``op=dist.ReduceOp.MAX``), on the CPU
    (the control group beside NCCL): never a wait for the GPU."""
    if not state.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op, group=state.control)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, state: DistState) -> torch.Tensor:
    """A device tensor summed over ranks, in place and without reading it back (NCCL runs it on the
    GPU's stream)."""
    if state.enabled:
        dist.all_reduce(t)
    return t


def broadcast_object(obj, state: DistState):
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not state.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(state: DistState) -> None:
    if state.enabled:
        dist.barrier()


def finish(state: DistState, code: int = 0, sync: bool = True) -> None:
    """End a worker: barrier, flush, hard exit (gloo can abort in interpreter teardown otherwise).
    ``sync=False`` after a failure on this rank alone: peers may never reach the barrier."""
    if sync and state.enabled and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already died; exit with our code anyway
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
