"""Joining the torchrun group twice (a job places its models, then the engine sets up) is harmless."""

from __future__ import annotations

import torch

from xmodal.engine import ddp


def test_init_distributed_twice_joins_once_and_gives_the_same_rank_device(monkeypatch):
    """As rank 3 of 4 under torchrun on a 4-GPU machine (the GPU calls are recorded, not made)."""
    joined, current = [], []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(ddp, "resolve_device", lambda spec: torch.device("cuda"))
    monkeypatch.setattr(ddp, "is_distributed", lambda: bool(joined))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(ddp.dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setattr(ddp.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(ddp.dist, "get_world_size", lambda: 4)

    first = ddp.init_distributed("auto")  # the job, before it loads the teacher
    second = ddp.init_distributed("auto")  # the Distiller
    assert first == second == torch.device("cuda", 3)
    assert joined == ["nccl"] and current == [torch.device("cuda", 3)] * 2
