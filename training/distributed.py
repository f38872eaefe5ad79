"""Process group, device and number format of one training process under torchrun (CPU gloo by default)."""
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


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere PyTorch emulates bf16, and a training step under bf16 autocast
    took 14x as long as in fp32 (regnetx_004, 96 px, batch 64, an AVX2-only AMD EPYC, 2 threads)."""
    if torch.device(device).type == "cuda":  # is_bf16_supported() also counts emulation (pre-Ampere GPUs)
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    if torch.device(device).type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, device: str, announce: bool = False) -> str:
    """"bf16" or "fp32" for `--precision` ("auto": bf16 where `native_bf16(device)`, else fp32);
    with `announce`, an automatic choice is printed with its reason."""
    if requested != "auto":
        return requested
    chosen = "bf16" if native_bf16(device) else "fp32"
    if announce:
        print(f"precision: {chosen} (auto: {'native' if chosen == 'bf16' else 'no native'} bf16 on {device})",
              flush=True)
    return chosen
