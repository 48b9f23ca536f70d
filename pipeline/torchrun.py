"""This process's place in a torchrun job, from torchrun's environment variables (no torch import).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in every worker; outside torchrun
the process is rank 0 of 1. Training (`pipeline.training.distributed`) joins a process group on top
of these; inference (`pipeline.inference.run.shards`) only needs the numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from pipeline.errors import SegpipeError

_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class RankEnv:
    """Global rank and world size, and the same on this node (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """`[rank r/N]`, the prefix of this rank's lines."""
        return f"[rank {self.rank}/{self.world}]"


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """The torchrun variables of `environ` (default `os.environ`); SegpipeError if they are not
    integers with 0 <= rank < world. LOCAL_WORLD_SIZE defaults to WORLD_SIZE (one node)."""
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for name in _VARIABLES:
        text = env.get(name)
        if text is None or text == "":
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise SegpipeError(f"environment variable {name}={text!r} is not an integer") from None
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    local_world = values.get("LOCAL_WORLD_SIZE", world)
    local_rank = values.get("LOCAL_RANK", rank if local_world == world else 0)
    if not (world >= 1 and 0 <= rank < world and 1 <= local_world <= world and 0 <= local_rank < local_world):
        raise SegpipeError(
            f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
            f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}"
        )
    return RankEnv(rank, world, local_rank, local_world)


__all__ = ["RankEnv", "rank_env"]
