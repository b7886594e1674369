"""Shared by the evaluators: gathering per-rank results for one computation."""

from __future__ import annotations

import torch


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_to_all(items: list) -> list:
    """Concatenate every rank's ``items`` (picklable objects) in rank order; a no-op without a process group."""
    _, size = world()
    if size == 1:
        return list(items)
    gathered: list[list | None] = [None] * size
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]
