"""The torchrun process group: rank, world size, device, and values broadcast from rank 0."""

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        chosen = torch.device("cuda", local_rank) if device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu" if device == "auto" else device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, chosen)


def _from_rank0(context: DistributedContext, value):
    """``value`` as rank 0 has it, on every rank (rank 0 alone reads the run folder)."""
    if not context.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
