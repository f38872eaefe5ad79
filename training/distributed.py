"""Process group and device of one training process under torchrun (CPU gloo by default)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); initialises gloo when launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str, world: int) -> str:
    """The device of this process: under torchrun with several GPUs, GPU LOCAL_RANK (mod their
    count), so ranks do not all pile onto cuda:0; else `device` unchanged. Gloo carries the
    gradients either way (NCCL would be faster between GPUs; not tested here)."""
    if world > 1 and device == "cuda" and torch.cuda.device_count() > 1:
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return device
