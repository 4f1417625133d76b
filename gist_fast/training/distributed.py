"""torchrun / DDP plumbing: process group from the environment, samplers that split the global batch,
and metric sums reduced across ranks. One process is simply world size 1."""
import os
from dataclasses import dataclass
from itertools import islice
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler


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


IGNORE = -100  # the label of a padded sample: every training loss ignores it (their ignore_index)


class TrainSampler(DistributedSampler):
    """DistributedSampler (a fresh permutation per epoch from seed + epoch; rank r takes every
    size-th index, so the ranks' local batches together are the one-process global batch) that can
    skip the batches already done when resuming mid-epoch.

    The padding that gives every rank as many samples comes last, in the last global batch, and is
    yielded as len(dataset) + i: Padded labels those IGNORE, so they neither train nor count."""

    skip = 0

    def __iter__(self):
        n = len(self.dataset)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order += range(n, self.total_size)  # where DistributedSampler repeats samples: marked, not repeated
        return islice(order[self.rank:self.total_size:self.num_replicas], self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class Padded(Dataset):
    """dataset; index len(dataset) + i (TrainSampler's padding) is sample i's image labelled IGNORE,
    a real image so that batches stack, which no loss trains on."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        n = len(self.dataset)
        return self.dataset[i] if i < n else (self.dataset[i - n][0], IGNORE)


def global_rows(size: int, batch: int, step: int) -> int:
    """Real samples in global batch `step` of an epoch over `size` samples (the last one may be short)."""
    return min(batch, size - step * batch)


class EvalSampler(Sampler):
    """Every size-th index from rank, no padding: summed counts are exact."""

    def __init__(self, length: int, world: World):
        self.indices = range(world.rank, length, world.size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
