"""torchrun / DDP plumbing: process group from the environment, samplers that split the global batch,
and metric sums reduced across ranks. One process is simply world size 1."""
import os
from dataclasses import dataclass
from itertools import islice
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: Optional[str]) -> World:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return World(dist.get_rank(), dist.get_world_size(), dev)
    return World(0, 1, dev)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class TrainSampler(DistributedSampler):
    """DistributedSampler (a fresh permutation per epoch from seed + epoch; rank r takes every
    size-th index, so the ranks' local batches together are the one-process global batch) that can
    skip the batches already done when resuming mid-epoch."""

    skip = 0

    def __iter__(self):
        return islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class EvalSampler(Sampler):
    """Every size-th index from rank, no padding: summed counts are exact."""

    def __init__(self, length: int, world: World):
        self.indices = range(world.rank, length, world.size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
