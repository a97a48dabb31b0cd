"""torch.distributed plumbing for ``torchrun`` (gloo on CPU, nccl on CUDA).

Choice of meaning: each rank computes the contrastive loss over its own micro-batch (in-batch negatives
are the rank's batch) and the FLOPS regularizer over its own batch; DDP averages gradients. A run with N
processes and per-rank batch B is therefore the same objective as N independent batches of B averaged —
not one batch of N*B. ``--batch-size`` is per rank; the logged ``batch_size`` is the global one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from .config import TrainConfig
from .errors import ConfigError, TrainingError


@dataclass
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device_name: str

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP
        if self.device_name.startswith("cuda"):
            return DDP(module, device_ids=[self.local_rank], output_device=self.local_rank)
        return DDP(module)

    def no_sync(self, model: torch.nn.Module) -> Any:
        return model.no_sync()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def finish(self, result: Any) -> None:
        """Agree on the outcome: if any rank failed, every rank reports which one."""
        statuses = [None] * self.world_size
        tdist.all_gather_object(statuses, (self.rank, result.status,
                                           result.error.one_line() if result.error is not None else None))
        failed = [(r, msg) for r, st, msg in statuses if st == "FAILED"]
        if failed and result.status != "FAILED":
            r, msg = failed[0]
            result.status = "FAILED"
            result.error = TrainingError(f"rank {r} failed: {msg}", rank=r)

    def shutdown(self) -> None:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def dist_from_env(cfg: TrainConfig) -> DistContext | None:
    """A context when launched by torchrun with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    want_cuda = cfg.optim.device.startswith("cuda") or (cfg.optim.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", f"cuda:{local_rank}"
    else:
        backend, device = "gloo", "cpu"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world, backend=backend, device_name=device)


def env_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))
