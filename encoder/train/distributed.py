"""Data-parallel training across processes started by torchrun.

`torchrun --nproc_per_node N` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address in each process's environment; `setup()` joins them into one process group (NCCL
on CUDA machines, each process on its own GPU; gloo on CPU). Without those variables, or
with WORLD_SIZE 1, nothing is initialised and every helper here is a no-op, so a single
process trains as it always has.

How the loops use it (see encoder.train.loop and encoder.train.embed):
- `options.batch_size` is the GLOBAL batch. Every rank draws the whole global batch from
  the same seeded generators (the draw of a single process), then keeps its contiguous
  part (`part`): batch_size / world cases. All ranks hold the same RNG states throughout,
  so rank 0's snapshot resumes every rank.
- After each backward, `average_gradients` all-reduces the gradients of the optimizer's
  parameters (bucketed) and divides by the world size: the update DistributedDataParallel
  makes. The loops call network methods other than `forward` (the generator's encoder, the
  embedder's heads) and switch `requires_grad` between phases, which DDP's forward hooks
  do not follow; averaging the gradients explicitly gives the same step for every call
  pattern.
- Losses over the batch as a whole (CLIP, the label loss) gather the ranks' vectors with
  their gradients (`gather_with_grad`); the step's stats are averaged over the ranks
  (`mean_stats`), so rank 0 logs the global batch's losses.
- Rank 0 alone writes files (`is_main`); it alone decides when to stop (`agree`).
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MB of float32)
STOP_REASONS = ("", "iters", "minutes", "abort")


def requested() -> bool:
    """Whether torchrun (or the like) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_minutes: float = 30.0) -> bool:
    """Join the process group described by the environment (once); → whether this process
    trains with others. The backend is NCCL when CUDA is available, else gloo."""
    if not requested() or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        atexit.register(cleanup)
    return active()


def active() -> bool:
    """Whether this process trains in a group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    """This process's index on its machine (its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return rank() == 0


def device(requested_device: str | None) -> torch.device:
    """The device this process trains on: `requested_device`, or cuda when available, else
    cpu; with several processes on CUDA, the GPU of this process's local rank."""
    chosen = torch.device(requested_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if active() and chosen.type == "cuda" and chosen.index is None:
        return torch.device("cuda", local_rank())
    return chosen


def part(batch_size: int) -> slice:
    """This rank's contiguous rows of a global batch of `batch_size`."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"batch_size {batch_size} (the global batch) must be a multiple of the "
            f"{world} processes"
        )
    each = batch_size // world
    return slice(rank() * each, (rank() + 1) * each)


def whole_parts(batch_size: int) -> int:
    """`batch_size` rounded down to a multiple of the processes (at least one each)."""
    world = world_size()
    return max(batch_size - batch_size % world, world)


def _comm_device() -> torch.device:
    """Where collectives of small host values run (NCCL needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_module(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (as DDP does when it wraps)."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """All-reduce the gradients of `optimizer`'s parameters and divide by the world size,
    in buckets of at most BUCKET_ELEMENTS per dtype and device."""
    if not active():
        return
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        same = not bucket or (grad.dtype, grad.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not same or size >= BUCKET_ELEMENTS):
            _reduce_bucket(bucket, world)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        _reduce_bucket(bucket, world)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_stats(stats: dict[str, float]) -> dict[str, float]:
    """The mean of each stat over the ranks (every rank passes the same keys)."""
    if not active() or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist(), strict=True))


def mean_value(x: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over the ranks."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` (same shape), concatenated in rank order along dim 0; no gradient."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the sum over ranks of its rows' gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]  # type: ignore[attr-defined]
        return gather(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        rows, r = ctx.rows, dist.get_rank()  # type: ignore[attr-defined]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[r * rows : (r + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """As `gather`, keeping the graph: the backward sums every rank's gradient of its own
    rows (so after `average_gradients` a loss computed alike on every rank trains as the
    single process's)."""
    if not active():
        return x
    return _GatherWithGrad.apply(x)


def agree(stop_reason: str, elapsed_s: float) -> tuple[str, float]:
    """Rank 0's stop reason and clock, for every rank: the ranks stop together and follow
    the same time-based schedule."""
    if not active():
        return stop_reason, elapsed_s
    code = float(STOP_REASONS.index(stop_reason))
    values = torch.tensor([code, elapsed_s], dtype=torch.float64, device=_comm_device())
    dist.broadcast(values, src=0)
    return STOP_REASONS[int(values[0])], float(values[1])


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written what the others read next)."""
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (registered at exit by `setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
