"""Processes and devices: the device a stage trains on and, under torchrun, the process group.

Multi-process: launched by torchrun (WORLD_SIZE > 1), each process trains on its shard of every
epoch (DistributedSampler), gradients are averaged by DDP, and rank 0 alone logs, validates and
writes checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from midi_rae.config import ConfigError, TrainConfig


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Dist:
    """Device and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo on CPU."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no GPU is visible; set train.device=cpu")
    if want == "cuda" and local_rank >= torch.cuda.device_count():
        # torchrun started more processes on this machine than it has GPUs: each process takes the
        # GPU of its local rank, so cuda:{local_rank} would not exist (and NCCL refuses two ranks on one GPU).
        raise ConfigError(f"this process has local rank {local_rank} but the machine has {torch.cuda.device_count()} "
                          f"GPU(s): start at most that many processes per machine (torchrun --nproc_per_node), "
                          f"or set train.device=cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def say(d: Dist, msg: str) -> None:
    """Print on the main process only (every process runs the same code)."""
    if d.main:
        print(msg, flush=True)


def all_gather(d: Dist, obj: Any) -> list[Any]:
    """`obj` of every process, in rank order (`[obj]` in a single process)."""
    if d.world == 1:
        return [obj]
    gathered: list[Any] = [None] * d.world
    dist.all_gather_object(gathered, obj)
    return gathered
