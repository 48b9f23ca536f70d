"""Several processes under torchrun: the process group and the collectives training needs.

DistributedDataParallel with gloo on the CPU and nccl on CUDA; only rank 0 validates, writes and
logs. Rank, world size and local rank come from torchrun's environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.torchrun import rank_env


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 outside one)."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on the CPU)."""
    env = rank_env()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(env.rank, env.world, device)


def all_mean(values: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """The mean of `values` over the ranks, on the CPU."""
    if ctx.world > 1:
        values = values.to(ctx.device)
        dist.all_reduce(values)
        values = values / ctx.world
    return values.cpu()


def max_over_ranks(value: float, ctx: Dist) -> float:
    """The largest `value` of all ranks (so that time-based decisions agree across ranks)."""
    if ctx.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
